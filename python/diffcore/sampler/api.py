"""High-level sampling: seeds in, samples out, with EDM's defaults."""

from __future__ import annotations

import torch

from diffcore import _checks
from diffcore.sampler.noise import SeededNoise, _seed_list
from diffcore.sampler.schedules import karras_sigmas
from diffcore.sampler.solvers import _LOOPS, SOLVERS, _check_capturable, _Loop, sigma_list


def sample(
    denoiser,
    *,
    seeds,
    shape,
    steps: int = 18,
    solver: str = "heun",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigmas=None,
    device=None,
    dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    backend: str = "auto",
    check_finite: bool = True,
    progress: bool = False,
    callback=None,
    capture: bool = False,
    **solver_options,
) -> torch.Tensor:
    """Draw one sample per seed: ``x = sigmas[0] * noise_from_seeds(seeds)``, then ``solver``.

    Defaults are EDM's (Karras et al. 2022): 18 Heun steps (35 denoiser calls) on the grid
    ``karras_sigmas(steps, 0.002, 80, 7)`` ending in 0; deterministic.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> x0_hat``.
        seeds: one non-negative integer per sample; sample i depends only on seeds[i] (not on the
            batch it runs in): initial noise, and churn/eta noise, come from its own generator.
        shape: per-sample shape, e.g. (3, 32, 32).
        steps, sigma_min, sigma_max, rho: the Karras grid (ignored when ``sigmas`` is given).
        sigmas: an explicit descending grid ending in 0.
        solver: ``heun``, ``euler``, ``dpmpp_2m`` or ``ddim``.
        device, dtype: of the noise and of the denoiser input (default CPU, float32).
        state_dtype: dtype of the integrated state (default ``dtype``; ``torch.float64`` as EDM).
        batch_size: samples per denoiser batch (default: all at once).
        capture: CUDA only; capture the trajectory as a CUDA graph once and replay it for every
            full batch (deterministic solvers only).
        solver_options: solver-specific keywords (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``
            for heun; ``eta`` for ddim).
    Returns:
        samples [len(seeds), *shape] in the state dtype.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    seed_values = _seed_list(seeds)
    shape = tuple(int(v) for v in shape)
    if not shape or any(v <= 0 for v in shape):
        raise ValueError(f"shape: expected the per-sample shape with positive sizes, got {shape}")
    grid = karras_sigmas(steps, sigma_min, sigma_max, rho) if sigmas is None else sigmas
    values = sigma_list(grid)
    batch = len(seed_values) if batch_size is None else _checks.check_positive_int("batch_size", batch_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    stochastic = bool(solver_options.get("s_churn", 0.0) or solver_options.get("eta", 0.0))
    captured = None
    outputs = []
    for start in range(0, len(seed_values), batch):
        chunk = seed_values[start : start + batch]
        noise = SeededNoise(chunk, device=device, dtype=dtype)
        # EDM: x_0 = sigma_max * n, scaled in float64 before the cast
        x = (noise.randn(shape, dtype=torch.float64) * values[0]).to(dtype)
        options = dict(solver_options)
        if stochastic:
            options["generator"] = noise  # continues each sample's own stream
        if capture and len(chunk) == batch:
            if captured is None:
                captured = _capture(solver, denoiser, x, values, state_dtype, backend, check_finite, progress, options)
            outputs.append(captured.run(x))
        else:
            outputs.append(
                SOLVERS[solver](
                    denoiser,
                    x,
                    values,
                    callback=callback,
                    progress=progress,
                    state_dtype=state_dtype,
                    backend=backend,
                    check_finite=check_finite,
                    **options,
                )
            )
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _capture(solver, denoiser, x, values, state_dtype, backend, check_finite, progress, options):
    from diffcore.sampler.capture import CapturedTrajectory

    loop = _Loop(
        f"sample_{solver}",
        denoiser,
        x,
        values,
        state_dtype=state_dtype,
        backend=backend,
        check_finite=check_finite,
        callback=None,
        progress=progress,
    )
    _check_capturable(loop, options)
    body = _LOOPS[solver]
    return CapturedTrajectory(loop, lambda state: body(loop, state, **options), x)


def num_denoiser_calls(solver: str, steps: int) -> int:
    """Denoiser evaluations of ``steps`` steps into 0: Heun 2*steps - 1, the others ``steps``."""
    return 2 * steps - 1 if solver == "heun" else steps


__all__ = ["sample", "num_denoiser_calls"]
