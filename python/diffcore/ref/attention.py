"""Reference of scaled dot-product attention, its JVP and its VJP (pure torch, float64-capable).

Shapes: ``q`` [B, H, Lq, Dh], ``k`` [B, H, Lk, Dh], ``v`` [B, H, Lk, Dh] -> ``o`` [B, H, Lq, Dh].

    S = q k^T * scale,   P = softmax_rows(S),   O = P v                      (Vaswani et al. Eq. 1)

Forward-mode derivative (Lu & Song, "Simplifying, stabilizing and scaling continuous-time
consistency models", App. F), with tangents tq, tk, tv:

    tS = (tq k^T + q tk^T) * scale
    tP = P * (tS - rowsum(P * tS))
    tO = tP v + P tv = P tv + (P * tS) v - rowsum(P * tS) * O

Reverse mode (FlashAttention-2, Dao 2023, Alg. 2), with cotangent dO:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),
    dQ = dS K * scale,   dK = dS^T Q * scale

Low-precision inputs (float16, bfloat16) are computed in float32 (softmax included) and the
result is cast back; float64 stays float64. ``attention_math`` is plain PyTorch at the input dtype,
the "what a user would write" baseline whose error sets the tolerances of the tests.
"""

from __future__ import annotations

import torch


def default_scale(head_dim: int) -> float:
    """The usual softmax temperature 1 / sqrt(Dh)."""
    return float(head_dim) ** -0.5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """P = softmax(q k^T * scale) along the key axis: [B, H, Lq, Lk]."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    ct = compute_dtype(tensors[0].dtype)
    return [t.to(ct) for t in tensors]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v: [B, H, Lq, Dh] x [B, H, Lk, Dh] x [B, H, Lk, Dh] -> [B, H, Lq, Dh].

    Differentiable by autograd and by ``torch.func`` (forward and reverse mode).
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    qc, kc, vc = _upcast(q, k, v)
    return torch.matmul(_probs(qc, kc, scale), vc).to(q.dtype)


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Row log-sum-exp of the scores, logsumexp_j(q_i . k_j * scale): [B, H, Lq] in float32/64."""
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    qc, kc = _upcast(q, k)
    return torch.logsumexp(torch.matmul(qc, kc.transpose(-1, -2)) * scale, dim=-1)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch attention entirely at the input dtype (no upcast): the error baseline."""
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    return torch.matmul(_probs(q, k, scale), v)


def attention_jvp_ref(q, k, v, tq, tk, tv, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O, tO)``: the output and its directional derivative along ``(tq, tk, tv)``, written out.

    Tangents may be None (a zero tangent). Shapes as for ``attention_ref``.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    qc, kc, vc = _upcast(q, k, v)
    ct = qc.dtype
    p = _probs(qc, kc, scale)
    o = torch.matmul(p, vc)
    t_s = torch.zeros_like(p)
    if tq is not None:
        t_s = t_s + torch.matmul(tq.to(ct), kc.transpose(-1, -2))
    if tk is not None:
        t_s = t_s + torch.matmul(qc, tk.to(ct).transpose(-1, -2))
    p_ts = p * (t_s * scale)
    t_o = torch.matmul(p_ts, vc) - p_ts.sum(dim=-1, keepdim=True) * o
    if tv is not None:
        t_o = t_o + torch.matmul(p, tv.to(ct))
    return o.to(q.dtype), t_o.to(q.dtype)


def attention_vjp_ref(q, k, v, d_o, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``: the gradients of <dO, attention(q, k, v)>, written out (FlashAttention-2)."""
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    qc, kc, vc, doc = _upcast(q, k, v, d_o)
    p = _probs(qc, kc, scale)
    o = torch.matmul(p, vc)
    dv = torch.matmul(p.transpose(-1, -2), doc)
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    ds = p * (dp - (doc * o).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
