"""Small helpers shared by the closed-form denoisers (pure torch, safe under torch.func transforms)."""

from __future__ import annotations

import torch

from diffcore._checks import check_tensor, sigma_per_row

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_input(x, dim: int, name: str = "x") -> torch.Tensor:
    """Check a denoiser input ``x`` [B, ...] whose trailing dimensions hold ``dim`` numbers."""
    check_tensor(name, x, min_ndim=2, dtypes=FLOAT_DTYPES)
    flat = x[0].numel()
    if flat != dim:
        raise ValueError(
            f"{name}: expected {dim} numbers per sample (shape [B, ...] with prod(...) = {dim}), "
            f"got shape {tuple(x.shape)}"
        )
    return x


def sigma_column(sigma, batch: int, device: torch.device, dtype: torch.dtype, name: str = "sigma") -> torch.Tensor:
    """``sigma`` (scalar, 0-d or [B], every value > 0) as a column [B, 1] of ``dtype``."""
    return sigma_per_row(name, sigma, batch, device).to(dtype)[:, None]


def sigma_column_allow_zero(sigma, batch: int, device: torch.device, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Like :func:`sigma_column` but accepting 0 (for the end point of an exact flow)."""
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma == 0:
        return torch.zeros(batch, 1, dtype=dtype, device=device)
    if isinstance(sigma, torch.Tensor):
        s = sigma.detach().to(device=device, dtype=torch.float64)
        s = s.expand(batch) if s.dim() == 0 else s
        if s.dim() != 1 or s.shape[0] != batch:
            raise ValueError(f"{name}: expected a scalar or shape [{batch}], got shape {tuple(sigma.shape)}")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"{name}: expected finite values >= 0")
        return s.to(dtype)[:, None]
    return sigma_column(sigma, batch, device, dtype, name)
