"""Triton kernels of the local denoisers (ELS, and the same-location kinds LS / PSPC / mask).

Each program streams over ALL the keys of its queries with an online softmax (running max, running
sum, rescaled accumulator), so that neither the [N, H, W, C P^2] keys nor the [queries, keys]
logits exist. Distances are accumulated in float64, difference first (as the CPU kernels do).

1. ``_els_kernel``: BLOCK_Q query pixels (flattened b*H*W + i*W + j) against the keys (n, p) of
   every training image, BLOCK_K at a time; a key takes part when its row and column lie in the
   query's dictionary ranges ([lo, hi) per row and column: all of them for circular padding, the
   boundary-broken dictionaries for zero padding). Patches are gathered from padded images.
2. ``_same_location_kernel``: one query location (b, l) against the training images, BLOCK_K at a
   time; the logit of image n is ``-sum_p prec[l, p] sum_c (x[b, c, p] - y[n, c, p])^2 / (2 sigma^2)``
   with a dense query-precision row, and the values are the pixels ``out_pix[l, :]`` of image n.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. Sizes that bound loops are
compile-time constants (runtime loop bounds break the interpreter under numpy >= 2.4).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_Q = 16
BLOCK_K = 32


@triton.jit
def _els_kernel(
    xq_ptr,
    y_ptr,
    inv2s2_ptr,
    row_lo_ptr,
    row_hi_ptr,
    col_lo_ptr,
    col_hi_ptr,
    out_ptr,
    Q,
    N: tl.constexpr,
    C: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    PH: tl.constexpr = H + P - 1
    PW: tl.constexpr = W + P - 1
    R: tl.constexpr = P // 2
    HW: tl.constexpr = H * W
    pid = tl.program_id(0)
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Q
    b = offs_q // HW
    qi = (offs_q % HW) // W
    qj = offs_q % W
    c_half = tl.load(inv2s2_ptr + b, mask=q_ok, other=1.0)
    rlo = tl.load(row_lo_ptr + qi, mask=q_ok, other=0)
    rhi = tl.load(row_hi_ptr + qi, mask=q_ok, other=0)
    clo = tl.load(col_lo_ptr + qj, mask=q_ok, other=0)
    chi = tl.load(col_hi_ptr + qj, mask=q_ok, other=0)
    offs_c = tl.arange(0, BLOCK_C)
    run_max = tl.full((BLOCK_Q,), -float("inf"), dtype=tl.float64)
    run_sum = tl.zeros((BLOCK_Q,), dtype=tl.float64)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float64)
    for k0 in range(0, N * HW, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < N * HW
        n = offs_k // HW
        ki = (offs_k % HW) // W
        kj = offs_k % W
        valid = (
            q_ok[:, None]
            & k_ok[None, :]
            & (ki[None, :] >= rlo[:, None])
            & (ki[None, :] < rhi[:, None])
            & (kj[None, :] >= clo[:, None])
            & (kj[None, :] < chi[:, None])
        )
        dist = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float64)
        for t in range(C * P * P):
            ch = t // (P * P)
            di = (t // P) % P
            dj = t % P
            xv = tl.load(xq_ptr + ((b * C + ch) * PH + qi + di) * PW + qj + dj, mask=q_ok, other=0.0)
            yv = tl.load(y_ptr + ((n * C + ch) * PH + ki + di) * PW + kj + dj, mask=k_ok, other=0.0)
            diff = xv.to(tl.float64)[:, None] - yv.to(tl.float64)[None, :]
            dist += diff * diff
        logit = tl.where(valid, -dist * c_half[:, None], -float("inf"))
        new_max = tl.maximum(run_max, tl.max(logit, axis=1))
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
        alpha = tl.where(run_max == -float("inf"), 0.0, tl.exp(run_max - safe_max))
        p = tl.where(valid, tl.exp(logit - safe_max[:, None]), 0.0)
        centre = tl.load(
            y_ptr + ((n[:, None] * C + offs_c[None, :]) * PH + ki[:, None] + R) * PW + kj[:, None] + R,
            mask=k_ok[:, None] & (offs_c[None, :] < C),
            other=0.0,
        ).to(tl.float64)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * centre[None, :, :], axis=1)
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        run_max = new_max
    run_sum = tl.where(q_ok, run_sum, 1.0)
    out = acc / run_sum[:, None]
    tl.store(
        out_ptr + offs_q[:, None] * C + offs_c[None, :], out.to(tl.float32), mask=q_ok[:, None] & (offs_c[None, :] < C)
    )


@triton.jit
def _same_location_kernel(
    x_ptr,
    y_ptr,
    inv2s2_ptr,
    prec_ptr,
    out_pix_ptr,
    out_ptr,
    L,
    N: tl.constexpr,
    C: tl.constexpr,
    HW: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // L
    loc = pid % L
    c_half = tl.load(inv2s2_ptr + b)
    offs_v = tl.arange(0, BLOCK_V)
    v_ok = offs_v < OUT * C
    out_pix = tl.load(out_pix_ptr + loc * OUT + offs_v // C, mask=v_ok, other=0)
    out_ch = offs_v % C
    run_max = tl.full((1,), -float("inf"), dtype=tl.float64)
    run_sum = tl.zeros((1,), dtype=tl.float64)
    acc = tl.zeros((BLOCK_V,), dtype=tl.float64)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        dist = tl.zeros((BLOCK_K,), dtype=tl.float64)
        for t in range(HW * C):
            pix = t // C
            ch = t % C
            prec = tl.load(prec_ptr + loc * HW + pix).to(tl.float64)
            xv = tl.load(x_ptr + (b * C + ch) * HW + pix).to(tl.float64)
            yv = tl.load(y_ptr + (offs_n * C + ch) * HW + pix, mask=n_ok, other=0.0).to(tl.float64)
            diff = xv - yv
            dist += prec * diff * diff
        logit = tl.where(n_ok, -dist * c_half, -float("inf"))
        new_max = tl.maximum(run_max, tl.max(logit, axis=0))
        alpha = tl.where(run_max == -float("inf"), 0.0, tl.exp(run_max - new_max))
        p = tl.where(n_ok, tl.exp(logit - new_max), 0.0)
        vals = tl.load(
            y_ptr + (offs_n[:, None] * C + out_ch[None, :]) * HW + out_pix[None, :],
            mask=n_ok[:, None] & v_ok[None, :],
            other=0.0,
        ).to(tl.float64)
        acc = acc * alpha + tl.sum(p[:, None] * vals, axis=0)
        run_sum = run_sum * alpha + tl.sum(p, axis=0)
        run_max = new_max
    tl.store(out_ptr + pid * OUT * C + offs_v, (acc / run_sum).to(tl.float32), mask=v_ok)


def els_triton(x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, patch: int, padding: str) -> torch.Tensor:
    """x [B, C, H, W] float32, train [N, C, H, W] float32 (decoded) -> ELS x0_hat [B, C, H, W] float32."""
    from diffcore.ops._local_denoise_cpu import key_ranges, pad_images

    batch, channels, height, width = x.shape
    r = patch // 2
    xq = pad_images(x, r, padding)
    y = pad_images(train, r, padding)
    row_lo, row_hi = (t.to(x.device) for t in key_ranges(height, patch, padding))
    col_lo, col_hi = (t.to(x.device) for t in key_ranges(width, patch, padding))
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    queries = batch * height * width
    out = torch.empty(queries, channels, dtype=torch.float32, device=x.device)
    grid = (math.ceil(queries / BLOCK_Q),)
    _els_kernel[grid](
        xq,
        y,
        inv2s2,
        row_lo,
        row_hi,
        col_lo,
        col_hi,
        out,
        queries,
        N=train.shape[0],
        C=channels,
        H=height,
        W=width,
        P=patch,
        BLOCK_C=triton.next_power_of_2(channels),
        BLOCK_Q=BLOCK_Q,
        BLOCK_K=BLOCK_K,
    )
    return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


def same_location_triton(
    x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, precision: torch.Tensor, out_pixels: torch.Tensor
) -> torch.Tensor:
    """x [B, C, H, W] float32, train [N, C, H, W] float32, query precisions [L, H*W] float32, output
    pixels [L, OUT] int32 -> posterior means [B, L * OUT, C] float32."""
    batch, channels, height, width = x.shape
    locations, outs = out_pixels.shape
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    out = torch.empty(batch, locations * outs, channels, dtype=torch.float32, device=x.device)
    _same_location_kernel[(batch * locations,)](
        x.contiguous(),
        train.contiguous(),
        inv2s2,
        precision.contiguous(),
        out_pixels.contiguous(),
        out,
        locations,
        N=train.shape[0],
        C=channels,
        HW=height * width,
        OUT=outs,
        BLOCK_V=triton.next_power_of_2(outs * channels),
        BLOCK_K=BLOCK_K,
    )
    return out
