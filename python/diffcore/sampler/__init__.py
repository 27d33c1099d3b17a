"""diffcore.sampler: probability-flow ODE samplers for any denoiser ``D(x, sigma) -> x0_hat``.

VE/EDM convention ``x = x0 + sigma * n``. Solvers (``sample_euler``, ``sample_heun``,
``sample_ddim``, ``sample_dpmpp_2m``) share one signature ``(denoiser, x, sigmas, *,
callback=None, progress=False, ...)`` and run each update as one fused kernel
(``diffcore.ops.sampler_step``). ``sample`` is the high-level entry with EDM's defaults and
per-sample seeds; ``invert`` maps data to noise; adapters wrap epsilon/v/x0 and VP models;
``classifier_free_guidance`` / ``GuidedDenoiser`` wrap denoisers for (limited-interval) guidance.
"""

from diffcore.sampler.adapters import DiffusersUNetDenoiser, VEDenoiser, VPDenoiser
from diffcore.sampler.api import num_denoiser_calls, sample
from diffcore.sampler.guidance import DenoiserDifference, GuidanceInterval, GuidedDenoiser, classifier_free_guidance
from diffcore.sampler.inversion import inversion_sigmas, invert, relative_rms_error
from diffcore.sampler.noise import SeededNoise, noise_from_seeds
from diffcore.sampler.schedules import (
    ddpm_alphas_cumprod,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
    uniform_time_sigmas,
    vp_sigmas,
    vp_time_sigmas,
)
from diffcore.sampler.solvers import SOLVERS, sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun, sigma_list

__all__ = [
    "DenoiserDifference",
    "GuidanceInterval",
    "GuidedDenoiser",
    "classifier_free_guidance",
    "DiffusersUNetDenoiser",
    "SOLVERS",
    "SeededNoise",
    "VEDenoiser",
    "VPDenoiser",
    "ddpm_alphas_cumprod",
    "inversion_sigmas",
    "invert",
    "karras_sigmas",
    "noise_from_seeds",
    "num_denoiser_calls",
    "relative_rms_error",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sigma_list",
    "sigmas_from_alphas_cumprod",
    "uniform_time_sigmas",
    "vp_sigmas",
    "vp_time_sigmas",
]
