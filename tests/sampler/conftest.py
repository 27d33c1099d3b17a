"""Closed-form denoisers with known probability-flow ODE solutions, for the sampler tests."""

from __future__ import annotations

import pytest
import torch


class GaussianModel:
    """Data ~ N(mu, U diag(lam) U^T) in R^D (docs/papers.md section 3).

    ``D(x; s) = mu + U diag(lam/(lam + s^2)) U^T (x - mu)``; the PF-ODE solution per
    eigen-direction is ``(x - mu)_k(s) = (x - mu)_k(s0) sqrt((lam_k + s^2)/(lam_k + s0^2))``.
    Works on x of shape [B, *shape] with prod(shape) = D.
    """

    def __init__(self, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        cov = a @ a.T / dim + 0.05 * torch.eye(dim, dtype=torch.float64)
        self.lam, self.U = torch.linalg.eigh(cov)
        self.mu = torch.randn(dim, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        flat = x.reshape(x.shape[0], -1).double()
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        y = (flat - self.mu) @ self.U
        return (self.mu + (y * self.lam / (self.lam + s2)) @ self.U.T).reshape(x.shape).to(x.dtype)

    def exact(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).double()
        y = (flat - self.mu) @ self.U
        scale = torch.sqrt((self.lam + sigma_to**2) / (self.lam + sigma_from**2))
        return (self.mu + (y * scale) @ self.U.T).reshape(x.shape)


class IsotropicModel:
    """Elementwise Gaussian denoiser ``D(x; s) = m + (x - m) v/(v + s^2)``: each sample and each
    element is computed independently, so results cannot depend on the batch (for the
    batch-invariance tests, where a matrix product's blocking could)."""

    def __init__(self, mean: float = 0.3, var: float = 0.5):
        self.mean, self.var = mean, var

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = (sigma.to(x.dtype) ** 2).reshape(-1, *([1] * (x.dim() - 1)))
        return self.mean + (x - self.mean) * (self.var / (self.var + s2))


class EmpiricalModel:
    """Empirical optimal denoiser of a small training set (float64): softmax of
    ``-|x - y_i|^2/(2 s^2)`` over the set, times y_i. Nonlinear; its ODE has no closed form."""

    def __init__(self, n: int = 6, dim: int = 4, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.train = torch.randn(n, dim, generator=g, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).double()
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        d2 = ((flat[:, None, :] - self.train[None]) ** 2).sum(-1)
        w = torch.softmax(-d2 / (2 * s2), dim=1)
        return (w @ self.train).reshape(x.shape).to(x.dtype)


@pytest.fixture
def gaussian() -> GaussianModel:
    return GaussianModel(dim=12)


@pytest.fixture
def isotropic() -> IsotropicModel:
    return IsotropicModel()


@pytest.fixture
def empirical() -> EmpiricalModel:
    return EmpiricalModel()


@pytest.fixture
def models():
    """The model classes, for tests that need several instances or other sizes."""
    from types import SimpleNamespace

    return SimpleNamespace(Gaussian=GaussianModel, Isotropic=IsotropicModel, Empirical=EmpiricalModel)
