"""Deterministic ODE inversion: data -> latent noise, by integrating the PF-ODE upwards.

The PF-ODE ``dx/dsigma = (x - D(x; sigma))/sigma`` is integrated from a small sigma (the data
``x0`` is taken as the state at ``sigmas[0]``, an approximation of order sigma_min) up to
sigma_max with the same solvers that sample, run on an ascending grid. Running a solver back
down the same grid returns (approximately) x0; the gap is the discretization error of the two
passes, reported by ``return_error=True`` as the relative RMS error per sample.
"""

from __future__ import annotations

import torch

from diffcore.sampler.schedules import karras_sigmas
from diffcore.sampler.solvers import SOLVERS, _solve


def inversion_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid ascending, without the final 0: [sigma_min, ..., sigma_max], length n+1 (n steps)."""
    return karras_sigmas(n + 1, sigma_min, sigma_max, rho, append_zero=False).flip(0)


def relative_rms_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|x - ref|_2 / |ref|_2`` in float64, shape [B]."""
    diff = (x.double() - reference.double()).flatten(1)
    return diff.norm(dim=1) / reference.double().flatten(1).norm(dim=1).clamp_min(1e-300)


def invert(
    denoiser,
    x0: torch.Tensor,
    sigmas=None,
    *,
    solver: str = "heun",
    steps: int = 32,
    return_error: bool = False,
    **solver_options,
):
    """Map data ``x0`` [B, ...] to the latent at the top of an ascending sigma grid.

    Args:
        denoiser: ``D(x, sigma) -> x0_hat`` (the contract of ``diffcore.sampler``).
        x0: data [B, ...], taken as the state at sigmas[0].
        sigmas: strictly ascending, positive grid (default ``inversion_sigmas(steps)``: 0.002 .. 80).
        solver: ``heun`` (default, 2nd order), ``euler``/``ddim`` (1st order; DDIM inversion),
            ``dpmpp_2m``. Deterministic only (no churn, eta = 0).
        return_error: also run the solver back down the same grid and return the per-sample
            relative RMS round-trip error [B] (float64).
        solver_options: ``state_dtype``, ``backend``, ``check_finite``, ``progress``, ``callback``.
    Returns:
        the latent [B, ...] at sigmas[-1], or ``(latent, error)`` with ``return_error=True``.
        Sampling with the same solver from ``latent`` down ``sigmas.flip(0)`` (ending at
        sigmas[0], not 0) reconstructs x0.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    for name in ("s_churn", "eta", "capture", "generator"):
        if solver_options.get(name):
            raise ValueError(f"{name}: inversion is deterministic; remove {name}")
    grid = inversion_sigmas(steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    options = {
        "callback": None,
        "progress": False,
        "state_dtype": None,
        "backend": "auto",
        "check_finite": True,
        **solver_options,
    }
    latent = _solve(solver, denoiser, x0, grid, descending=False, require_zero_end=False, capture=False, **options)
    if not return_error:
        return latent
    options["callback"] = None
    back = _solve(
        solver, denoiser, latent, grid.flip(0), require_zero_end=False, capture=False, model_dtype=x0.dtype, **options
    )
    return latent, relative_rms_error(back, x0)
