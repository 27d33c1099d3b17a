"""Triton kernels of the empirical optimal denoiser (flash-style streaming over the training set).

``out_b = sum_i softmax_i(l_bi) y_i`` with ``l_bi = -|x_b - y_i|^2 / (2 sigma_b^2)`` and
``logz_b = logsumexp_i l_bi``, never materializing [B, N]. Two passes over the training set:

1. ``_max_lower_bound_kernel``: fast logits from an IEEE-fp32 ``tl.dot`` (``-(|x|^2 + |y|^2 - 2 x.y)
   / (2 sigma^2)`` with float64 norms) and a per-pair error bound ``e = 2 k u |x| |y| / (2 sigma^2)``
   give, per query, a lower bound ``L`` of the largest true logit (max of ``l - e``).
2. ``_stream_kernel``: the same fast logits; pairs with ``l + e < L - band`` weigh less than
   ``exp(-band)`` of the largest weight and are dropped; kept pairs whose ``e`` exceeds
   ``rescore_tol`` get exact logits (difference first, float64 accumulation) before the online
   softmax (running max, running sum); ``acc = acc * alpha + P @ Y`` is kept in the fp32 output
   buffer, one D-chunk at a time (D is up to 3072: too large for registers). Tiles whose weights
   are all zero skip the ``P @ Y`` product (small sigma).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (fp32/fp16 there).
N and D are compile-time constants (one compilation per training-set shape): loop bounds taken from
runtime scalars break the interpreter under numpy >= 2.4 (``int()`` of a 1-element array).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # queries per program
BLOCK_N = 32  # training rows per tile
BLOCK_K = 32  # feature chunk of the fast dot product
BLOCK_D = 64  # feature chunk of the accumulator update
BLOCK_E = 8  # feature chunk of the exact (float64) re-scoring


@triton.jit
def _load_rows(ptr, rows, cols, n_rows, n_cols, stride, IS_U8: tl.constexpr):
    """A [len(rows), len(cols)] fp32 block of a row-major matrix (uint8 mapped as u/127.5-1)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    raw = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0)
    if IS_U8:
        val = raw.to(tl.float32) / 127.5 - 1.0
        val = tl.where(mask, val, 0.0)
    else:
        val = raw.to(tl.float32)
    return val


@triton.jit
def _fast_logits(
    x_ptr,
    y_ptr,
    xn_ptr,
    yn_ptr,
    c,
    xnorm,
    offs_m,
    offs_n,
    B,
    N,
    D: tl.constexpr,
    stride_x,
    stride_y,
    err_coef,
    IS_U8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Fast logits [BLOCK_M, BLOCK_N] (float64 from an fp32 dot) and their error bounds."""
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xb = _load_rows(x_ptr, offs_m, offs_k, B, D, stride_x, False)
        yb = _load_rows(y_ptr, offs_n, offs_k, N, D, stride_y, IS_U8)
        g += tl.dot(xb, tl.trans(yb), input_precision="ieee")
    yn = tl.load(yn_ptr + offs_n, mask=offs_n < N, other=0.0)
    xn = tl.load(xn_ptr + offs_m, mask=offs_m < B, other=0.0)
    dist = xn[:, None] + yn[None, :] - 2.0 * g.to(tl.float64)
    logit = -dist * c[:, None]
    err = (2.0 * err_coef) * xnorm[:, None] * tl.sqrt(yn)[None, :] * c[:, None]
    return logit, err


@triton.jit
def _exact_logits(
    x_ptr,
    y_ptr,
    c,
    offs_m,
    offs_n,
    B,
    N,
    D: tl.constexpr,
    stride_x,
    stride_y,
    IS_U8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Exact logits [BLOCK_M, BLOCK_N]: difference first, float64 accumulation."""
    dist = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    for k0 in range(0, D, BLOCK_E):
        offs_k = k0 + tl.arange(0, BLOCK_E)
        xmask = (offs_m[:, None] < B) & (offs_k[None, :] < D)
        xb = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=xmask, other=0).to(tl.float64)
        ymask = (offs_n[:, None] < N) & (offs_k[None, :] < D)
        yraw = tl.load(y_ptr + offs_n[:, None] * stride_y + offs_k[None, :], mask=ymask, other=0)
        if IS_U8:
            yb = tl.where(ymask, yraw.to(tl.float64) / 127.5 - 1.0, 0.0)
        else:
            yb = yraw.to(tl.float64)
        diff = xb[:, None, :] - yb[None, :, :]
        dist += tl.sum(diff * diff, axis=2)
    return -dist * c[:, None]


@triton.jit
def _query_rows(xn_ptr, inv2s2_ptr, B, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M query rows: (offs_m, row_ok, c = 1 / (2 sigma^2), |x|) per row."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    c = tl.load(inv2s2_ptr + offs_m, mask=row_ok, other=1.0)
    xnorm = tl.sqrt(tl.load(xn_ptr + offs_m, mask=row_ok, other=0.0))
    return offs_m, row_ok, c, xnorm


@triton.jit
def _out_chunk(out_ptr, offs_m, row_ok, d0, D: tl.constexpr, stride_out, BLOCK_D: tl.constexpr):
    """Pointers and mask of the [BLOCK_M, BLOCK_D] chunk of the output rows at feature ``d0``."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    return out_ptr + offs_m[:, None] * stride_out + offs_d[None, :], row_ok[:, None] & (offs_d[None, :] < D)


@triton.jit
def _max_lower_bound_kernel(
    x_ptr,
    y_ptr,
    xn_ptr,
    yn_ptr,
    inv2s2_ptr,
    lower_ptr,
    B,
    N: tl.constexpr,
    D: tl.constexpr,
    stride_x,
    stride_y,
    err_coef,
    IS_U8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m, row_ok, c, xnorm = _query_rows(xn_ptr, inv2s2_ptr, B, BLOCK_M)
    lower = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        logit, err = _fast_logits(
            x_ptr,
            y_ptr,
            xn_ptr,
            yn_ptr,
            c,
            xnorm,
            offs_m,
            offs_n,
            B,
            N,
            D,
            stride_x,
            stride_y,
            err_coef,
            IS_U8,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        bound = tl.where((offs_n < N)[None, :], logit - err, -float("inf"))
        lower = tl.maximum(lower, tl.max(bound, axis=1))
    tl.store(lower_ptr + offs_m, lower, mask=row_ok)


@triton.jit
def _stream_kernel(
    x_ptr,
    y_ptr,
    xn_ptr,
    yn_ptr,
    inv2s2_ptr,
    lower_ptr,
    out_ptr,
    logz_ptr,
    B,
    N: tl.constexpr,
    D: tl.constexpr,
    stride_x,
    stride_y,
    stride_out,
    err_coef,
    rescore_tol,
    band,
    IS_U8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    offs_m, row_ok, c, xnorm = _query_rows(xn_ptr, inv2s2_ptr, B, BLOCK_M)
    cut = tl.load(lower_ptr + offs_m, mask=row_ok, other=0.0) - band
    run_max = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float64)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):  # acc = 0 in the output buffer
        optr, omask = _out_chunk(out_ptr, offs_m, row_ok, d0, D, stride_out, BLOCK_D)
        tl.store(optr, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), mask=omask)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        logit, err = _fast_logits(
            x_ptr,
            y_ptr,
            xn_ptr,
            yn_ptr,
            c,
            xnorm,
            offs_m,
            offs_n,
            B,
            N,
            D,
            stride_x,
            stride_y,
            err_coef,
            IS_U8,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        keep = ((logit + err) >= cut[:, None]) & (offs_n < N)[None, :] & row_ok[:, None]
        rescore = keep & (err > rescore_tol)
        if tl.max(rescore.to(tl.int32)) > 0:
            exact = _exact_logits(
                x_ptr, y_ptr, c, offs_m, offs_n, B, N, D, stride_x, stride_y, IS_U8, BLOCK_M, BLOCK_N, BLOCK_E
            )
            logit = tl.where(rescore, exact, logit)
        if tl.max(keep.to(tl.int32)) > 0:
            logit = tl.where(keep, logit, -float("inf"))
            new_max = tl.maximum(run_max, tl.max(logit, axis=1))
            alpha = tl.where(run_max == -float("inf"), 0.0, tl.exp(run_max - new_max))
            safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
            p = tl.where(keep, tl.exp(logit - safe_max[:, None]), 0.0).to(tl.float32)
            run_sum = run_sum * alpha + tl.sum(p.to(tl.float64), axis=1)
            run_max = new_max
            alpha32 = alpha.to(tl.float32)
            for d0 in range(0, D, BLOCK_D):
                optr, omask = _out_chunk(out_ptr, offs_m, row_ok, d0, D, stride_out, BLOCK_D)
                yb = _load_rows(y_ptr, offs_n, d0 + tl.arange(0, BLOCK_D), N, D, stride_y, IS_U8)
                acc = tl.load(optr, mask=omask, other=0.0) * alpha32[:, None]
                acc += tl.dot(p, yb, input_precision="ieee")
                tl.store(optr, acc, mask=omask)
    run_sum = tl.where(row_ok, run_sum, 1.0)  # rows past B: keep them finite (never stored)
    run_max = tl.where(row_ok, run_max, 0.0)
    inv_sum = (1.0 / run_sum).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        optr, omask = _out_chunk(out_ptr, offs_m, row_ok, d0, D, stride_out, BLOCK_D)
        tl.store(optr, tl.load(optr, mask=omask, other=0.0) * inv_sum[:, None], mask=omask)
    tl.store(logz_ptr + offs_m, (run_max + tl.log(run_sum)).to(tl.float32), mask=row_ok)


def _row_sqnorms_f64(rows: torch.Tensor, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """|r|^2 per row in float64 (uint8 as u/127.5-1), converted chunk by chunk (memory O(chunk))."""
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
    step = max(1, chunk_elements // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].to(torch.float64)
        if rows.dtype == torch.uint8:
            block = block / 127.5 - 1.0
        out[start : start + step] = block.square().sum(1)
    return out


def empirical_denoise_triton(
    x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, *, err_coef_fn, rescore_tol: float, band: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, D] (fp32/fp16/bf16), train [N, D] (fp32/fp16/bf16 or uint8), both contiguous, sigma64
    [B] float64 -> (out [B, D] fp32, logz [B] fp32). ``err_coef_fn(D)`` gives ``k u`` of the fp32
    dot error bound."""
    batch, dim = x.shape
    rows = train.shape[0]
    is_u8 = train.dtype == torch.uint8
    x_sqnorm = x.to(torch.float64).square().sum(1)
    y_sqnorm = _row_sqnorms_f64(train)
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    err_coef = float(err_coef_fn(dim))
    lower = torch.empty(batch, dtype=torch.float64, device=x.device)
    out = torch.empty(batch, dim, dtype=torch.float32, device=x.device)
    logz = torch.empty(batch, dtype=torch.float32, device=x.device)
    grid = (math.ceil(batch / BLOCK_M),)
    # the operands both passes read (the second also writes out and logz), and the block sizes
    operands = (x, train, x_sqnorm, y_sqnorm, inv2s2, lower)
    shapes = (batch, rows, dim, x.stride(0), train.stride(0))
    blocks = dict(IS_U8=is_u8, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    _max_lower_bound_kernel[grid](*operands, *shapes, err_coef, **blocks)
    _stream_kernel[grid](
        *operands,
        out,
        logz,
        *shapes,
        out.stride(0),
        err_coef,
        float(rescore_tol),
        float(band),
        **blocks,
        BLOCK_D=BLOCK_D,
        BLOCK_E=BLOCK_E,
    )
    return out, logz
