"""Noise-level schedules in the VE/EDM convention ``x = x0 + sigma * n``.

Every function returns a float64 CPU tensor of sigmas, strictly descending; the sampling grids end
with an appended 0 (``append_zero=True``), the grid samplers integrate into.
"""

from __future__ import annotations

import math

import torch

from diffcore import _checks


def _finish(sigmas: torch.Tensor, append_zero: bool) -> torch.Tensor:
    sigmas = sigmas.to(torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(
            f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max (finite), got {sigma_min!r}, {sigma_max!r}"
        )


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, *, append_zero: bool = True
) -> torch.Tensor:
    """EDM's schedule (Karras et al. 2022, Eq. 5): ``sigma_i = (sigma_max^(1/rho) + i/(n-1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for i < n, then 0. Shape [n+1] (or [n])."""
    _checks.check_positive_int("n", n)
    _check_range(sigma_min, sigma_max)
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho: expected a finite value > 0, got {rho!r}")
    if n == 1:
        return _finish(torch.tensor([float(sigma_max)]), append_zero)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact end points
    return _finish(sigmas, append_zero)


def uniform_time_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, *, append_zero: bool = True
) -> torch.Tensor:
    """Steps uniform in time for EDM's ``sigma(t) = t``: sigmas evenly spaced from sigma_max down
    to sigma_min, then 0. Shape [n+1]."""
    _checks.check_positive_int("n", n)
    _check_range(sigma_min, sigma_max)
    if n == 1:
        return _finish(torch.tensor([float(sigma_max)]), append_zero)
    return _finish(torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64), append_zero)


def vp_time_sigmas(
    n: int, beta_min: float = 0.1, beta_d: float = 19.9, epsilon_s: float = 1e-3, *, append_zero: bool = True
) -> torch.Tensor:
    """Continuous VP-SDE (Song et al. 2021) with steps uniform in time, EDM Table 1 "VP":
    ``t_i = 1 + i/(n-1) (epsilon_s - 1)``, ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
    _checks.check_positive_int("n", n)
    t = torch.linspace(1.0, epsilon_s, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    return _finish(torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t)), append_zero)


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """``alphas_cumprod`` [T] float64 of a discrete DDPM schedule.

    ``linear``: betas evenly spaced from beta_start to beta_end (Ho et al. 2020).
    ``scaled_linear``: sqrt(betas) evenly spaced (Stable Diffusion).
    ``cosine``: Nichol & Dhariwal 2021 Eq. 17, ``abar(t) = f(t)/f(0)``,
    ``f(t) = cos((t/T + s)/(1 + s) * pi/2)^2``, s = 0.008, betas clipped at 0.999
    (diffusers' ``squaredcos_cap_v2``).
    """
    _checks.check_positive_int("num_train_timesteps", num_train_timesteps, minimum=2)
    T = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    elif beta_schedule == "cosine":

        def f(t):
            return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule: expected linear, scaled_linear or cosine, got {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VP -> VE noise levels: ``sigma = sqrt((1 - abar) / abar)`` (x_ve = x_vp / sqrt(abar))."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if abar.dim() != 1 or abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()):
        raise ValueError("alphas_cumprod: expected a 1-d tensor with values in (0, 1)")
    return torch.sqrt((1.0 - abar) / abar)


def vp_sigmas(
    n: int,
    alphas_cumprod: torch.Tensor | None = None,
    *,
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    spacing: str = "trailing",
    append_zero: bool = True,
) -> torch.Tensor:
    """Sigmas of ``n`` of the discrete timesteps of a VP/DDPM schedule, descending, then 0.

    ``alphas_cumprod`` defaults to ``ddpm_alphas_cumprod(num_train_timesteps, beta_schedule)``.
    ``spacing`` picks the timesteps as diffusers names it: ``trailing`` (T-1 down in even strides,
    always including T-1), ``leading`` (0, T/n, ... reversed), ``linspace`` (round(linspace(0,
    T-1, n)) reversed).
    """
    _checks.check_positive_int("n", n)
    abar = (
        ddpm_alphas_cumprod(num_train_timesteps, beta_schedule)
        if alphas_cumprod is None
        else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    )
    train_sigmas = sigmas_from_alphas_cumprod(abar)
    T = train_sigmas.numel()
    if n > T:
        raise ValueError(f"n: expected at most {T} steps (the schedule's timesteps), got {n}")
    if spacing == "trailing":
        t = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)).long() - 1
    elif spacing == "leading":
        t = (torch.arange(n, dtype=torch.int64) * (T // n)).flip(0)
    elif spacing == "linspace":
        t = torch.round(torch.linspace(0, T - 1, n, dtype=torch.float64)).long().flip(0)
    else:
        raise ValueError(f"spacing: expected trailing, leading or linspace, got {spacing!r}")
    return _finish(train_sigmas[t], append_zero)
