"""Reference of the empirical optimal denoiser of a training set (float64).

``D*(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i`` (PAPERS.md, EDM substrate), the
denoiser that reproduces the training set exactly: a model equal to it has memorized.
"""
from __future__ import annotations

import torch

from diffcore.ref._pixels import exact_sqdist, rows_as_float


def empirical_denoise_ref(x: torch.Tensor, train: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical denoiser and log-normalizer in float64.

    Args:
        x: noisy inputs [B, ...].
        train: training set [N, ...] (same trailing shape), float or uint8 (``u8 / 127.5 - 1``).
        sigma: noise level, a float or a tensor of shape [B] (or 0-d).
    Returns:
        ``(x0_hat [B, ...] float64, logz [B] float64)`` with
        ``logz = logsumexp_i(-|x - y_i|^2 / (2 sigma^2))``.
    """
    xb = rows_as_float(x)
    yb = rows_as_float(train).to(xb.device)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=xb.device).reshape(-1)
    s = s.expand(xb.shape[0]) if s.numel() == 1 else s
    logits = -exact_sqdist(xb, yb) / (2.0 * s[:, None] ** 2)
    logz = torch.logsumexp(logits, dim=1)
    weights = torch.exp(logits - logz[:, None])
    return (weights @ yb).reshape(x.shape), logz
