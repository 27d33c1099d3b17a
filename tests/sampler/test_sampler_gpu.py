"""GPU behaviour (skipped without a CUDA GPU): no host synchronization inside the loop, deferred
NaN/Inf detection, CUDA-graph trajectories equal to eager ones, same samples as on the CPU."""

from __future__ import annotations

import pytest
import torch

import diffcore.sampler as S

pytestmark = pytest.mark.gpu


class SmallConvDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 3, 3, padding=1)
        )

    def forward(self, x, sigma):
        c = (1 / (1 + sigma * sigma)).view(-1, 1, 1, 1)
        return c * x + 0.1 * self.net(x * c.sqrt())


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "ddim"])
def test_loop_never_synchronizes(solver, isotropic):
    x = S.noise_from_seeds(range(8), (3, 16, 16), device="cuda") * 80.0
    sigmas = S.karras_sigmas(10)
    S.SOLVERS[solver](isotropic, x, sigmas, check_finite=False)  # warm-up (Triton compile)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        S.SOLVERS[solver](isotropic, x, sigmas, check_finite=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_deferred_nonfinite_check_names_the_step(isotropic):
    sigmas = S.karras_sigmas(6)
    threshold = float(sigmas[3])

    def breaks(x, s):
        out = isotropic(x, s)
        return torch.where(s.view(-1, 1, 1, 1) <= threshold * 1.0001, out * float("nan"), out)

    x = S.noise_from_seeds(range(4), (3, 8, 8), device="cuda") * 80.0
    with pytest.raises(FloatingPointError, match="step 3"):
        S.sample_euler(breaks, x, sigmas)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
def test_capture_matches_eager(solver):
    net = SmallConvDenoiser().cuda().eval()
    x = S.noise_from_seeds(range(8), (3, 16, 16), device="cuda") * 80.0
    sigmas = S.karras_sigmas(12)
    with torch.no_grad():
        eager = S.SOLVERS[solver](net, x, sigmas)
        captured = S.SOLVERS[solver](net, x, sigmas, capture=True)
        batched = S.sample(
            net, seeds=range(8), shape=(3, 16, 16), steps=12, solver=solver, device="cuda", batch_size=4, capture=True
        )
    torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, eager, rtol=1e-4, atol=1e-4)


def test_gpu_samples_match_cpu_samples(isotropic):
    kwargs = dict(seeds=[5, 6, 7], shape=(3, 8, 8), steps=12, dtype=torch.float64)
    cpu = S.sample(isotropic, **kwargs)
    gpu = S.sample(isotropic, device="cuda", backend="reference", **kwargs)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-10)
    gpu32 = S.sample(isotropic, seeds=[5, 6, 7], shape=(3, 8, 8), steps=12, device="cuda")
    torch.testing.assert_close(gpu32.cpu().double(), cpu, rtol=1e-4, atol=1e-4)
