"""Float64 reference of the fused sampler step (the update arithmetic of each ODE/SDE solver).

Every solver step of ``diffcore.sampler`` is an affine combination of at most four tensors with
per-step scalar coefficients (VE/EDM convention ``x = x0 + sigma * n``):

    x_next = c_x * x + c_denoised * denoised + c_extra * extra + c_noise * noise

where ``extra`` is the second denoiser output the solver needs (Heun: the denoised value at the
predicted point; DPM-Solver++ 2M: the previous step's denoised value) and ``noise`` is standard
normal noise (stochastic DDIM, EDM churn). The coefficients depend on the schedule only, so they
are computed once per schedule into a small ``[steps, 4]`` float64 table; the kernels then read
four scalars per step and touch each element once.

This module holds (a) the affine step in float64 and (b) the textbook form of each update
(``textbook_step``), against which the coefficient formulas of ``diffcore.ops`` (the op's
``step_coefficients``) are tested. It shares no code with them and imports nothing of diffcore.
"""

from __future__ import annotations

import math

import torch

# Column order of a coefficient row / table.
C_X, C_DENOISED, C_EXTRA, C_NOISE = 0, 1, 2, 3
KINDS = ("euler", "heun", "dpmpp_2m", "ddim", "churn")


def sampler_step_ref(
    x: torch.Tensor,
    denoised: torch.Tensor,
    coefficients,
    extra: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused step in float64: ``c_x x + c_denoised D + c_extra E + c_noise z`` (result in
    float64). ``coefficients`` is a row of 4 numbers; ``extra``/``noise`` may be None when their
    coefficient is 0."""
    c = [float(v) for v in (coefficients.tolist() if isinstance(coefficients, torch.Tensor) else coefficients)]
    out = c[C_X] * x.double() + c[C_DENOISED] * denoised.double()
    if extra is not None and c[C_EXTRA] != 0.0:
        out = out + c[C_EXTRA] * extra.double()
    if noise is not None and c[C_NOISE] != 0.0:
        out = out + c[C_NOISE] * noise.double()
    return out


def textbook_step(
    kind: str,
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    extra: torch.Tensor | None = None,
    sigma_prev: float | None = None,
    noise: torch.Tensor | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Each update in the form its paper writes it, float64 (the check on the coefficients).

    ``heun``: ``extra`` is D(x_pred; sigma_next). ``dpmpp_2m``: ``extra`` is the previous
    denoised value and ``sigma_prev`` the previous sigma. ``churn``: ``sigma_next`` is sigma_hat.
    """
    x, d = x.double(), denoised.double()
    if kind == "euler":
        return x + (sigma_next - sigma) * (x - d) / sigma  # EDM Alg. 1 line 5
    if kind == "heun":
        x_pred = x + (sigma_next - sigma) * (x - d) / sigma  # EDM Alg. 1 line 5
        if sigma_next == 0.0:
            return x_pred
        d_next = _required(extra, "extra", kind).double()  # D(x_pred; sigma_next)
        d_prime = (x_pred - d_next) / sigma_next  # EDM Alg. 1 line 7
        return x + (sigma_next - sigma) * (0.5 * (x - d) / sigma + 0.5 * d_prime)  # line 8
    if kind == "dpmpp_2m":
        if sigma_next == 0.0 or sigma_prev is None:
            return (sigma_next / sigma) * x - math.expm1(
                -(math.log(sigma) - math.log(sigma_next) if sigma_next > 0 else math.inf)
            ) * d
        t, t_next, t_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
        h, h_prev = t_next - t, t - t_prev
        r = h_prev / h
        d_prev = _required(extra, "extra", kind).double()  # the previous denoised
        d_combined = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev  # DPM-Solver++ Alg. 2
        return (sigma_next / sigma) * x - math.expm1(-h) * d_combined
    if kind == "ddim":
        return _ddim_textbook(x, d, sigma, sigma_next, eta, noise)
    if kind == "churn":
        z = _required(noise, "noise", kind).double()
        return x + math.sqrt(sigma_next**2 - sigma**2) * s_noise * z  # EDM Alg. 2 l. 6
    raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def _required(tensor: torch.Tensor | None, name: str, kind: str) -> torch.Tensor:
    if tensor is None:
        raise ValueError(f"{name}: required for kind {kind!r}")
    return tensor


def _ddim_textbook(
    x: torch.Tensor, d: torch.Tensor, sigma: float, sigma_next: float, eta: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12 with sigma_t of Eq. 16) in its variance-preserving variables
    ``x_vp = sqrt(abar) x`` with ``abar = 1 / (1 + sigma^2)``, mapped back to VE variables."""
    abar, abar_next = 1.0 / (1.0 + sigma * sigma), 1.0 / (1.0 + sigma_next * sigma_next)
    one_minus, one_minus_next = sigma * sigma * abar, sigma_next * sigma_next * abar_next  # 1 - abar
    s_t = eta * math.sqrt(one_minus_next / one_minus) * math.sqrt(1.0 - abar / abar_next)  # Eq. 16
    eps = (x - d) / sigma  # x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps
    x_vp_next = math.sqrt(abar_next) * d + math.sqrt(max(one_minus_next - s_t * s_t, 0.0)) * eps  # Eq. 12
    if s_t > 0:
        x_vp_next = x_vp_next + s_t * _required(noise, "noise", "ddim with eta > 0").double()
    return x_vp_next / math.sqrt(abar_next)
