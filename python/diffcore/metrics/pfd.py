"""Probability flow distance (arXiv 2505.20123; docs/papers.md section 2).

``PFD(p, q) = ( E_z |Phi_p(z) - Phi_q(z)|^2 )^(1/2)``, ``Phi`` the deterministic PF-ODE map from
noise to data of each denoiser, evaluated on the *same* noise ``z`` (per-sample seeds).

Normalization: the definition above is a plain l2 norm over all dimensions (no division by the
dimension), which is what ``normalize="none"`` (default) computes. ``normalize="per_dim"`` divides
each distance by ``sqrt(D)`` (an RMS per pixel), handy to compare datasets of different sizes.
We could not verify the normalization used in the paper's figures from the text available here;
see docs/experiments.md.

On a shared set of noises PFD is the ``L2(mu_z)`` norm of ``Phi_p - Phi_q``, so it is 0 for
``p = q``, symmetric, and obeys the triangle inequality exactly (Minkowski), sample for sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

NORMALIZATIONS = ("none", "per_dim")


@dataclass(frozen=True)
class PFDResult:
    value: float  # sqrt(mean_i per_sample_i^2)
    per_sample: torch.Tensor  # [B] |Phi_a(z_i) - Phi_b(z_i)| (divided by sqrt(D) for per_dim)
    normalize: str

    def summary(self) -> dict:
        return {"pfd": self.value, "normalize": self.normalize, "n": int(self.per_sample.numel())}


def pfd_from_samples(samples_a: torch.Tensor, samples_b: torch.Tensor, normalize: str = "none") -> PFDResult:
    """PFD from two sample sets mapped from the same noises: ``samples_* [B, ...]`` (row i = z_i)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    if samples_a.shape != samples_b.shape:
        raise ValueError(
            f"samples_b: shape {tuple(samples_b.shape)} differs from samples_a's "
            f"{tuple(samples_a.shape)}; PFD needs samples of the same noises"
        )
    diff = (samples_a.double() - samples_b.double()).reshape(samples_a.shape[0], -1)
    per_sample = diff.norm(dim=1)
    if normalize == "per_dim":
        per_sample = per_sample / math.sqrt(diff.shape[1])
    value = float(per_sample.square().mean().sqrt()) if per_sample.numel() else float("nan")
    return PFDResult(value, per_sample, normalize)


def _default_sampler(solver: str) -> Callable:
    from diffcore import sampler as sampler_module

    name = f"sample_{solver}"
    if not hasattr(sampler_module, name):
        raise ValueError(f"solver: diffcore.sampler has no {name}")
    return getattr(sampler_module, name)


def _default_noise(seeds, shape, device, dtype) -> torch.Tensor:
    from diffcore.sampler import noise_from_seeds

    return noise_from_seeds(seeds, shape, device=device, dtype=dtype)


def flow_map(denoiser, z: torch.Tensor, sigmas: torch.Tensor, sampler: Callable) -> torch.Tensor:
    """``Phi(z)``: integrate the PF-ODE from ``x = sigmas[0] * z`` down the ``sigmas`` grid."""
    return sampler(denoiser, z * sigmas[0], sigmas)


def pfd(
    denoiser_a,
    denoiser_b,
    *,
    seeds: Sequence[int],
    shape: Sequence[int],
    sigmas: torch.Tensor,
    solver: str = "heun",
    sampler: Callable | None = None,
    noise_fn: Callable | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 256,
    normalize: str = "none",
) -> PFDResult:
    """PFD between two denoisers ``D(x, sigma)`` with shared per-seed noise.

    Args:
        seeds: one seed per sample; sample i's noise depends only on ``seeds[i]``.
        shape: the shape of one sample, e.g. ``(1, 8, 8)``.
        sigmas: descending noise levels ending in 0 (e.g. ``karras_sigmas(18, ...)``).
        solver: name of a ``diffcore.sampler.sample_<solver>`` function, used unless ``sampler``
            (``sampler(denoiser, x, sigmas) -> x0``) is given.
        noise_fn: ``noise_fn(seeds, shape, device, dtype) -> [B, *shape]`` unit Gaussian noise,
            default ``diffcore.sampler.noise_from_seeds``.
    """
    sampler = sampler or _default_sampler(solver)
    noise_fn = noise_fn or _default_noise
    sigmas = torch.as_tensor(sigmas, device=device, dtype=dtype)
    seeds = list(seeds)
    per_sample = []
    for start in range(0, len(seeds), batch_size):
        z = noise_fn(seeds[start : start + batch_size], tuple(shape), device, dtype)
        xa = flow_map(denoiser_a, z, sigmas, sampler)
        xb = flow_map(denoiser_b, z, sigmas, sampler)
        per_sample.append(pfd_from_samples(xa, xb, normalize).per_sample)
    per = torch.cat(per_sample) if per_sample else torch.zeros(0, dtype=torch.float64)
    value = float(per.square().mean().sqrt()) if per.numel() else float("nan")
    return PFDResult(value, per, normalize)
