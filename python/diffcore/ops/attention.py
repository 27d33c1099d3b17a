# TEMPORARY placeholder, replaced by the attn branch at merge.
#
# This file exists only on the `unet` branch so that diffcore.models can be built and tested
# before the real fused op lands. It is a plain matmul-softmax formula, differentiable by
# ordinary autograd, so torch.func.jvp / vmap / backward all work through it. The lead discards
# it at merge in favour of the attn branch's diffcore.ops.attention (same signature).
"""Scaled dot-product attention (temporary placeholder; see the header comment)."""
from __future__ import annotations

import math

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for q, k, v of shape [B, H, L, Dh] -> [B, H, L, Dh].

    ``scale`` defaults to ``1 / sqrt(Dh)``. The softmax runs in at least fp32.
    ``backend`` is accepted for signature compatibility and ignored here.
    """
    del backend
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2)) * scale
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, v.to(compute_dtype)).to(q.dtype)
