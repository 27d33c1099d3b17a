"""The lean CPU Euler loop (``solvers._run_euler_cpu``, issue 34) and the [B] sigma rows shared
between trajectories: same bits as the checked step op and as the generic loop, every denoiser
output still checked, and a shared sigma tensor never handed out after a denoiser changed it."""

from __future__ import annotations

import pytest
import torch

import diffcore.sampler as S
from diffcore import _env
from diffcore.ops import sampler_step
from diffcore.ops.steps import euler_coefficients
from diffcore.sampler import solvers
from tests.helpers import cpu_backends

needs_cpu_kernel = pytest.mark.skipif("cpu" not in cpu_backends(("cpu",)), reason="diffcore._C is not built")


def _x(batch=5, shape=(3, 4, 4), dtype=torch.float32):
    return S.noise_from_seeds(list(range(batch)), shape, dtype=dtype) * 80.0


def _hand_loop(denoiser, x, sigmas, state_dtype):
    """Euler written with the checked, keyword-bound step op (``diffcore.ops.sampler_step``)."""
    s = sigmas.tolist()
    state = x.to(state_dtype)
    for i in range(len(s) - 1):
        sigma = torch.full((x.shape[0],), s[i], dtype=torch.float64).to(x.dtype)
        denoised = denoiser(state.to(x.dtype), sigma).to(state_dtype)
        state = sampler_step("euler", state, denoised, euler_coefficients(s[i], s[i + 1]), backend="cpu")
    return state


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts the trajectories that took the lean loop (so a test cannot pass on the generic one)."""
    calls = []
    lean = solvers._run_euler_cpu

    def counted(*args):
        calls.append(1)
        return lean(*args)

    monkeypatch.setattr(solvers, "_run_euler_cpu", counted)
    return calls


@needs_cpu_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_lean_euler_loop_gives_the_bits_of_the_checked_step_op(state_dtype, threads, isotropic, lean_calls):
    x = _x(batch=16, shape=(3, 32, 32))  # 49152 elements: the kernel splits across 2 threads
    sigmas = S.karras_sigmas(6)
    with _env.torch_threads(threads):
        lean = S.sample_euler(isotropic, x, sigmas, state_dtype=state_dtype)
        generic = S.sample_euler(isotropic, x, sigmas, state_dtype=state_dtype, callback=lambda info: None)
        expected = _hand_loop(isotropic, x, sigmas, state_dtype)
    assert len(lean_calls) == 1  # the callback run took the generic loop
    assert lean.dtype == state_dtype
    assert torch.equal(lean, expected) and torch.equal(generic, expected)
    assert torch.equal(x, _x(batch=16, shape=(3, 32, 32)))  # the caller's state is never written


@needs_cpu_kernel
def test_lean_euler_loop_checks_every_output(isotropic, lean_calls):
    x, sigmas = _x(), S.karras_sigmas(6)

    def failing_at(step, make):
        calls = []

        def denoiser(xx, s):
            calls.append(1)
            out = isotropic(xx, s)
            return make(out) if len(calls) == step + 1 else out

        return denoiser

    with pytest.raises(ValueError, match="returned shape .* at step 3"):
        S.sample_euler(failing_at(3, lambda out: out[:, :2]), x, sigmas)
    with pytest.raises(TypeError, match="expected a tensor, got ndarray at step 2"):
        S.sample_euler(failing_at(2, lambda out: out.numpy()), x, sigmas)
    with pytest.raises(FloatingPointError, match="at step 4"):
        S.sample_euler(failing_at(4, lambda out: out.masked_fill(out > 0, float("nan"))), x, sigmas)
    with pytest.raises(ValueError, match="returned a tensor on meta"):
        S.sample_euler(failing_at(0, lambda out: out.to("meta")), x, sigmas)
    expected = S.sample_euler(isotropic, x, sigmas)
    # outputs the loop must convert: non-contiguous, another dtype, the input tensor itself
    transposed = S.sample_euler(failing_at(2, lambda out: out.transpose(2, 3).contiguous().transpose(2, 3)), x, sigmas)
    assert torch.equal(transposed, expected)
    as64 = S.sample_euler(failing_at(3, lambda out: out.double()), x, sigmas)
    assert torch.equal(as64, expected)  # float32 -> float64 -> float32 is exact
    identity = S.sample_euler(lambda xx, s: xx, x, sigmas)  # handed back its input: copied, not overwritten
    assert torch.equal(identity, _hand_loop(lambda xx, s: xx, x, sigmas, torch.float32))
    assert len(lean_calls) == 8


def test_sigma_rows_are_shared_and_rebuilt_after_a_write(isotropic):
    x, sigmas = _x(), S.karras_sigmas(5)
    seen = []

    def recording(xx, s):
        seen.append(s)
        return isotropic(xx, s)

    first = S.sample_euler(recording, x, sigmas)
    S.sample_euler(recording, x, sigmas)
    assert all(a is b for a, b in zip(seen[:5], seen[5:]))  # one set of rows for both trajectories
    assert [s.shape for s in seen] == [(5,)] * 10 and seen[0].dtype == x.dtype

    def writing(xx, s):  # a denoiser that (wrongly) writes into its sigma argument
        out = isotropic(xx, s)
        s.mul_(2.0)
        return out

    S.sample_euler(writing, x, sigmas)
    assert torch.equal(S.sample_euler(isotropic, x, sigmas), first)

    def grad_enabling(xx, s):
        s.requires_grad_()
        return isotropic(xx, s.detach())

    S.sample_euler(grad_enabling, x, sigmas)
    seen.clear()
    assert torch.equal(S.sample_euler(recording, x, sigmas), first)
    assert not any(s.requires_grad for s in seen)

    seen.clear()
    with torch.inference_mode():  # the rows are normal tensors, shared in and out of inference mode
        inside = S.sample_euler(recording, x, sigmas)
    assert torch.equal(inside, first)
    S.sample_euler(recording, x, sigmas)
    assert not any(s.is_inference() for s in seen)
    assert all(a is b for a, b in zip(seen[:5], seen[5:]))
    seen.clear()
    with torch.inference_mode():  # rebuilt in inference mode after a write: still a normal tensor
        S.sample_euler(writing, x, sigmas)
        S.sample_euler(recording, x, sigmas)
    assert not any(s.is_inference() for s in seen)
    seen.clear()
    assert torch.equal(S.sample_euler(recording, x, sigmas), first)
    # the rows hold each sigma rounded from float64, as a fresh tensor would
    fresh = torch.tensor(sigmas[:-1].tolist(), dtype=torch.float64).float()
    assert torch.equal(torch.stack(seen)[:, 0], fresh)
