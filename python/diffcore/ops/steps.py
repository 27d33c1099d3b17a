"""The public step API of the fused sampler step, for loops that take many steps (``diffcore.sampler``).

``diffcore.ops.sampler_step`` is one checked step; a sampler's loop instead validates its tensors
once and then calls a bound runner per step (no per-step checks, no host synchronization). This
module is what such a loop may use; everything else of ``ops/_sampler_step.py`` stays private.

- Coefficients of ``x_next = c_x x + c_denoised D + c_extra E + c_noise n`` per update
  (columns :data:`C_X`, :data:`C_DENOISED`, :data:`C_EXTRA`, :data:`C_NOISE`):
  :func:`euler_coefficients`, :func:`heun_coefficients`, :func:`dpmpp_2m_coefficients`,
  :func:`ddim_coefficients`, :func:`churn_coefficients`, and the per-schedule tables
  :func:`step_coefficients` / :func:`coefficient_table` (float64 CPU ``[n, 4]``).
- :func:`bound_step_runner` (``run(x, denoised, extra, noise, out, row, step) -> bool``, bound to
  tensors shaped like one ``[B, ...]`` and a backend), :func:`bound_step` (the same plus, on the
  ``cpu`` backend, the positional C++ kernel the runner calls), :func:`step_runner`.
- Non-finite detection: :func:`new_finite_flag` (int32 ``[1]``) and :data:`NO_BAD_STEP`, the value
  it keeps while every step is finite.
"""

from __future__ import annotations

from diffcore.ops._sampler_step import (
    C_DENOISED,
    C_EXTRA,
    C_NOISE,
    C_X,
    NO_BAD_STEP,
    ancestral_split,
    bound_step,
    bound_step_runner,
    churn_coefficients,
    coefficient_table,
    ddim_coefficients,
    dpmpp_2m_coefficients,
    euler_coefficients,
    heun_coefficients,
    new_finite_flag,
    step_coefficients,
    step_runner,
)

__all__ = [
    "C_DENOISED",
    "C_EXTRA",
    "C_NOISE",
    "C_X",
    "NO_BAD_STEP",
    "ancestral_split",
    "bound_step",
    "bound_step_runner",
    "churn_coefficients",
    "coefficient_table",
    "ddim_coefficients",
    "dpmpp_2m_coefficients",
    "euler_coefficients",
    "heun_coefficients",
    "new_finite_flag",
    "step_coefficients",
    "step_runner",
]
