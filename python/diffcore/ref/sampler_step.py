"""Float64 reference of the fused sampler step (the update arithmetic of each ODE/SDE solver).

Every solver step of ``diffcore.sampler`` is an affine combination of at most four tensors with
per-step scalar coefficients (VE/EDM convention ``x = x0 + sigma * n``):

    x_next = c_x * x + c_denoised * denoised + c_extra * extra + c_noise * noise

where ``extra`` is the second denoiser output the solver needs (Heun: the denoised value at the
predicted point; DPM-Solver++ 2M: the previous step's denoised value) and ``noise`` is standard
normal noise (stochastic DDIM, EDM churn). The coefficients depend on the schedule only, so they
are computed once per schedule into a small ``[steps, 4]`` float64 table; the kernels then read
four scalars per step and touch each element once.

This module holds (a) the coefficient formulas, (b) the affine step in float64, and (c) the
textbook form of each update (``textbook_step``), against which the coefficients are tested.
Nothing here imports the rest of diffcore.
"""
from __future__ import annotations

import math

import torch

# Column order of a coefficient row / table.
C_X, C_DENOISED, C_EXTRA, C_NOISE = 0, 1, 2, 3
KINDS = ("euler", "heun", "dpmpp_2m", "ddim", "churn")


def euler_coefficients(sigma: float, sigma_next: float) -> tuple[float, float, float, float]:
    """Euler step of the PF-ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (EDM Eq. 3 with
    sigma(t) = t; EDM Alg. 1 line 5): ``x_next = x + (sigma_next - sigma) * (x - D) / sigma``
    = ``(sigma_next/sigma) x + (1 - sigma_next/sigma) D``. First order. Identical to DDIM with
    eta = 0 in VE variables."""
    ratio = sigma_next / sigma
    return (ratio, 1.0 - ratio, 0.0, 0.0)


def heun_coefficients(sigma: float, sigma_next: float) -> tuple[float, float, float, float]:
    """Heun's 2nd-order correction (EDM Alg. 1 lines 7-8), written in ``x``, ``D = D(x; sigma)``
    and ``D' = D(x_pred; sigma_next)`` where ``x_pred`` is the Euler predictor:

        x_next = x + h/2 * ((x - D)/sigma + (x_pred - D')/sigma_next),  h = sigma_next - sigma
               = (sigma_next/sigma) x + (h/(2 sigma_next) - h/sigma) D - h/(2 sigma_next) D'

    (substituting ``x_pred = (sigma_next/sigma) x + (1 - sigma_next/sigma) D``). Needs
    ``sigma_next > 0``: EDM takes a plain Euler step into sigma = 0.
    """
    if sigma_next == 0.0:
        raise ValueError("heun correction needs sigma_next > 0 (the last step into 0 is an Euler step)")
    h = sigma_next - sigma
    half_over_next = h / (2.0 * sigma_next)
    return (sigma_next / sigma, half_over_next - h / sigma, -half_over_next, 0.0)


def dpmpp_2m_coefficients(sigma: float, sigma_next: float,
                          sigma_prev: float | None) -> tuple[float, float, float, float]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in VE variables, ``t = -log sigma``,
    ``h = t_next - t``:

        x_next = (sigma_next/sigma) x - expm1(-h) * ((1 + 1/(2r)) D - 1/(2r) D_prev),
        r = h_prev / h,  h_prev = t - t_prev

    Second order (multistep). The first step (no ``sigma_prev``) and the final step into
    ``sigma_next = 0`` are first order: ``x_next = (sigma_next/sigma) x + (1 - sigma_next/sigma) D``
    (ANCHORS trap 8: a second-order step into 0 is ill-defined, h = inf).
    """
    ratio = sigma_next / sigma
    if sigma_next == 0.0 or sigma_prev is None:
        return (ratio, 1.0 - ratio, 0.0, 0.0)
    h = math.log(sigma) - math.log(sigma_next)
    h_prev = math.log(sigma_prev) - math.log(sigma)
    r = h_prev / h
    one_minus_ratio = -math.expm1(-h)  # = 1 - sigma_next/sigma, without cancellation
    return (ratio, one_minus_ratio * (1.0 + 1.0 / (2.0 * r)), -one_minus_ratio / (2.0 * r), 0.0)


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of a DDIM step with stochasticity ``eta`` in VE variables.

    DDIM (Song et al. 2021, Eq. 12) with ``abar = 1/(1+sigma^2)`` gives, after dividing by
    ``sqrt(abar_next)``, fresh-noise std ``sigma_up = eta * sigma_next * sqrt(sigma^2 -
    sigma_next^2) / sigma`` and deterministic part ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``.
    eta = 1 is DDPM's ancestral step; eta = 0 gives sigma_up = 0 (deterministic DDIM = Euler).
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    up = eta * sigma_next * math.sqrt(max(sigma * sigma - sigma_next * sigma_next, 0.0)) / sigma
    up = min(up, sigma_next)
    return math.sqrt(max(sigma_next * sigma_next - up * up, 0.0)), up


def ddim_coefficients(sigma: float, sigma_next: float, eta: float = 0.0) -> tuple[float, float, float, float]:
    """DDIM step in VE variables: ``x_next = D + sigma_down * (x - D)/sigma + sigma_up * z``
    (see ``ancestral_split``). First order; deterministic for eta = 0."""
    down, up = ancestral_split(sigma, sigma_next, eta)
    ratio = down / sigma
    return (ratio, 1.0 - ratio, 0.0, up)


def churn_coefficients(sigma: float, sigma_hat: float, s_noise: float = 1.0) -> tuple[float, float, float, float]:
    """EDM Alg. 2 lines 5-6: ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) * S_noise * z``."""
    return (1.0, 0.0, 0.0, math.sqrt(max(sigma_hat * sigma_hat - sigma * sigma, 0.0)) * s_noise)


def coefficient_table(kind: str, sigmas, *, eta: float = 0.0) -> torch.Tensor:
    """Coefficients of every step of ``kind`` on the grid ``sigmas`` (length n+1): float64 [n, 4].

    Row i updates from ``sigmas[i]`` to ``sigmas[i+1]``. ``heun`` rows are the correction step
    (the predictor uses the ``euler`` table); its row for a step into 0 is the Euler step.
    ``churn`` is not a grid step (it needs sigma_hat) and has no table here.
    """
    s = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).tolist()]
    rows = []
    for i in range(len(s) - 1):
        if kind == "euler":
            rows.append(euler_coefficients(s[i], s[i + 1]))
        elif kind == "heun":
            rows.append(euler_coefficients(s[i], s[i + 1]) if s[i + 1] == 0.0 else heun_coefficients(s[i], s[i + 1]))
        elif kind == "dpmpp_2m":
            rows.append(dpmpp_2m_coefficients(s[i], s[i + 1], s[i - 1] if i > 0 else None))
        elif kind == "ddim":
            rows.append(ddim_coefficients(s[i], s[i + 1], eta))
        else:
            raise ValueError(f"kind: expected one of euler, heun, dpmpp_2m, ddim for a table, got {kind!r}")
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 4)


def sampler_step_ref(x: torch.Tensor, denoised: torch.Tensor, coefficients, extra: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
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


def textbook_step(kind: str, x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, *,
                  extra: torch.Tensor | None = None, sigma_prev: float | None = None,
                  noise: torch.Tensor | None = None, eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    """Each update in the form its paper writes it, float64 (the check on the coefficients).

    ``heun``: ``extra`` is D(x_pred; sigma_next). ``dpmpp_2m``: ``extra`` is the previous
    denoised value and ``sigma_prev`` the previous sigma. ``churn``: ``sigma_next`` is sigma_hat.
    """
    x, d = x.double(), denoised.double()
    if kind == "euler":
        return x + (sigma_next - sigma) * (x - d) / sigma                       # EDM Alg. 1 line 5
    if kind == "heun":
        x_pred = x + (sigma_next - sigma) * (x - d) / sigma                     # EDM Alg. 1 line 5
        if sigma_next == 0.0:
            return x_pred
        d_prime = (x_pred - extra.double()) / sigma_next                        # EDM Alg. 1 line 7
        return x + (sigma_next - sigma) * (0.5 * (x - d) / sigma + 0.5 * d_prime)  # line 8
    if kind == "dpmpp_2m":
        if sigma_next == 0.0 or sigma_prev is None:
            return (sigma_next / sigma) * x - math.expm1(-(math.log(sigma) - math.log(sigma_next) if sigma_next > 0
                                                            else math.inf)) * d
        t, t_next, t_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
        h, h_prev = t_next - t, t - t_prev
        r = h_prev / h
        d_combined = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * extra.double()      # DPM-Solver++ Alg. 2
        return (sigma_next / sigma) * x - math.expm1(-h) * d_combined
    if kind == "ddim":
        down, up = ancestral_split(sigma, sigma_next, eta)
        eps = (x - d) / sigma                                                   # DDIM Eq. 12, VE form
        out = d + down * eps
        return out + up * noise.double() if up > 0 else out
    if kind == "churn":
        return x + math.sqrt(sigma_next ** 2 - sigma ** 2) * s_noise * noise.double()  # EDM Alg. 2 l. 6
    raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
