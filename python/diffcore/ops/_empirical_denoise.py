"""Empirical optimal denoiser of a training set, streamed over training tiles.

``D*(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i`` (docs/papers.md, Common substrate; the denoiser that
reproduces the training set exactly) and its log-normalizer
``logz = logsumexp_i(-|x - y_i|^2 / (2 sigma^2))``. No backend materializes the [B, N] logits: each
streams over training tiles with a running log-sum-exp, in memory O(B*D + tile).

Numerics (docs/design.md, Numerics): fast distances ``|x|^2 + |y|^2 - 2 x.y`` (a GEMM) carry an error of about
``k u |x| |y|`` that ``1 / (2 sigma^2)`` magnifies. Every fast backend bounds that error per pair and
re-scores, with exact distances (difference first, double accumulation), the pairs that may carry
weight and whose logit error could exceed a tolerance. At small sigma this returns the nearest
training image (or the right mixture at near-ties) to fp32 accuracy.

This module holds the checks, the backend resolution and the table of runners; the CPU host code
is in ``_empirical_denoise_cpu.py``, the CUDA launcher in ``_empirical_denoise_cuda.py``.

The op is not differentiable: it runs under ``torch.no_grad()`` and returns tensors without
autograd history.
"""

from __future__ import annotations

import math

import torch

from diffcore._backend import OpBackends
from diffcore._checks import (
    check_magnitude,
    check_same_device,
    check_tensor,
    check_training_set,
    sigma_per_row,
)
from diffcore.ops import _empirical_denoise_cpu as _cpu, _empirical_denoise_cuda as _cuda

__all__ = ["empirical_denoise", "empirical_denoise_with_logz"]

BACKENDS = OpBackends(
    op="empirical_denoise",
    implemented=("reference", "cpu", "cuda", "triton"),
    # cuda: the Triton kernel passes the interpreter tests but has not run on a GPU yet; the CUDA
    # kernel has only been compiled, never run: it stays out of auto (ask for backend="cuda"). The
    # GPU kernels join auto after a GPU run matches the reference.
    auto_order={"cpu": ("cpu", "reference"), "cuda": ("reference",)},
)

# Smallest sigma taken: 1/(2 sigma^2) and the logits -|x - y|^2/(2 sigma^2) stay in the float64
# range for any distance up to 3.6e8 (image data: at most 4 D); below about 1.5e-154 sigma^2 itself
# underflows. Smaller sigmas are refused (the nearest training row is the answer there anyway).
MIN_SIGMA = 1e-150

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRAIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)


def empirical_denoise(x: torch.Tensor, train: torch.Tensor, sigma, *, backend: str = "auto") -> torch.Tensor:
    """Empirical optimal denoiser ``sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i``.

    Args:
        x: noisy inputs [B, ...]: float32 (any backend), float16/bfloat16 (computed in fp32),
            float64 (reference backend only).
        train: training set [N, ...] with the trailing shape of ``x``; float, or uint8 images mapped
            to [-1, 1] as ``u8 / 127.5 - 1``. Must be on x's device. Not checked for NaN (cost).
        sigma: noise level >= ``MIN_SIGMA`` (1e-150), a float or a tensor of shape [B] (or 0-d).
        backend: 'auto', 'reference', 'cpu', 'cuda' or 'triton'.
    Returns:
        x0_hat [B, ...] in x's dtype. Not differentiable (computed under no_grad).
    """
    return empirical_denoise_with_logz(x, train, sigma, backend=backend)[0]


def empirical_denoise_with_logz(
    x: torch.Tensor, train: torch.Tensor, sigma, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical denoiser and its log-normalizer.

    Returns:
        ``(x0_hat [B, ...] in x's dtype, logz [B])`` with
        ``logz = logsumexp_i(-|x - y_i|^2 / (2 sigma^2))``; logz is float32 (float64 for float64 x).
    See :func:`empirical_denoise` for the arguments.
    """
    x, train, sigma64 = _validate(x, train, sigma)
    name = BACKENDS.resolve(backend, x.device)
    if name != "cpu":  # the CPU path checks the training rows from the norms it computes anyway
        check_magnitude("train", train, nonfinite_later=True)  # NaN / Inf: the result check
    if name != "reference" and x.dtype == torch.float64:
        raise TypeError(f"x: float64 is supported by backend 'reference' only (backend {name!r} computes in fp32)")
    with torch.no_grad():
        out, logz = RUNNERS[name](x, train, sigma64)
    # never silent NaN (logz may be -inf: an underflow). One sum instead of isfinite().all() (40 us
    # at the digits' B = 256, a tenth of the call): out is a weighted mean of training rows, each
    # value of magnitude <= MAX_MAGNITUDE, so a sum of finite values stays far below the float range
    # and it is finite exactly when every value is.
    if not math.isfinite(float(out.sum())):
        raise ValueError(
            f"sigma: the weights could not be computed at sigma down to {float(sigma64.min()):g}: "
            f"the logits -|x - y|^2 / (2 sigma^2) left the float64 range (use a larger sigma), "
            f"or train holds NaN/Inf"
        )
    logz_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return out.to(x.dtype).reshape(x.shape), logz.to(logz_dtype)


def _validate(x, train, sigma):
    check_tensor("x", x, min_ndim=1, dtypes=_X_DTYPES)
    check_tensor("train", train, min_ndim=1, dtypes=_TRAIN_DTYPES, nonempty=False)
    check_training_set(train, x, "x")
    device = check_same_device(x=x, train=train)
    if isinstance(sigma, torch.Tensor) and sigma.dim() > 0 and sigma.device != device:
        raise ValueError(f"sigma: expected a tensor on {device} (that of x), got {sigma.device}")
    check_magnitude("x", x)  # NaN / Inf and the magnitude limit from one reduction
    sigma64 = sigma_per_row("sigma", sigma, x.shape[0], device)
    smallest = sigma if isinstance(sigma, (int, float)) else float(sigma64.min()) if sigma64.numel() else MIN_SIGMA
    if smallest < MIN_SIGMA:
        raise ValueError(
            f"sigma: expected values >= {MIN_SIGMA:g} (below, 1/(2 sigma^2) leaves the float64 "
            f"range), got min {float(sigma64.min()):g}"
        )
    return x, train, sigma64


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _run_reference(x, train, sigma64):
    from diffcore.ref.empirical_denoise import empirical_denoise_ref

    return empirical_denoise_ref(x, train, sigma64)


def _run_cpu(x, train, sigma64):
    return _cpu.run(_rows(x), _rows(train), sigma64)


def _gpu_rows(x: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, D] and train [N, D], contiguous, as the GPU kernels read them (float64 train as fp32)."""
    y = _rows(train)
    return _rows(x).contiguous(), (y.to(torch.float32) if y.dtype == torch.float64 else y).contiguous()


def _run_triton(x, train, sigma64):
    from diffcore.kernels.empirical_denoise import empirical_denoise_triton

    return empirical_denoise_triton(
        *_gpu_rows(x, train),
        sigma64,
        err_coef_fn=_cpu.measured_fp32_gemm_error_coefficient,
        rescore_tol=_cpu.RESCORE_TOL,
        band=_cpu.BAND,
    )


def _run_cuda(x, train, sigma64):
    return _cuda.run(*_gpu_rows(x, train), sigma64)


# Backend name -> runner(x [B, ...], train [N, ...], sigma64 [B]) -> (out [B, D], logz [B]).
RUNNERS = {"reference": _run_reference, "cpu": _run_cpu, "triton": _run_triton, "cuda": _run_cuda}
