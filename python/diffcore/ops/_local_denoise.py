"""Analytic local denoisers: ELS, LS, PSPC and masked same-location posteriors, as one exact op.

Each output pixel is a posterior mean over a set of training keys, weighted by
``softmax(-|query - key|^2 / (2 sigma^2))`` over ALL its keys (a streamed log-sum-exp over
training tiles; nothing is truncated). The kinds (definitions with citations in
docs/local_denoise.md and in ``diffcore.ref.local_denoise``):

- ``els``: every P x P patch of every training image at every location (Kamb & Ganguli 2025, ELS
  machine); ``padding="zeros"`` with the boundary-broken dictionaries, or ``"circular"``.
- ``ls``: the same-location patch of every training image (Kamb & Ganguli 2025, LS machine).
- ``pspc``: full posterior means of every valid P x P square over the same-location training crops,
  averaged over the squares covering each pixel (Niedoba et al. 2025).
- ``mask``: a per-pixel query precision ``[H*W, H*W]`` (binary or soft) with same-location sources
  (Lukoianov et al. 2025's data-derived locality; :func:`wiener_masks` builds their masks).

Memory of the fast backends: O(B C H W + tile); the [N, H, W, C P^2] key tensor is never formed.
The op is not differentiable (computed under ``torch.no_grad()``).

This module holds the checks, the backend resolution and the table of runners; the CPU host code
is in ``_local_denoise_cpu.py``, the CUDA launchers in ``_local_denoise_cuda.py``, the Triton kernels
in ``diffcore/kernels/local_denoise.py``.
"""

from __future__ import annotations

import torch

from diffcore._backend import OpBackends
from diffcore._checks import (
    check_finite,
    check_same_device,
    check_tensor,
    check_training_set,
    sigma_per_row,
)
from diffcore.ops import _local_denoise_cpu as _cpu, _local_denoise_cuda as _cuda

__all__ = ["local_denoise", "wiener_masks"]

BACKENDS = OpBackends(
    op="local_denoise",
    implemented=("reference", "cpu", "cuda", "triton"),
    # triton passes the interpreter tests but has not run on a GPU; the CUDA kernel has only been
    # compiled, never run: both stay out of auto (ask for them by name).
    auto_order={"cpu": ("cpu", "reference"), "cuda": ("reference",)},
)

KINDS = ("els", "ls", "pspc", "mask")
PADDINGS = ("zeros", "circular")
# Smallest sigma taken: 1/(2 sigma^2) (float64 in every kernel) and the logit differences stay far
# inside the float64 range; below it the nearest key is the answer anyway, so smaller sigmas are refused.
MIN_SIGMA = 1e-18

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRAIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)


def local_denoise(
    x: torch.Tensor,
    train: torch.Tensor,
    sigma,
    *,
    kind: str = "els",
    patch_size=3,
    padding: str = "zeros",
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Local (patch-posterior) denoiser of a training set.

    Args:
        x: noisy images [B, C, H, W] (VE: ``x = x0 + sigma n``): float32 (any backend),
            float16/bfloat16 (computed in fp32), float64 (reference backend only).
        train: training images [N, C, H, W], float, or uint8 mapped to [-1, 1] as ``u8 / 127.5 - 1``;
            on x's device. Not checked for NaN (cost).
        sigma: noise level > ``MIN_SIGMA``: a float or a tensor [B] (per-sample).
        kind: 'els', 'ls', 'pspc' or 'mask'.
        patch_size: odd P >= 1 (els, ls, pspc; pspc needs P <= min(H, W)); an int, or a sequence /
            tensor [B] of odd ints (per-sample P: the batch is split by P).
        padding: 'zeros' or 'circular' (els, ls).
        mask: query precisions [H*W, H*W] (kind 'mask'): row q weighs each pixel p's squared
            difference in pixel q's logit; >= 0, binary or soft.
        backend: 'auto', 'reference', 'cpu', 'cuda' or 'triton'.
    Returns:
        x0_hat [B, C, H, W] in x's dtype. Not differentiable (computed under no_grad).
    """
    x, train, sigma64, sizes, mask = _validate(x, train, sigma, kind, patch_size, padding, mask)
    name = BACKENDS.resolve(backend, x.device)
    if name != "reference" and x.dtype == torch.float64:
        raise TypeError(f"x: float64 is supported by backend 'reference' only (backend {name!r} computes in fp32)")
    out = torch.empty(x.shape, dtype=torch.float64 if name == "reference" else torch.float32, device=x.device)
    with torch.no_grad():
        for size in sorted(set(sizes)):
            rows = torch.tensor([i for i, s in enumerate(sizes) if s == size], device=x.device)
            out[rows] = RUNNERS[name](x[rows], train, sigma64[rows], kind, size, padding, mask).to(out.dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"sigma: the weights could not be computed at sigma down to {float(sigma64.min()):g} "
            f"(use a larger sigma), or train holds NaN/Inf"
        )
    return out.to(x.dtype)


def _validate(x, train, sigma, kind, patch_size, padding, mask):
    check_tensor("x", x, ndim=4, dtypes=_X_DTYPES)
    check_tensor("train", train, ndim=4, dtypes=_TRAIN_DTYPES)
    check_training_set(train, x, "x")
    device = check_same_device(x=x, train=train)
    check_finite("x", x)
    sigma64 = sigma_per_row("sigma", sigma, x.shape[0], device)
    if bool((sigma64 < MIN_SIGMA).any()):
        raise ValueError(f"sigma: expected values >= {MIN_SIGMA:g}, got min {float(sigma64.min()):g}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding: expected 'zeros' or 'circular', got {padding!r}")
    height, width = x.shape[2], x.shape[3]
    sizes = _patch_sizes(patch_size, x.shape[0])
    if kind == "pspc" and max(sizes) > min(height, width):
        raise ValueError(
            f"patch_size: pspc needs P <= min(H, W) = {min(height, width)} (valid squares), got {max(sizes)}"
        )
    if kind == "mask":
        check_tensor("mask", mask, ndim=2, dtypes=(torch.float32, torch.float64, torch.bool))
        if tuple(mask.shape) != (height * width, height * width):
            raise ValueError(
                f"mask: expected shape [{height * width}, {height * width}] ([H*W, H*W]), got {tuple(mask.shape)}"
            )
        check_finite("mask", mask)
        if bool((mask < 0).any()):
            raise ValueError("mask: expected values >= 0 (query precisions)")
        mask = mask.to(torch.float64).cpu()
    elif mask is not None:
        raise ValueError(f"mask: only used with kind='mask', got a mask with kind={kind!r}")
    return x, train, sigma64, sizes, mask


def _patch_sizes(patch_size, batch: int) -> list[int]:
    if isinstance(patch_size, torch.Tensor):
        patch_size = patch_size.tolist()
    values = [patch_size] * batch if isinstance(patch_size, int) else list(patch_size)
    if len(values) != batch:
        raise ValueError(f"patch_size: expected an int or {batch} values (one per sample), got {len(values)}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
            raise ValueError(f"patch_size: expected odd integers >= 1, got {value!r}")
    return values


def wiener_masks(train: torch.Tensor, sigma: float, threshold: float, *, rule: str = "row") -> torch.Tensor:
    """Binary query masks [H*W, H*W] from the Wiener filter of a training set (Lukoianov et al. 2025).

    The optimal linear denoiser of the data at noise level sigma is ``mu + W (x - mu)`` with
    ``W = S (S + sigma^2 I)^-1`` (S the covariance of the C*H*W pixels). Its row for output pixel q
    says how much each input pixel p moves the output: ``|W|`` per pixel pair (the largest over the
    channel pairs) is thresholded per row, relative to that row's largest entry:
    ``mask[q, p] = |W|[q, p] >= threshold * max_p' |W|[q, p']`` (``rule="row"``).

    ``rule="public"`` is the rule of the paper's public code (ottogin/locality-in-diffusion-models,
    ``pca_locality.py``, whose ``mask_threshold`` is 0.02): each row n of W divided by its diagonal
    entry ``W[n, n]`` (on the C*H*W dimension), then one threshold for the whole matrix,
    ``threshold * max |W[n, m] / W[n, n]|``; output pixel m reads column m of that matrix (the code
    computes ``delta @ mask``). With C > 1 a pixel pair is kept when any channel pair is
    (the public code keeps channels apart; the op's masks are per pixel). docs/local_denoise.md.

    Args:
        train: [N, C, H, W] float or uint8 (``u8 / 127.5 - 1``).
        sigma: noise level > 0.
        threshold: in (0, 1]: the fraction of each row's largest ``|W|`` a pixel must reach
            (``rule="public"``: of the whole diagonal-normalized matrix's largest entry).
        rule: ``"row"`` (default) or ``"public"`` (see above).
    Returns:
        float32 [H*W, H*W] of 0/1 (every row holds at least its largest entry; the row of a pixel
        that is constant over the training set, where W's row is 0, holds that pixel alone).
    """
    check_tensor("train", train, ndim=4, dtypes=_TRAIN_DTYPES)
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma: expected a float > 0, got {sigma!r}")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold: expected a float in (0, 1], got {threshold!r}")
    if rule not in ("row", "public"):
        raise ValueError(f"rule: expected 'row' or 'public', got {rule!r}")
    n, c, h, w = train.shape
    rows = train.cpu().to(torch.float64).reshape(n, -1)
    if train.dtype == torch.uint8:
        rows = rows / 127.5 - 1.0
    centred = rows - rows.mean(dim=0)
    cov = centred.T @ centred / n
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    filt = torch.linalg.solve(cov + sigma**2 * eye, cov).T  # S symmetric: (S + s^2 I)^-1 S = W^T
    if rule == "public":
        return _public_code_masks(filt, threshold, c, h * w)
    magnitude = filt.abs().reshape(c, h * w, c, h * w).amax(dim=(0, 2))
    row_max = magnitude.amax(dim=1, keepdim=True)
    masks = (magnitude >= threshold * row_max) & (row_max > 0)
    masks |= (row_max == 0) & torch.eye(h * w, dtype=torch.bool)  # a constant pixel: W's row is 0; keep q itself
    return masks.to(torch.float32)


def _public_code_masks(filt: torch.Tensor, threshold: float, channels: int, pixels: int) -> torch.Tensor:
    """The public code's binary masks from the Wiener filter ``filt`` [C*H*W, C*H*W] (float64), as
    the op's [H*W, H*W] (row = output pixel): rows divided by their diagonal (a zero diagonal by 1),
    one threshold relative to the largest entry, transposed (output m reads column m)."""
    diagonal = torch.diagonal(filt).clone().unsqueeze(1)
    diagonal[diagonal.abs() < 1e-6] = 1.0  # the public code's eps
    normalized = (filt / diagonal).abs()
    kept = normalized >= threshold * normalized.max()
    per_pixel = kept.reshape(channels, pixels, channels, pixels).any(dim=2).any(dim=0)  # [in p, out m]
    masks = per_pixel.T.clone()
    masks |= ~masks.any(dim=1, keepdim=True) & torch.eye(pixels, dtype=torch.bool)  # never an empty row
    return masks.to(torch.float32)


def _run_reference(x, train, sigma64, kind, patch, padding, mask):
    from diffcore.ref.local_denoise import local_denoise_ref

    return local_denoise_ref(x, train, sigma64, kind=kind, patch_size=patch, padding=padding, mask=mask)


def _run_cpu(x, train, sigma64, kind, patch, padding, mask):
    xf = x.to(torch.float32).contiguous()
    if train.dtype not in (torch.float32, torch.uint8):
        train = train.to(torch.float32)
    if kind == "els":  # shifted box sums where they take fewer operations than direct distances
        if _cpu.els_uses_box(x.shape[2], x.shape[3], x.shape[1], patch, padding):
            return _cpu.run_box(xf, train, sigma64, kind, patch, padding)
        return _cpu.run_els(xf, train, sigma64, patch, padding)
    if kind in ("ls", "pspc"):  # unit-weight square supports: box sums (cost independent of P)
        return _cpu.run_box(xf, train, sigma64, kind, patch, padding)
    batch, channels, height, width = x.shape
    means = _cpu.run_same_location(xf, train, sigma64, _cpu.mask_supports(mask))
    return _same_location_result(means, kind, batch, channels, height, width, patch)


def _supports(kind, height, width, patch, padding, mask) -> _cpu.Supports:
    """The query precisions and output pixels of the same-location kinds."""
    if kind == "pspc":
        return _cpu.pspc_supports(height, width, patch)
    return _cpu.ls_supports(height, width, patch, padding) if kind == "ls" else _cpu.mask_supports(mask)


def _same_location_result(means, kind, batch, channels, height, width, patch) -> torch.Tensor:
    """Posterior means [B, outputs, C] -> x0_hat [B, C, H, W] (pspc: averaged over the squares)."""
    if kind == "pspc":
        return _pspc_composite(means, batch, channels, height, width, patch)
    return means.permute(0, 2, 1).reshape(batch, channels, height, width)


def _pspc_composite(
    means: torch.Tensor, batch: int, channels: int, height: int, width: int, patch: int
) -> torch.Tensor:
    """Per-square posterior means [B, S * P * P, C] (squares row-major) -> the per-pixel average of
    the squares covering each pixel [B, C, H, W] (Niedoba et al. 2025)."""
    squares_h, squares_w = height - patch + 1, width - patch + 1
    crops = means.reshape(batch, squares_h * squares_w, patch * patch, channels)
    columns = crops.permute(0, 3, 2, 1).reshape(batch, channels * patch * patch, squares_h * squares_w)
    fold = torch.nn.functional.fold
    total = fold(columns.double(), (height, width), patch)
    count = fold(
        torch.ones(1, patch * patch, squares_h * squares_w, dtype=torch.float64, device=means.device),
        (height, width),
        patch,
    )
    return (total / count).to(torch.float32)


def _run_triton(x, train, sigma64, kind, patch, padding, mask):
    from diffcore.kernels.local_denoise import els_triton, same_location_triton

    xf = x.to(torch.float32).contiguous()
    yf = _cpu.as_float32(train).contiguous()
    if kind == "els":
        return els_triton(xf, yf, sigma64, patch, padding)
    batch, channels, height, width = x.shape
    supports = _supports(kind, height, width, patch, padding, mask)
    locations = supports.offsets.shape[0] - 1
    rows = torch.arange(locations).repeat_interleave(supports.offsets[1:] - supports.offsets[:-1])
    precision = torch.zeros(locations, height * width, dtype=torch.float32)
    precision.index_put_((rows, supports.index.long()), supports.weight, accumulate=True)  # repeats add up
    out_pixels = supports.out_index.reshape(locations, -1)
    means = same_location_triton(xf, yf, sigma64, precision.to(x.device), out_pixels.to(x.device))
    return _same_location_result(means, kind, batch, channels, height, width, patch)


def _run_cuda(x, train, sigma64, kind, patch, padding, mask):
    xf = x.to(torch.float32).contiguous()
    if train.dtype not in (torch.float32, torch.uint8):
        train = train.to(torch.float32)
    if kind == "els":
        return _cuda.run_els(xf, train, sigma64, patch, padding)
    batch, channels, height, width = x.shape
    means = _cuda.run_same_location(xf, train, sigma64, _supports(kind, height, width, patch, padding, mask))
    return _same_location_result(means, kind, batch, channels, height, width, patch)


# Backend name -> runner(x, train, sigma64 [B], kind, patch, padding, mask) -> x0_hat [B, C, H, W].
RUNNERS = {"reference": _run_reference, "cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}
