"""Top-16 Jacobian subspace of a denoiser at 32x32x3 (d = 3072): diffcore vs the public ways.

Peers (timed first, same point, same denoiser):
- ``full``: the full Jacobian (``torch.func.jacrev``, vmapped VJPs in chunks of 256) and a full SVD.
- ``chunked``: block power iteration as in the public LOCO-Edit code: ``J V`` by ``jacfwd``-style
  JVPs in chunks of 5 vectors, ``U^T J`` by one VJP per vector, SVD, until the subspace changes by
  less than ``tol`` (sin of the largest principal angle between iterates) or 50 iterations.
diffcore: ``jacobian_subspace(method="subspace")`` (all 16 + 4 oversampling probes in one vmapped
JVP and one vmapped VJP per round, stop on residual or subspace change <= tol), plus the Lanczos
and randomized methods. Every row records the largest principal angle (degrees) of its top-16
right singular subspace to the exact one from the full SVD.

The denoiser comes from :func:`make_denoiser` (``DENOISERS`` lists the cases): a small conv
autoencoder denoiser with a gapped spectrum, and EDM's DDPM++ UNet at width 64 (slow-marked; it
needs diffcore.models and trained weights for meaningful angles, see :func:`make_unet64`).
DIFFCORE_BENCH_QUICK=1 runs 16x16x3 (d = 768).
"""

from __future__ import annotations

import math

import pytest
import torch
from benchutil import QUICK, record_ratio, run_timed

from diffcore.analysis import jacobian_subspace, principal_angles

K = 16
TOL = 1e-4
SIGMA = 1.0
SHAPE = (3, 16, 16) if QUICK else (3, 32, 32)
# the UNet-64 case takes many minutes on a 2-core CPU (full Jacobian: 3072 VJPs through the UNet):
# marked slow, deselect with -m "not slow"
DENOISERS = ["convnet", pytest.param("unet64", marks=pytest.mark.slow)]
FULL_CHUNK = {"convnet": 256, "unet64": 16}  # vmapped VJPs per chunk of the full-Jacobian peer (memory)

_EXACT: dict[str, torch.Tensor] = {}  # denoiser name -> exact top-K right singular vectors [K, d]
_SECONDS: dict[tuple[str, str], float] = {}


# --------------------------------------------------------------------------- denoisers
class ConvAutoencoderDenoiser(torch.nn.Module):
    """A small conv denoiser with EDM preconditioning (sd = 0.5): two stride-2 convs down to
    8x8x32 (4x4 in quick mode), a 16 + 64 latent bottleneck (the 64 scaled by 0.15, so the
    Jacobian spectrum decays with a gap after 16, about 2x, like a trained denoiser's), and the
    mirror up. Random weights (seeded): it measures cost and convergence, not denoising quality."""

    def __init__(self, shape=SHAPE, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        c, h, w = shape
        self.low = (32, h // 4, w // 4)
        flat = math.prod(self.low)
        self.down = torch.nn.Sequential(
            torch.nn.Conv2d(c, 16, 3, 2, 1), torch.nn.SiLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.SiLU()
        )
        self.encode = torch.nn.Linear(flat, 80)
        self.decode = torch.nn.Linear(80, flat)
        self.up = torch.nn.Sequential(
            torch.nn.Upsample(scale_factor=2),
            torch.nn.Conv2d(32, 16, 3, 1, 1),
            torch.nn.SiLU(),
            torch.nn.Upsample(scale_factor=2),
            torch.nn.Conv2d(16, c, 3, 1, 1),
        )
        self.register_buffer("latent_scale", torch.cat([torch.ones(16), torch.full((64,), 0.15)]))
        # output gain: lets the network's Jacobian dominate the skip term c_skip I, as in a trained
        # denoiser (at default init the network part is ~100x smaller and J is ~ c_skip I)
        self.gain = 1000.0
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x, sigma):
        sd = 0.5
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
        z = torch.tanh(self.encode(self.down(c_in * x).flatten(1))) * self.latent_scale
        f = self.up(self.decode(z).reshape(-1, *self.low))
        return c_skip * x + c_out * f * self.gain


def make_unet64():
    """EDM's DDPM++ CIFAR UNet at base width 64 (``denoiser_preset``), EDM preconditioning, eval mode.

    At initialization EDM scales the residual-branch and output convs by 1e-5, so F ~ 0 and
    J ~ c_skip I (a flat spectrum, no subspace to find). Until a trained checkpoint is loaded here,
    those weights are scaled back up by 1e5, which makes J generic but without a clear spectral gap:
    angles and iteration counts mean little there, the cost per iteration is the point. Quick mode: width 16 at 16x16.
    """
    from diffcore.models import denoiser_preset

    overrides = {"model_channels": 16, "img_resolution": 16} if QUICK else {"model_channels": 64}
    den = denoiser_preset("ddpmpp-cifar", **overrides).eval()
    with torch.no_grad():
        for p in den.parameters():
            if p.dim() >= 2 and float(p.abs().max()) < 1e-3:
                p.mul_(1e5)  # undo the 1e-5 init gains of the residual/output convs
    for p in den.parameters():
        p.requires_grad_(False)
    return den


def make_denoiser(name: str):
    """The denoiser of a benchmark case: ``D(x, sigma)`` in eval mode, no parameter gradients."""
    if name == "convnet":
        return ConvAutoencoderDenoiser()
    if name == "unet64":
        return make_unet64()
    raise ValueError(f"unknown denoiser {name!r}")


@pytest.fixture(scope="module", params=DENOISERS)
def case(request):
    torch.manual_seed(1)
    den = make_denoiser(request.param)
    x = torch.randn(1, *SHAPE) * SIGMA
    return request.param, den, x


# --------------------------------------------------------------------------- peers
def full_jacobian_svd(den, x, chunk_size=256):
    f = lambda z: den(z[None], SIGMA)[0].flatten()  # noqa: E731
    jac = torch.func.jacrev(f, chunk_size=chunk_size)(x[0]).reshape(x[0].numel(), -1)
    return torch.linalg.svd(jac)


def chunked_power_iteration(den, x, k=K, tol=TOL, max_iters=50, chunk=5, seed=0):
    """Public-code style: jacfwd in chunks of 5 for J V, a VJP per vector for U^T J."""
    f = lambda z: den(z, SIGMA)  # noqa: E731
    d = x.numel()
    v = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]
    _, vjp_fn = torch.func.vjp(f, x)
    for it in range(1, max_iters + 1):  # noqa: B007 (the count is returned)
        cols = []
        for start in range(0, k, chunk):
            tangents = v[:, start : start + chunk].T.reshape(-1, *x.shape)
            cols.append(torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(tangents).reshape(-1, d))
        u = torch.linalg.qr(torch.cat(cols).T)[0]  # [d, k]
        w = torch.stack([vjp_fn(u[:, i].reshape(x.shape))[0].flatten() for i in range(k)], 1)  # J^T U
        v_new, s, _ = torch.linalg.svd(w, full_matrices=False)
        change = torch.linalg.matrix_norm(v_new - v @ (v.T @ v_new), ord=2)  # sin of the largest angle
        v = v_new
        if float(change) <= tol:
            break
    return s, v.T, it


# --------------------------------------------------------------------------- benchmarks
def _angle(name, v_rows):
    return float(principal_angles(v_rows.reshape(K, -1).double(), _EXACT[name]).max())


def test_peer_full_jacobian_svd(benchmark, case):
    name, den, x = case
    benchmark.group = f"subspace-{name}"
    u, s, vh = run_timed(benchmark, lambda: full_jacobian_svd(den, x, FULL_CHUNK[name]), rounds=1, warmup_rounds=0)
    _EXACT[name] = vh[:K].double()
    _SECONDS[(name, "full")] = benchmark.stats.stats.min
    record_ratio(benchmark, f"subspace-{name}", f"full d={x.numel()}", "peer")
    benchmark.extra_info.update(gap_s16_over_s17=float(s[K - 1] / s[K]), top_singular_values=s[: K + 2].tolist())


def test_peer_chunked_power_iteration(benchmark, case):
    name, den, x = case
    benchmark.group = f"subspace-{name}"
    s, v, iters = run_timed(
        benchmark, lambda: chunked_power_iteration(den, x), rounds=1 if QUICK else 3, warmup_rounds=1
    )
    _SECONDS[(name, "chunked")] = benchmark.stats.stats.min
    record_ratio(benchmark, f"subspace-{name}", f"chunked d={x.numel()}", "peer")
    benchmark.extra_info.update(iterations=iters, max_angle_deg=_angle(name, v) if name in _EXACT else None)


@pytest.mark.parametrize("method", ["subspace", "lanczos", "randomized"])
def test_diffcore_jacobian_subspace(benchmark, case, method):
    name, den, x = case
    benchmark.group = f"subspace-{name}"
    kwargs = {"randomized": {"iters": 4, "oversample": 16}}.get(method, {})
    res = run_timed(
        benchmark,
        lambda: jacobian_subspace(den, x, SIGMA, K, method=method, tol=TOL, **kwargs),
        rounds=1 if QUICK else 3,
        warmup_rounds=1,
    )
    seconds = benchmark.stats.stats.min
    info = benchmark.extra_info
    info.update(
        role="diffcore",
        method=method,
        iterations=int(res.iterations[0]),
        converged=bool(res.converged[0]),
        max_residual=float(res.residuals.max()),
        jvp_passes=res.jvp_passes,
        vjp_passes=res.vjp_passes,
    )
    for peer in ("full", "chunked"):
        if (name, peer) in _SECONDS:
            info[f"speedup_vs_{peer}"] = _SECONDS[(name, peer)] / seconds
    if name in _EXACT:
        info["max_angle_deg"] = _angle(name, res.V[0])
        assert math.isfinite(info["max_angle_deg"])
