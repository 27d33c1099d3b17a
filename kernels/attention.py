"""Triton kernels of attention: forward, fused forward + JVP, JVP from the saved log-sum-exp, and
FlashAttention-2 backward (dK/dV and dQ kernels).

Layout [B, H, L, Dh] (any strides along L and Dh); one program per (block of BLOCK_M query rows,
batch*head). Head dims that are not powers of two (e.g. 96) are padded to BLOCK_D and masked; so
are sequence lengths that are not multiples of the blocks. The softmax state (running max, row sum)
and every accumulator are fp32; the products with P run in the input dtype (fp32 inputs use IEEE
fp32 products, not TF32).

JVP (docs/design.md, Numerics; Lu & Song 2024, App. F): with tS = (tq k^T + q tk^T) * scale,
    tO = P tv + (P * tS) v - rowsum(P * tS) * O.
Fused (online softmax): accumulators A = sum p~ v, At = sum p~ tv + (p~ * tS) v and r = sum p~ * tS,
all rescaled by exp(m_old - m_new) when the running max m grows; at the end O = A / l and
tO = At / l - (r / l) * O. From a saved lse (after the forward kernel): p = exp(s - lse) exactly,
no rescaling, and O is read back.

Backward (Dao 2023, Alg. 2): delta = rowsum(dO * O); P = exp(S - lse);
dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ = dS K * scale, dK = dS^T Q * scale.

Import this module lazily (it imports triton). On CPU tensors it runs under TRITON_INTERPRET=1.
Lq, Lk and Dh are compile-time constants (one compilation per shape): loop bounds taken from
runtime scalars break the interpreter under numpy >= 2.4 (``int()`` of a 1-element array).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@triton.jit
def _load_block(ptr, offs_rows, offs_d, stride_l, n_rows, head_dim):
    mask = (offs_rows[:, None] < n_rows) & (offs_d[None, :] < head_dim)
    return tl.load(ptr + offs_rows[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _fwd_jvp_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    TQ,
    TK,
    TV,
    TO,
    stride_qb,
    stride_ql,
    stride_kb,
    stride_kl,
    stride_ob,
    stride_ol,
    scale,
    Lq: tl.constexpr,
    Lk: tl.constexpr,
    head_dim: tl.constexpr,
    HAS_TQ: tl.constexpr,
    HAS_TK: tl.constexpr,
    HAS_TV: tl.constexpr,
    JVP: tl.constexpr,
    USE_LSE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Forward (JVP=False), fused forward+JVP (JVP=True, USE_LSE=False) or JVP from the saved
    LSE and O (JVP=True, USE_LSE=True). Q/TQ/O/TO strides: stride_qb/ob per batch*head, *_l per row
    (the last axis is contiguous); K/V/TK/TV share stride_kb, stride_kl. LSE: [BH, Lq] contiguous."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    q = _load_block(Q + bh * stride_qb, offs_m, offs_d, stride_ql, Lq, head_dim)
    if HAS_TQ:
        tq = _load_block(TQ + bh * stride_qb, offs_m, offs_d, stride_ql, Lq, head_dim)
    qk_scale = scale * LOG2E
    if USE_LSE:
        m_i = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=0.0) * LOG2E
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    k_base = bh * stride_kb
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        k = _load_block(K + k_base, cols, offs_d, stride_kl, Lk, head_dim)
        v = _load_block(V + k_base, cols, offs_d, stride_kl, Lk, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if USE_LSE:
            p = tl.exp2(s - m_i[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if JVP:
                acc_t = acc_t * alpha[:, None]
                r_i = r_i * alpha
            m_i = m_new
            acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if JVP:
            t_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_TQ:
                t_s += tl.dot(tq, tl.trans(k), input_precision=PRECISION)
            if HAS_TK:
                tk = _load_block(TK + k_base, cols, offs_d, stride_kl, Lk, head_dim)
                t_s += tl.dot(q, tl.trans(tk), input_precision=PRECISION)
            p_ts = p * (t_s * scale)
            r_i += tl.sum(p_ts, axis=1)
            acc_t += tl.dot(p_ts.to(v.dtype), v, input_precision=PRECISION)
            if HAS_TV:
                tv = _load_block(TV + k_base, cols, offs_d, stride_kl, Lk, head_dim)
                acc_t += tl.dot(p.to(tv.dtype), tv, input_precision=PRECISION)
    out_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    o_ptrs = offs_m[:, None] * stride_ol + offs_d[None, :]
    if USE_LSE:
        o = tl.load(O + bh * stride_ob + o_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        t_o = acc_t - r_i[:, None] * o
    else:
        o = acc / l_i[:, None]
        tl.store(O + bh * stride_ob + o_ptrs, o.to(O.dtype.element_ty), mask=out_mask)
        tl.store(LSE + bh * Lq + offs_m, (m_i + tl.log2(l_i)) / LOG2E, mask=row_ok)
        t_o = acc_t / l_i[:, None] - (r_i / l_i)[:, None] * o
    if JVP:
        tl.store(TO + bh * stride_ob + o_ptrs, t_o.to(TO.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_query_rows(Q, DO, LSE, DELTA, bh, rows, offs_d, stride_qb, stride_ql, Lq, head_dim):
    """q, dO [len(rows), BLOCK_D] and lse (times log2 e), delta [len(rows)] of the query rows ``rows``."""
    row_ok = rows < Lq
    q = _load_block(Q + bh * stride_qb, rows, offs_d, stride_ql, Lq, head_dim)
    do = _load_block(DO + bh * stride_qb, rows, offs_d, stride_ql, Lq, head_dim)
    lse = tl.load(LSE + bh * Lq + rows, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh * Lq + rows, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _bwd_probs(q, k, lse, mask, qk_scale, PRECISION: tl.constexpr):
    """P = exp(S - lse) of one block, 0 outside ``mask`` (Dao 2023, Alg. 2)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    return tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _bwd_ds(p, do, v, delta, PRECISION: tl.constexpr):
    """dS = P * (dO V^T - delta) of one block (Dao 2023, Alg. 2)."""
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p * (dp - delta[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    stride_qb,
    stride_ql,
    stride_kb,
    stride_kl,
    scale,
    Lq: tl.constexpr,
    Lk: tl.constexpr,
    head_dim: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK, dV for one block of BLOCK_N keys, looping over all query blocks."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_block(K + bh * stride_kb, offs_n, offs_d, stride_kl, Lk, head_dim)
    v = _load_block(V + bh * stride_kb, offs_n, offs_d, stride_kl, Lk, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = scale * LOG2E
    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + offs_m
        q, do, lse, delta = _bwd_query_rows(Q, DO, LSE, DELTA, bh, rows, offs_d, stride_qb, stride_ql, Lq, head_dim)
        p = _bwd_probs(q, k, lse, (rows < Lq)[:, None], qk_scale, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        ds = _bwd_ds(p, do, v, delta, PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < head_dim)
    ptrs = bh * stride_kb + offs_n[:, None] * stride_kl + offs_d[None, :]
    tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_ql,
    stride_kb,
    stride_kl,
    scale,
    Lq: tl.constexpr,
    Lk: tl.constexpr,
    head_dim: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries, looping over all key blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse, delta = _bwd_query_rows(Q, DO, LSE, DELTA, bh, offs_m, offs_d, stride_qb, stride_ql, Lq, head_dim)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * LOG2E
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        k = _load_block(K + bh * stride_kb, cols, offs_d, stride_kl, Lk, head_dim)
        v = _load_block(V + bh * stride_kb, cols, offs_d, stride_kl, Lk, head_dim)
        ds = _bwd_ds(_bwd_probs(q, k, lse, (cols < Lk)[None, :], qk_scale, PRECISION), do, v, delta, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < head_dim)
    tl.store(
        DQ + bh * stride_qb + offs_m[:, None] * stride_ql + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=mask,
    )


# ---------------------------------------------------------------------------------------- launchers


def _blocks(head_dim: int, device: torch.device) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, launch options): fixed choices (no autotuning: same result
    every run). Software pipelining is limited for wide heads so that the key/value (and tangent)
    tiles fit shared memory at fp32 (JVP: 4 tiles of BLOCK_N x BLOCK_D, at most 128 KiB per stage;
    not tuned: never run on a GPU yet)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":  # interpreter: few, large programs
        return 32, 32, block_d, {}
    if block_d <= 64:
        return 128, 64, block_d, {"num_warps": 4, "num_stages": 2}
    if block_d <= 128:
        return 64, 32, block_d, {"num_warps": 4, "num_stages": 2}
    return 64, 32, block_d, {"num_warps": 8, "num_stages": 1}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _flat(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, H, L, D] -> contiguous [B*H, L, D] in ``dtype`` (free when it already is)."""
    return None if x is None else x.to(dtype).reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _launch_fwd(q, k, v, scale, tq=None, tk=None, tv=None, out=None, lse=None, jvp=False):
    """Run ``_fwd_jvp_kernel``; every [B*H, L, D] operand contiguous, so q-side tensors share one
    set of strides and k-side tensors another."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dt = q.dtype
    qf, kf, vf = _flat(q, dt), _flat(k, dt), _flat(v, dt)
    tqf, tkf, tvf = _flat(tq, dt), _flat(tk, dt), _flat(tv, dt)
    use_lse = out is not None
    if use_lse:
        o = _flat(out, dt)
        lse_f = lse.reshape(b * h, lq).float().contiguous()
    else:
        o = torch.empty(b * h, lq, d, dtype=dt, device=q.device)
        lse_f = torch.empty(b * h, lq, dtype=torch.float32, device=q.device)
    t_o = torch.empty_like(o) if jvp else o
    bm, bn, bd, launch = _blocks(d, q.device)
    _fwd_jvp_kernel[(triton.cdiv(lq, bm), b * h)](
        qf,
        kf,
        vf,
        o,
        lse_f,
        qf if tqf is None else tqf,
        kf if tkf is None else tkf,
        vf if tvf is None else tvf,
        t_o,
        qf.stride(0),
        qf.stride(1),
        kf.stride(0),
        kf.stride(1),
        o.stride(0),
        o.stride(1),
        float(scale),
        lq,
        lk,
        d,
        HAS_TQ=tqf is not None,
        HAS_TK=tkf is not None,
        HAS_TV=tvf is not None,
        JVP=jvp,
        USE_LSE=use_lse,
        PRECISION=_precision(dt),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        **launch,
    )
    shape4 = (b, h, lq, d)
    return o.reshape(shape4), lse_f.reshape(b, h, lq), (t_o.reshape(shape4) if jvp else None)


def forward(q, k, v, scale: float):
    """``(O [B, H, Lq, Dh] in q.dtype, lse [B, H, Lq] fp32)``."""
    o, lse, _ = _launch_fwd(q, k, v, scale)
    return o, lse


def forward_jvp(q, k, v, tq, tk, tv, scale: float):
    """``(O, tO, lse)`` in one fused pass (online softmax). Tangents may be None."""
    o, lse, t_o = _launch_fwd(q, k, v, scale, tq, tk, tv, jvp=True)
    return o, t_o, lse


def jvp(q, k, v, tq, tk, tv, scale: float, out, lse):
    """tO [B, H, Lq, Dh] from the saved output and log-sum-exp (no rescaling pass)."""
    _, _, t_o = _launch_fwd(q, k, v, scale, tq, tk, tv, out=out, lse=lse, jvp=True)
    return t_o


def backward(q, k, v, out, lse, d_out, scale: float, need=(True, True, True)):
    """``(dq, dk, dv)`` [B, H, L, Dh] in the input dtypes (FlashAttention-2)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dt = q.dtype
    qf, kf, vf, dof = _flat(q, dt), _flat(k, dt), _flat(v, dt), _flat(d_out, dt)
    lse_f = lse.reshape(b * h, lq).float().contiguous()
    delta = (dof.float() * _flat(out, torch.float32)).sum(-1).contiguous()  # rowsum(dO * O)
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    bm, bn, bd, launch = _blocks(d, q.device)
    common = dict(PRECISION=_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **launch)
    strides = (qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), float(scale), lq, lk, d)
    if need[1] or need[2]:
        _bwd_dkdv_kernel[(triton.cdiv(lk, bn), b * h)](qf, kf, vf, dof, lse_f, delta, dk, dv, *strides, **common)
    if need[0]:
        _bwd_dq_kernel[(triton.cdiv(lq, bm), b * h)](qf, kf, vf, dof, lse_f, delta, dq, *strides, **common)
    return (
        dq.reshape(q.shape) if need[0] else None,
        dk.reshape(k.shape) if need[1] else None,
        dv.reshape(v.shape) if need[2] else None,
    )
