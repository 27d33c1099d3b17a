"""The ``cuda`` backend of attention: CUDA C++ forward and fused forward + JVP kernels in
``diffcore._C`` (csrc/attention/attention.cu). Shapes [B, H, L, Dh]; fp32/fp16/bf16 CUDA tensors.

Its backward is the Triton one (diffcore.kernels.attention). Never run on a GPU yet: not in the
``auto`` order (docs/attention.md).
"""

from __future__ import annotations

from typing import overload

import torch

from diffcore._ext import dtype_name, extension
from diffcore.ops._launch import cuda_launch_args, ptr


@overload
def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...
@overload
def _flat(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None: ...
def _flat(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype).reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _launch(q, k, v, scale, tq=None, tk=None, tv=None, jvp=False):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dt = q.dtype
    qf, kf, vf = _flat(q, dt), _flat(k, dt), _flat(v, dt)
    tqf, tkf, tvf = _flat(tq, dt), _flat(tk, dt), _flat(tv, dt)
    o = torch.empty_like(qf)
    t_o = torch.empty_like(qf) if jvp else None
    lse = torch.empty(b * h, lq, dtype=torch.float32, device=q.device)
    extension().attention_forward(
        dtype=dtype_name(dt),
        q=ptr(qf),
        k=ptr(kf),
        v=ptr(vf),
        tq=ptr(tqf),
        tk=ptr(tkf),
        tv=ptr(tvf),
        o=ptr(o),
        to=ptr(t_o),
        lse=ptr(lse),
        bh=b * h,
        lq=lq,
        lk=lk,
        d=d,
        scale=float(scale),
        jvp=jvp,
        **cuda_launch_args(q),
    )
    shape = (b, h, lq, d)
    return o.reshape(shape), lse.reshape(b, h, lq), (t_o.reshape(shape) if t_o is not None else None)


def forward(q, k, v, scale: float):
    """``(O [B, H, Lq, Dh], lse [B, H, Lq] fp32)``."""
    o, lse, _ = _launch(q, k, v, scale)
    return o, lse


def forward_jvp(q, k, v, tq, tk, tv, scale: float):
    """``(O, tO)`` from the fused kernel (online softmax). Tangents may be None."""
    o, _, t_o = _launch(q, k, v, scale, tq, tk, tv, jvp=True)
    return o, t_o


def jvp(q, k, v, tq, tk, tv, scale: float, out=None, lse=None):
    """tO: the fused kernel recomputes O (it has no saved-lse variant)."""
    return forward_jvp(q, k, v, tq, tk, tv, scale)[1]
