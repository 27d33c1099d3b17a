"""Self-contained stand-ins for the tests of metrics and experiments (never used by the package).

- knn: the float64 reference ``diffcore.ref.knn.knn_ref`` (returns float32 distances like the op).
- heun_sampler: a tiny EDM Heun loop (EDM Alg. 1 without churn) over the given sigmas.
- noise_from_seeds: diffcore.sampler.noise_from_seeds itself (one generator per seed).
- closed-form denoisers: isotropic Gaussian, and the empirical denoiser of a training set.
"""

from __future__ import annotations

import math

import torch

from diffcore.ref.empirical_denoise import empirical_denoise_ref
from diffcore.ref.knn import knn_ref
from diffcore.sampler import noise_from_seeds


def knn(queries, train, k=2):
    """Exact k-NN in float64 through torch.cdist (fast enough for the end-to-end tests)."""
    q = queries.reshape(queries.shape[0], -1).double()
    t = train.reshape(train.shape[0], -1).double()
    d, i = torch.cdist(q, t).topk(k, dim=1, largest=False, sorted=True)
    return d.float(), i


def knn_reference(queries, train, k=2):
    """The float64 reference, ties broken by the lower index."""
    d, i = knn_ref(queries, train, k=k)
    return d.float(), i


def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Eq. 5 with a trailing 0, float64."""
    i = torch.arange(n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def heun_sampler(denoiser, x, sigmas):
    """Deterministic Heun (EDM Alg. 1, S_churn = 0); Euler on the last step into sigma = 0."""
    x = x.double()
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, s.expand(x.shape[0])).double()) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next, s_next.expand(x.shape[0])).double()) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x.float()


def gaussian_denoiser(mean: float = 0.0, std: float = 0.5):
    """Optimal denoiser of N(mean, std^2 I): ``mean + std^2 / (std^2 + sigma^2) (x - mean)``."""

    def denoise(x, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
        return mean + std**2 / (std**2 + s**2) * (x.double() - mean)

    return denoise


def empirical_denoiser(train):
    """The empirical optimal denoiser of ``train``; float64 throughout (a fast twin of
    ``diffcore.ref.empirical_denoise``, checked against it in test_standins.py)."""
    flat = train.reshape(train.shape[0], -1).double()

    def denoise(x, sigma):
        xf = x.reshape(x.shape[0], -1).double()
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        logits = -torch.cdist(xf, flat).square() / (2 * s**2)
        return (torch.softmax(logits, dim=1) @ flat).reshape(x.shape)

    return denoise


def blended_denoiser(train, weight_gaussian: float, std: float = 0.5):
    """``(1 - w) D_empirical + w D_gaussian``: memorizes for w = 0, generalizes as w -> 1."""
    emp = empirical_denoiser(train)
    flat = train.reshape(train.shape[0], -1).double()
    mean = flat.mean(0).reshape(train.shape[1:])
    gauss = gaussian_denoiser(mean, std)

    def denoise(x, sigma):
        if weight_gaussian == 0:
            return emp(x, sigma)
        return (1 - weight_gaussian) * emp(x, sigma) + weight_gaussian * gauss(x, sigma)

    return denoise


def fitted_gaussian_denoiser(train, scale: float = 1.0):
    """Optimal denoiser of the Gaussian fitted to ``train`` (mean, covariance; docs/papers.md section 3):
    ``mu + U diag(lam / (lam + sigma^2)) U^T (x - mu)``; ``scale`` multiplies the covariance."""
    flat = train.reshape(train.shape[0], -1).double()
    mu = flat.mean(0)
    lam, u = torch.linalg.eigh(torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1]) * scale)
    lam = lam.clamp_min(0)

    def denoise(x, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        coeff = ((x.reshape(x.shape[0], -1).double() - mu) @ u) * (lam / (lam + s**2))
        return (mu + coeff @ u.T).reshape(x.shape)

    return denoise


def sample(denoiser, seeds, shape, steps=18, sigma_min=0.002, sigma_max=80.0):
    z = noise_from_seeds(seeds, shape, dtype=torch.float64)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max)
    return heun_sampler(denoiser, z * sigmas[0], sigmas)


__all__ = [
    "knn",
    "knn_reference",
    "empirical_denoise_ref",
    "karras_sigmas",
    "heun_sampler",
    "noise_from_seeds",
    "gaussian_denoiser",
    "empirical_denoiser",
    "blended_denoiser",
    "fitted_gaussian_denoiser",
    "sample",
    "math",
]
