"""A Gaussian-mixture denoiser: one full-rank Gaussian per class (the watermark study's quick model).

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

import torch

from diffcore._checks import check_tensor


class GaussianMixtureDenoiser:
    """``D(x [B, *shape], sigma) -> x0_hat`` of a mixture of full-rank Gaussians (see the module docstring).

    Args:
        means: [K, n]; eigvecs: [K, n, n] (orthonormal columns); eigvals: [K, n] > 0; weights: [K] (sum 1).
        shape: the per-sample shape (prod = n).
    """

    def __init__(self, means: torch.Tensor, eigvecs: torch.Tensor, eigvals: torch.Tensor, weights: torch.Tensor,
                 shape):
        check_tensor("means", means, ndim=2)
        k, n = means.shape
        if eigvecs.shape != (k, n, n) or eigvals.shape != (k, n) or weights.shape != (k,):
            raise ValueError(f"eigvecs, eigvals, weights: expected shapes [{k}, {n}, {n}], [{k}, {n}], [{k}], got "
                             f"{tuple(eigvecs.shape)}, {tuple(eigvals.shape)}, {tuple(weights.shape)}")
        if not bool((eigvals > 0).all()) or not bool((weights > 0).all()):
            raise ValueError("eigvals, weights: expected positive values")
        self.means, self.eigvecs, self.eigvals = means.double(), eigvecs.double(), eigvals.double()
        self.log_weights = (weights.double() / weights.double().sum()).log()
        self.shape = tuple(shape)
        self._cast: dict = {}

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, floor: float) -> "GaussianMixtureDenoiser":
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
        return cls(torch.stack(means), torch.stack(vecs), torch.stack(vals), torch.tensor(counts),
                   tuple(images.shape[1:]))

    def to(self, device) -> "GaussianMixtureDenoiser":
        self.means, self.eigvecs, self.eigvals = (t.to(device) for t in (self.means, self.eigvecs, self.eigvals))
        self.log_weights = self.log_weights.to(device)
        self._cast = {}
        return self

    def _params(self, dtype, device):
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = tuple(t.to(device=device, dtype=dtype) for t in
                                    (self.means, self.eigvecs, self.eigvals, self.log_weights))
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
        per_class = mu[None] + torch.einsum("bkr,knr->bkn", coeffs * lam[None] / denom, u)   # D_k(x) [B, K, n]
        return torch.einsum("bk,bkn->bn", torch.softmax(logits, dim=-1), per_class).reshape(x.shape)

    def log_density(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``log p_sigma(x)`` [B] up to the constant ``-n/2 log(2 pi)`` (for tests: D = x + sigma^2 grad)."""
        return torch.logsumexp(self._logits(x, sigma)[0], dim=-1)
