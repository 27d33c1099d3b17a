"""Closed-form mixture denoisers (the watermark study's models): one full-rank Gaussian per class (fitted to
the digits) and a mixture of low-rank Gaussians with random subspaces at a given data scale.

For ``p = sum_k pi_k N(mu_k, U_k diag(lam_k) U_k^T)`` the noisy density at sigma is the mixture of
``N(mu_k, U_k diag(lam_k + sigma^2) U_k^T)`` and the optimal denoiser (Tweedie) is

    D(x; sigma) = sum_k w_k(x) D_k(x; sigma),   D_k = mu_k + U_k diag(lam_k / (lam_k + sigma^2)) U_k^T (x - mu_k),
    w_k = softmax_k(log pi_k - |diag(lam_k + sigma^2)^(-1/2) U_k^T (x - mu_k)|^2 / 2 - sum log(lam_k + sigma^2) / 2).

Nonlinear (the class posterior ``w``) yet closed-form: samples from the same noise can land in
different classes when x_T moves, while at small sigma the posterior is settled and the Jacobian is
close to one class's ``W_k(sigma)``. Eigenvalues are the class covariances' plus a floor, so every
direction has variance and the probability-flow map is invertible. Pure torch: JVPs pass through.
"""

from __future__ import annotations

import math

import torch

from diffcore._checks import check_tensor


class GaussianMixtureDenoiser:
    """``D(x [B, *shape], sigma) -> x0_hat`` of a mixture of full-rank Gaussians (see the module docstring).

    Args:
        means: [K, n]; eigvecs: [K, n, n] (orthonormal columns); eigvals: [K, n] > 0; weights: [K] (sum 1).
        shape: the per-sample shape (prod = n).
    """

    def __init__(self, means: torch.Tensor, eigvecs: torch.Tensor, eigvals: torch.Tensor, weights: torch.Tensor, shape):
        check_tensor("means", means, ndim=2)
        k, n = means.shape
        if eigvecs.shape != (k, n, n) or eigvals.shape != (k, n) or weights.shape != (k,):
            raise ValueError(
                f"eigvecs, eigvals, weights: expected shapes [{k}, {n}, {n}], [{k}, {n}], [{k}], got "
                f"{tuple(eigvecs.shape)}, {tuple(eigvals.shape)}, {tuple(weights.shape)}"
            )
        if not bool((eigvals > 0).all()) or not bool((weights > 0).all()):
            raise ValueError("eigvals, weights: expected positive values")
        self.means, self.eigvecs, self.eigvals = means.double(), eigvecs.double(), eigvals.double()
        self.log_weights = (weights.double() / weights.double().sum()).log()
        self.shape = tuple(shape)
        self._cast: dict = {}

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, floor: float) -> GaussianMixtureDenoiser:
        """One Gaussian per label value (maximum-likelihood mean and covariance, eigenvalues plus
        ``floor``), weights = class frequencies. ``images`` [N, ...] (uint8 maps to [-1, 1])."""
        rows = images.reshape(images.shape[0], -1)
        rows = rows.double() / 127.5 - 1.0 if rows.dtype == torch.uint8 else rows.double()
        means, vecs, vals, counts = [], [], [], []
        for label in labels.unique(sorted=True).tolist():
            members = rows[labels == label]
            mean = members.mean(0)
            centered = members - mean
            lam, u = torch.linalg.eigh(centered.T @ centered / members.shape[0])
            means.append(mean)
            vecs.append(u)
            vals.append(lam.clamp_min(0) + floor)
            counts.append(float(members.shape[0]))
        return cls(
            torch.stack(means), torch.stack(vecs), torch.stack(vals), torch.tensor(counts), tuple(images.shape[1:])
        )

    def to(self, device) -> GaussianMixtureDenoiser:
        self.means, self.eigvecs, self.eigvals = (t.to(device) for t in (self.means, self.eigvecs, self.eigvals))
        self.log_weights = self.log_weights.to(device)
        self._cast = {}
        return self

    def _params(self, dtype, device):
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = tuple(
                t.to(device=device, dtype=dtype) for t in (self.means, self.eigvecs, self.eigvals, self.log_weights)
            )
        return self._cast[key]

    def _logits(self, x: torch.Tensor, sigma):
        """``(log pi_k + log N_k [B, K], U_k^T (x - mu_k) [B, K, n], lam_k + sigma^2 [B, K, n])``."""
        mu, u, lam, log_pi = self._params(x.dtype, x.device)
        flat = x.reshape(x.shape[0], -1)
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        coeffs = torch.einsum("bkn,knr->bkr", flat[:, None, :] - mu[None], u)
        denom = lam[None] + s[:, None, None] ** 2
        logits = log_pi[None] - 0.5 * (coeffs.square() / denom).sum(-1) - 0.5 * denom.log().sum(-1)
        return logits, coeffs, denom

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        mu, u, lam, _ = self._params(x.dtype, x.device)
        logits, coeffs, denom = self._logits(x, sigma)
        per_class = mu[None] + torch.einsum("bkr,knr->bkn", coeffs * lam[None] / denom, u)  # D_k(x) [B, K, n]
        return torch.einsum("bk,bkn->bn", torch.softmax(logits, dim=-1), per_class).reshape(x.shape)

    def log_density(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``log p_sigma(x)`` [B] up to the constant ``-n/2 log(2 pi)`` (for tests: D = x + sigma^2 grad)."""
        return torch.logsumexp(self._logits(x, sigma)[0], dim=-1)

    def classify(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The most probable component [B] (int64) of ``x`` [B, *shape] at noise level ``sigma``."""
        return self._logits(x, sigma)[0].argmax(dim=-1)


class ScaledMoLRGDenoiser:
    """``D(x [B, *shape], sigma) -> x0_hat`` of a mixture of low-rank Gaussians with latent standard
    deviation ``scale`` and isotropic data noise ``floor`` (variance):

        x0 = scale U_k a + sqrt(floor) e,   a ~ N(0, I_d),  e ~ N(0, I_n),  k uniform,

    the random-subspace model of the Shallow Diffuse analysis (docs/papers.md sections 4 and 6) at a chosen signal
    scale. With ``y = x / scale`` this is ``diffcore.denoisers.MoLRGDenoiser`` (unit latent variance,
    ``noise_std = sqrt(floor) / scale``) at noise level ``sigma / scale``, so
    ``D(x; sigma) = scale D_unit(x / scale; sigma / scale)``. The floor keeps the probability-flow
    map invertible off the subspaces (a key there reaches the image, attenuated, and inversion
    recovers it).
    """

    def __init__(self, unit, scale: float):
        self.unit, self.scale = unit, float(scale)

    @classmethod
    def random(
        cls, components: int, shape, latent_dim: int, *, pixel_variance: float, floor: float, seed: int
    ) -> ScaledMoLRGDenoiser:
        """Mutually orthogonal random subspaces (``MoLRGDenoiser.random``, seed ``seed``) and the scale
        that gives the data the per-pixel variance ``pixel_variance`` (``scale^2 d / n + floor``)."""
        from diffcore.denoisers import MoLRGDenoiser

        n = math.prod(shape)
        signal = pixel_variance - floor
        if not signal > 0:
            raise ValueError(f"pixel_variance: expected more than the floor {floor:g}, got {pixel_variance!r}")
        scale = math.sqrt(signal * n / latent_dim)
        unit = MoLRGDenoiser.random(
            components, n, latent_dim, seed=seed, shape=tuple(shape), noise_std=math.sqrt(floor) / scale
        )
        return cls(unit, scale)

    def to(self, device) -> ScaledMoLRGDenoiser:
        return ScaledMoLRGDenoiser(self.unit.to(device), self.scale)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.scale * self.unit(x / self.scale, sigma / self.scale)

    def log_density(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``log p_sigma(x)`` [B] (exact; for tests: D = x + sigma^2 grad)."""
        return self.unit.log_prob(x / self.scale, sigma / self.scale) - x[0].numel() * math.log(self.scale)

    def classify(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The most probable component [B] (int64) of ``x`` [B, *shape] at noise level ``sigma``."""
        return self.unit.posterior_weights(x / self.scale, sigma / self.scale).argmax(dim=-1)
