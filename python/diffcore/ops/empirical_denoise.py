"""Empirical optimal denoiser of a training set, streamed over training tiles.

``D*(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i`` (PAPERS.md; the denoiser that
reproduces the training set exactly) and its log-normalizer
``logz = logsumexp_i(-|x - y_i|^2 / (2 sigma^2))``. No backend materializes the [B, N] logits: each
streams over training tiles with a running log-sum-exp, in memory O(B*D + tile).

Numerics (DESIGN.md): fast distances ``|x|^2 + |y|^2 - 2 x.y`` (a GEMM) carry an error of about
``k u |x| |y|`` that ``1 / (2 sigma^2)`` magnifies. Every fast backend bounds that error per pair and
re-scores, with exact distances (difference first, double accumulation), the pairs that may carry
weight and whose logit error could exceed a tolerance. At small sigma this returns the nearest
training image (or the right mixture at near-ties) to fp32 accuracy.

The op is not differentiable: it runs under ``torch.no_grad()`` and returns tensors without
autograd history.
"""
from __future__ import annotations

import math

import torch

from diffcore._backend import OpBackends
from diffcore._checks import check_finite, check_same_device, check_tensor, sigma_per_row
from diffcore._ext import dtype_name, extension

__all__ = ["empirical_denoise", "empirical_denoise_with_logz"]

BACKENDS = OpBackends(
    op="empirical_denoise",
    implemented=("reference", "cpu", "cuda", "triton"),
    # cuda: the Triton kernel passes the interpreter tests but has not run on a GPU yet; the CUDA
    # kernel has only been compiled, never run: it stays out of auto (ask for backend="cuda").
    auto_order={"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")},
)

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRAIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)

# Logit tolerances shared by the fast backends (DESIGN.md Numerics).
# A pair whose logit upper bound lies BAND below the running lower bound of the max weighs less than
# exp(-BAND) ~ 1e-26 of the largest weight: it is dropped.
BAND = 60.0
# A pair that may carry weight is re-scored exactly when its logit error bound exceeds this: a
# relative weight error of at most about RESCORE_TOL by the (conservative) bound; the errors
# actually made are about 10x smaller (see gemm_error_coefficient), and largely average out.
RESCORE_TOL = 1e-5
FP32_UNIT_ROUNDOFF = 2.0 ** -24
FP64_PER_FP32_ROUNDOFF = 2.0 ** -29  # u(float64) / u(float32)
BF16_SCREEN_MIN_DIM = 256  # below this the fp32 GEMM is cheap next to the rest
BOUND_ONLY = -2  # rescore_budget value: first pass of tile_update (lower bound of the max only)
COUNT_ONLY = -3  # rescore_budget value: only count the pairs that would be re-scored


def gemm_error_coefficient(dim: int) -> float:
    """``k u`` in the bound ``|fl(x.y) - x.y| <= k u |x| |y|`` of an fp32 GEMM over ``dim`` terms.

    Empirical, not worst case (that is ``dim * u``): blocked BLAS accumulation keeps the error near
    ``u |x| |y|``. Measured with torch's fp32 GEMM at dim 3072: at most 1.6 u |x||y| for x close to
    y, at most 0.44 u |x||y| for noise-dominated x, 0.06 on average. k = 2, plus a margin growing
    like a random walk beyond dim 4096.
    """
    return max(2.0, 2.0 * math.sqrt(dim / 4096.0)) * FP32_UNIT_ROUNDOFF


def bf16_gemm_error_coefficient(dim: int) -> float:
    """``k`` in ``|G~ - x.y| <= k |x| |y|`` for a bf16 GEMM (inputs rounded to bf16, fp32
    accumulation, result rounded to bf16), by Cauchy-Schwarz on ``sum |x_k y_k|``: input rounding
    ``2 u + u^2`` (u = 2^-9; uint8 rows are decoded in fp32 first, 2^-23 more), worst-case fp32
    accumulation ``dim * 2^-24``, output rounding ``u``, with 1% to spare."""
    unit = 2.0 ** -9
    return 1.01 * (3 * unit + unit * unit + 2.0 ** -23 + dim * FP32_UNIT_ROUNDOFF * (1 + 3 * unit))


def empirical_denoise(x: torch.Tensor, train: torch.Tensor, sigma, *, backend: str = "auto") -> torch.Tensor:
    """Empirical optimal denoiser ``sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i``.

    Args:
        x: noisy inputs [B, ...]: float32 (any backend), float16/bfloat16 (computed in fp32),
            float64 (reference backend only).
        train: training set [N, ...] with the trailing shape of ``x``; float, or uint8 images mapped
            to [-1, 1] as ``u8 / 127.5 - 1``. Must be on x's device. Not checked for NaN (cost).
        sigma: noise level > 0, a float or a tensor of shape [B] (or 0-d).
        backend: 'auto', 'reference', 'cpu', 'cuda' or 'triton'.
    Returns:
        x0_hat [B, ...] in x's dtype. Not differentiable (computed under no_grad).
    """
    return empirical_denoise_with_logz(x, train, sigma, backend=backend)[0]


def empirical_denoise_with_logz(x: torch.Tensor, train: torch.Tensor, sigma, *,
                                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical denoiser and its log-normalizer.

    Returns:
        ``(x0_hat [B, ...] in x's dtype, logz [B])`` with
        ``logz = logsumexp_i(-|x - y_i|^2 / (2 sigma^2))``; logz is float32 (float64 for float64 x).
    See :func:`empirical_denoise` for the arguments.
    """
    x, train, sigma64 = _validate(x, train, sigma)
    name = BACKENDS.resolve(backend, x.device)
    if name != "reference" and x.dtype == torch.float64:
        raise TypeError(f"x: float64 is supported by backend 'reference' only (backend {name!r} computes in fp32)")
    with torch.no_grad():
        out, logz = _RUNNERS[name](x, train, sigma64)
    logz_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return out.to(x.dtype).reshape(x.shape), logz.to(logz_dtype)


def _validate(x, train, sigma):
    check_tensor("x", x, min_ndim=1, dtypes=_X_DTYPES)
    check_tensor("train", train, min_ndim=1, dtypes=_TRAIN_DTYPES, nonempty=False)
    if train.shape[0] == 0 or train.numel() == 0:
        raise ValueError(f"train: expected at least one training row, got shape {tuple(train.shape)}")
    if tuple(train.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"train: expected trailing shape {tuple(x.shape[1:])} (that of x), "
                         f"got {tuple(train.shape[1:])} (train shape {tuple(train.shape)})")
    device = check_same_device(x=x, train=train)
    if isinstance(sigma, torch.Tensor) and sigma.device != device:
        raise ValueError(f"sigma: expected a tensor on {device} (that of x), got {sigma.device}")
    check_finite("x", x)
    sigma64 = sigma_per_row("sigma", sigma, x.shape[0], device)
    return x, train, sigma64


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


# ---------------------------------------------------------------- reference (float64, pure torch)
def _run_reference(x, train, sigma64):
    from diffcore.ref.empirical_denoise import empirical_denoise_ref

    return empirical_denoise_ref(x, train, sigma64)


# ---------------------------------------------------------------- cpu (torch GEMM tiles + C++)
def cpu_tile_rows(batch: int, rows: int, dim: int, train_dtype: torch.dtype, screen: bool = False) -> int:
    """Training rows per tile on the CPU: the [B, T] weight tile stays under 2 MiB, the [T, D]
    bf16 screening buffer (``screen``) under 4 MiB, the [T, D] fp32 decode buffer of uint8 / non-fp32
    training sets under 8 MiB; at least 64 rows so that the GEMM stays efficient, at most N."""
    tile = max(64, (2 << 20) // (4 * batch))
    if screen:
        tile = min(tile, max(64, (4 << 20) // (2 * dim)))
    if train_dtype != torch.float32:
        tile = min(tile, max(64, (8 << 20) // (4 * dim)))
    return int(min(rows, tile, 4096))


def _run_cpu(x, train, sigma64, tile_rows: int | None = None, screen: bool = True):
    ext = extension()
    xr = _rows(x).to(torch.float32).contiguous()
    batch, dim = xr.shape
    y = _rows(train)
    if y.dtype not in (torch.float32, torch.uint8):
        y = y.to(torch.float32)  # float16/bfloat16/float64 training sets: one fp32 copy
    y = y.contiguous()
    rows = y.shape[0]
    threads = torch.get_num_threads()
    y_dtype = dtype_name(y.dtype)

    x_sqnorm = torch.empty(batch, dtype=torch.float64)
    ext.empirical_denoise_row_sqnorms(xr.data_ptr(), "float32", batch, dim, dim, x_sqnorm.data_ptr(), threads)
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    y_sqnorm = torch.empty(rows, dtype=torch.float64)
    ext.empirical_denoise_row_sqnorms(y.data_ptr(), y_dtype, rows, dim, dim, y_sqnorm.data_ptr(), threads)

    run_max = torch.full((batch,), -math.inf, dtype=torch.float64)
    run_max_lower = torch.full((batch,), -math.inf, dtype=torch.float64)
    run_sum = torch.zeros(batch, dtype=torch.float64)
    scale = torch.empty(batch, dtype=torch.float32)
    acc = torch.zeros(batch, dim, dtype=torch.float32)

    screen = screen and dim >= BF16_SCREEN_MIN_DIM
    tile = tile_rows or cpu_tile_rows(batch, rows, dim, train.dtype, screen)
    g_buffer = torch.empty(batch * tile, dtype=torch.float32)  # fp32 Gram tile, then the weights P
    convert_buffer = _LazyBuffer(tile * dim, torch.float32) if y.dtype == torch.uint8 else None
    # Gram precision per tile, in this order, moving on when a tile would need too many exact
    # re-scorings: bf16 screening (small sigma: few pairs carry weight), fp32, fp64 (mid sigma).
    mode = "bf16" if screen else "fp32"
    screen_gram = _Bf16Gram(xr, tile, threads) if mode == "bf16" else None
    precise_gram = None
    if screen:
        # First pass (bf16, cheap): a lower bound of every row's largest logit over the whole set,
        # so that the second pass keeps only real candidates from the first tile on. When already
        # the first tile keeps most pairs (large sigma: dense weights), screening cannot help.
        for start in range(0, rows, tile):
            count = min(tile, rows - start)
            y_tile = y[start:start + count]
            gram = screen_gram.gram(y_tile)
            args = (gram.data_ptr(), "bfloat16", count, g_buffer.data_ptr(), batch, count, xr.data_ptr(), dim, dim,
                    x_sqnorm.data_ptr(), inv2s2.data_ptr(), y_tile.data_ptr(), y_dtype, dim,
                    y_sqnorm[start:].data_ptr(), bf16_gemm_error_coefficient(dim), RESCORE_TOL, BAND)
            state = (run_max.data_ptr(), run_max_lower.data_ptr(), run_sum.data_ptr(), scale.data_ptr(), threads)
            ext.empirical_denoise_tile_update(*args, BOUND_ONLY, *state)
            if start == 0 and ext.empirical_denoise_tile_update(*args, COUNT_ONLY, *state)[1] * 2 > batch * count:
                mode, screen_gram = "fp32", None  # run_max_lower keeps tile 0's bound: still valid
                break
    for start in range(0, rows, tile):
        count = min(tile, rows - start)
        y_tile = y[start:start + count]
        state = (run_max.data_ptr(), run_max_lower.data_ptr(), run_sum.data_ptr(), scale.data_ptr(), threads)
        common = (xr.data_ptr(), dim, dim, x_sqnorm.data_ptr(), inv2s2.data_ptr(), y_tile.data_ptr(), y_dtype, dim,
                  y_sqnorm[start:].data_ptr())
        p = g_buffer[:batch * count].view(batch, count)
        y_float = None
        nonzero = -1
        if mode == "bf16":
            gram = screen_gram.gram(y_tile)
            nonzero, _ = ext.empirical_denoise_tile_update(
                gram.data_ptr(), "bfloat16", count, p.data_ptr(), batch, count, *common,
                bf16_gemm_error_coefficient(dim), RESCORE_TOL, BAND, batch * count // 64, *state)
            if nonzero < 0:
                mode, screen_gram = "fp32", None
        if mode == "fp32":
            y_float = _tile_as_float32(y_tile, convert_buffer)
            torch.mm(xr, y_float.t(), out=p)
            nonzero, _ = ext.empirical_denoise_tile_update(
                p.data_ptr(), "float32", count, p.data_ptr(), batch, count, *common, gemm_error_coefficient(dim),
                RESCORE_TOL, BAND, batch * count // 16, *state)
            if nonzero < 0:  # most pairs carry weight AND need exact logits (mid sigma, large D)
                mode, precise_gram = "fp64", _PreciseGram(xr, tile)
        if mode == "fp64":
            gram = precise_gram.gram(y_tile)
            nonzero, _ = ext.empirical_denoise_tile_update(
                gram.data_ptr(), "float64", count, p.data_ptr(), batch, count, *common,
                gemm_error_coefficient(dim) * FP64_PER_FP32_ROUNDOFF, RESCORE_TOL, BAND, -1, *state)
        if nonzero * 16 < batch * count:  # few weights (small sigma): skip the second GEMM
            ext.empirical_denoise_sparse_accumulate(p.data_ptr(), count, batch, count, scale.data_ptr(),
                                                    y_tile.data_ptr(), y_dtype, dim, dim, acc.data_ptr(), dim,
                                                    threads)
        else:
            if y_float is None:
                y_float = _tile_as_float32(y_tile, convert_buffer)
            acc.mul_(scale[:, None]).addmm_(p, y_float)
    out = acc.div_(run_sum.to(torch.float32)[:, None])
    logz = run_max + torch.log(run_sum)
    return out, logz


class _LazyBuffer:
    """A flat buffer allocated on first use (the uint8 -> fp32 tile buffer is only needed when a
    tile leaves the bf16 screening)."""

    def __init__(self, numel: int, dtype: torch.dtype):
        self.numel, self.dtype, self.tensor = numel, dtype, None

    def get(self) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = torch.empty(self.numel, dtype=self.dtype)
        return self.tensor


def _tile_as_float32(y_tile: torch.Tensor, convert_buffer: _LazyBuffer | None) -> torch.Tensor:
    """A training tile [T, D] as float32: a view for float32 rows, else u8 / 127.5 - 1 in the buffer."""
    if convert_buffer is None:
        return y_tile
    count, dim = y_tile.shape
    out = convert_buffer.get()[:count * dim].view(count, dim)
    extension().empirical_denoise_decode_rows(y_tile.data_ptr(), "uint8", count, dim, out.data_ptr(), "float32",
                                              torch.get_num_threads())
    return out


class _Bf16Gram:
    """x . y from a bfloat16 GEMM (bf16 inputs, fp32 accumulation, bf16 result): 4-6x faster than
    fp32 here, used to find the few pairs that carry weight at small sigma (each then re-scored
    exactly). The tile is decoded into one reused [T, D] bf16 buffer, each value rounded once from
    its exact value (uint8 included)."""

    def __init__(self, xr: torch.Tensor, tile: int, threads: int):
        self.x16 = xr.to(torch.bfloat16)
        self.buffer = torch.empty(tile * xr.shape[1], dtype=torch.bfloat16)
        self.out = torch.empty(xr.shape[0] * tile, dtype=torch.bfloat16)
        self.threads = threads

    def gram(self, y_tile: torch.Tensor) -> torch.Tensor:
        count, dim = y_tile.shape
        y16 = self.buffer[:count * dim].view(count, dim)
        extension().empirical_denoise_decode_rows(y_tile.data_ptr(), dtype_name(y_tile.dtype), count, dim,
                                                  y16.data_ptr(), "bfloat16", self.threads)
        out = self.out[:self.x16.shape[0] * count].view(self.x16.shape[0], count)
        return torch.mm(self.x16, y16.t(), out=out)


class _PreciseGram:
    """x . y in float64 for one tile at a time, converting the tile in chunks of rows so that the
    float64 copy stays under 4 MiB. Used where most pairs carry weight and the fp32 bound is too
    loose to keep their logits (mid sigma at image sizes): cheaper than exact re-scoring."""

    def __init__(self, xr: torch.Tensor, tile: int):
        self.x64 = xr.to(torch.float64)
        self.buffer = torch.empty(xr.shape[0] * tile, dtype=torch.float64)
        self.chunk = max(16, (4 << 20) // (8 * xr.shape[1]))

    def gram(self, y_tile: torch.Tensor) -> torch.Tensor:
        count = y_tile.shape[0]
        out = self.buffer[:self.x64.shape[0] * count].view(self.x64.shape[0], count)
        for c0 in range(0, count, self.chunk):
            block = y_tile[c0:c0 + self.chunk].to(torch.float64)
            if y_tile.dtype == torch.uint8:
                block.div_(127.5).sub_(1.0)
            out[:, c0:c0 + block.shape[0]] = self.x64 @ block.t()
        return out


# ---------------------------------------------------------------- triton
def _run_triton(x, train, sigma64):
    from diffcore.kernels.empirical_denoise import empirical_denoise_triton

    return empirical_denoise_triton(_rows(x), _rows(train), sigma64, err_coef_fn=gemm_error_coefficient,
                                    rescore_tol=RESCORE_TOL, band=BAND)


# ---------------------------------------------------------------- cuda (C++ kernels in _C)
def cuda_splits(batch: int, rows: int, query_group: int = 16, target_blocks: int = 264) -> int:
    """How many contiguous training ranges the CUDA kernel splits the set into (flash-decoding
    style): enough (query group, range) blocks to fill the GPU when B is small."""
    groups = -(-batch // query_group)
    return int(max(1, min(rows, -(-target_blocks // groups), 64)))


def _run_cuda(x, train, sigma64):
    ext = extension()
    xr = _rows(x).contiguous()
    y = _rows(train)
    if y.dtype == torch.float64:
        y = y.to(torch.float32)
    y = y.contiguous()
    batch, dim = xr.shape
    rows = y.shape[0]
    splits = cuda_splits(batch, rows)
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    work_acc = torch.empty(splits, batch, dim, dtype=torch.float32, device=x.device)
    work_m = torch.empty(splits, batch, dtype=torch.float64, device=x.device)
    work_s = torch.empty(splits, batch, dtype=torch.float64, device=x.device)
    out = torch.empty(batch, dim, dtype=xr.dtype, device=x.device)
    logz = torch.empty(batch, dtype=torch.float32, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    ext.empirical_denoise_cuda_forward(xr.data_ptr(), dtype_name(xr.dtype), y.data_ptr(), dtype_name(y.dtype),
                                       inv2s2.data_ptr(), batch, rows, dim, splits, work_acc.data_ptr(),
                                       work_m.data_ptr(), work_s.data_ptr(), out.data_ptr(), logz.data_ptr(),
                                       x.device.index or 0, stream)
    return out, logz


_RUNNERS = {"reference": _run_reference, "cpu": _run_cpu, "triton": _run_triton, "cuda": _run_cuda}
