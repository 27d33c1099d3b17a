"""Conversions shared by the references (no other diffcore imports)."""

from __future__ import annotations

import torch


def rows_as_float(t: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``t`` [N, ...] as [N, D] floats. uint8 images map to [-1, 1] as ``u8 / 127.5 - 1``."""
    rows = t.reshape(t.shape[0], -1)
    if rows.dtype == torch.uint8:
        return rows.to(dtype) / 127.5 - 1.0
    return rows.to(dtype)


def exact_sqdist(x: torch.Tensor, y: torch.Tensor, max_elements: int = 1 << 25) -> torch.Tensor:
    """Squared distances [B, N] between rows of x [B, D] and y [N, D], computed as difference
    first, then square (no |x|^2 + |y|^2 - 2 x.y cancellation), in chunks of y's rows."""
    out = torch.empty(x.shape[0], y.shape[0], dtype=x.dtype, device=x.device)
    chunk = max(1, max_elements // max(1, x.shape[0] * x.shape[1]))
    for start in range(0, y.shape[0], chunk):
        block = y[start : start + chunk]
        out[:, start : start + chunk] = (x[:, None, :] - block[None, :, :]).square().sum(-1)
    return out
