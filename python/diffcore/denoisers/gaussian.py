"""The Gaussian denoiser of a data set and the exact solution of its probability-flow ODE.

docs/papers.md section 3 (hidden Gaussian structure). With the data mean ``mu`` and covariance
``Sigma = U diag(lam) U^T``, the optimal denoiser of ``N(mu, Sigma)`` in the VE convention
``x = x0 + sigma n`` is

    D_G(x; sigma) = mu + U diag(lam / (lam + sigma^2)) U^T (x - mu),

and its probability-flow ODE ``dx/dsigma = (x - D_G(x; sigma)) / sigma`` decouples per eigen-direction:
``(x - mu)_k' = (x - mu)_k sigma / (lam_k + sigma^2)``, solved by

    (x - mu)_k(sigma) = (x - mu)_k(sigma0) sqrt((lam_k + sigma^2) / (lam_k + sigma0^2)).

With a rank truncation (``rank=r``), directions outside span(U) are treated as lam = 0: the denoiser
maps them to 0 (relative to mu) and the flow scales them by ``sigma / sigma0`` (the lam -> 0 limit).
"""

from __future__ import annotations

import torch

from diffcore._checks import check_positive_int, check_tensor
from diffcore.denoisers._common import (
    FLOAT_DTYPES,
    check_input,
    sigma_column,
    sigma_column_allow_zero,
)


class GaussianDenoiser:
    """Optimal denoiser of a Gaussian ``N(mu, U diag(lam) U^T)`` (D(x, sigma) contract).

    Parameters are kept in float64 on one device (``.to(device)`` moves them); calls compute in the
    dtype of ``x`` (float64 inputs give float64 results). Pure torch ops, so ``torch.func.jvp``,
    ``vmap`` and autograd pass through.

    Attributes:
        mean: ``mu`` [n] float64.
        eigvecs: ``U`` [n, r] float64, orthonormal columns, eigenvalues descending.
        eigvals: ``lam`` [r] float64, >= 0.
        shape: the per-sample shape of the data (``x`` is ``[B, *shape]``).
    """

    def __init__(self, mean: torch.Tensor, eigvecs: torch.Tensor, eigvals: torch.Tensor, shape=None):
        check_tensor("mean", mean, ndim=1, dtypes=FLOAT_DTYPES)
        check_tensor("eigvecs", eigvecs, ndim=2, dtypes=FLOAT_DTYPES)
        check_tensor("eigvals", eigvals, ndim=1, dtypes=FLOAT_DTYPES)
        n = mean.shape[0]
        if eigvecs.shape[0] != n or eigvecs.shape[1] != eigvals.shape[0]:
            raise ValueError(f"eigvecs: expected shape [{n}, {eigvals.shape[0]}], got {tuple(eigvecs.shape)}")
        if bool((eigvals < 0).any()):
            raise ValueError("eigvals: expected values >= 0")
        self.mean = mean.detach().to(torch.float64)
        self.eigvecs = eigvecs.detach().to(device=self.mean.device, dtype=torch.float64)
        self.eigvals = eigvals.detach().to(device=self.mean.device, dtype=torch.float64)
        self.shape = tuple(shape) if shape is not None else (n,)
        if _prod(self.shape) != n:
            raise ValueError(f"shape: {self.shape} does not hold {n} numbers")
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, data: torch.Tensor, rank: int | None = None) -> GaussianDenoiser:
        """Fit mean and covariance of ``data`` [N, ...] in float64 (covariance normalized by N, the
        maximum-likelihood estimate) and keep the top ``rank`` eigenpairs (all when None).

        Uses ``eigh`` of the n x n covariance when N > n, else the SVD of the centered data
        (at most N - 1 non-zero eigenvalues). uint8 images map to [-1, 1] as ``u8 / 127.5 - 1``.
        """
        check_tensor("data", data, min_ndim=2)
        if data.shape[0] < 2:
            raise ValueError(f"data: expected at least 2 samples, got {data.shape[0]}")
        rows = data.reshape(data.shape[0], -1)
        rows = rows.double() / 127.5 - 1.0 if rows.dtype == torch.uint8 else rows.double()
        n_samples, n = rows.shape
        mean = rows.mean(0)
        centered = rows - mean
        if n_samples > n:
            cov = centered.T @ centered / n_samples
            eigvals, eigvecs = torch.linalg.eigh(cov)
            eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
        else:
            _, svals, vh = torch.linalg.svd(centered, full_matrices=False)
            eigvals, eigvecs = svals.square() / n_samples, vh.T
        eigvals = eigvals.clamp_min(0.0)
        if rank is not None:
            check_positive_int("rank", rank)
            if rank > eigvals.shape[0]:
                raise ValueError(f"rank: {rank} exceeds the {eigvals.shape[0]} available eigenpairs")
            eigvals, eigvecs = eigvals[:rank], eigvecs[:, :rank]
        return cls(mean, eigvecs.contiguous(), eigvals.contiguous(), shape=data.shape[1:])

    def to(self, device) -> GaussianDenoiser:
        """A copy with the parameters on ``device``."""
        return GaussianDenoiser(self.mean.to(device), self.eigvecs.to(device), self.eigvals.to(device), self.shape)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _params(self, dtype: torch.dtype):
        if dtype not in self._cache:
            self._cache[dtype] = (self.mean.to(dtype), self.eigvecs.to(dtype), self.eigvals.to(dtype))
        return self._cache[dtype]

    # ------------------------------------------------------------------ denoiser
    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``D_G(x; sigma)`` for ``x`` [B, ...] and sigma scalar or [B] (> 0); same shape and dtype as x."""
        check_input(x, self.dim)
        mean, u, lam = self._params(x.dtype)
        s2 = sigma_column(sigma, x.shape[0], x.device, x.dtype).square()
        coeff = (x.reshape(x.shape[0], -1) - mean) @ u  # [B, r]
        shrunk = coeff * (lam / (lam + s2))  # [B, r]
        return (mean + shrunk @ u.T).reshape(x.shape)

    def jacobian(self, sigma) -> torch.Tensor:
        """``W(sigma) = U diag(lam / (lam + sigma^2)) U^T``: [n, n] for a float, [B, n, n] for sigma [B]."""
        _, u, lam = self._params(torch.float64)
        batched = isinstance(sigma, torch.Tensor) and sigma.dim() == 1
        s = sigma_column(sigma, sigma.shape[0] if batched else 1, self.device, torch.float64)  # [B, 1]
        w = (u[None] * (lam / (lam + s.square()))[:, None, :]) @ u.T  # [B, n, n]
        return w if batched else w[0]

    # ------------------------------------------------------------------ exact flow
    def exact_flow(self, x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """The exact probability-flow ODE map from noise level ``sigma_from`` (> 0) to ``sigma_to``
        (>= 0; 0 gives the generated sample), per eigen-direction
        ``(x - mu)_k <- (x - mu)_k sqrt((lam_k + sigma_to^2) / (lam_k + sigma_from^2))``; the part
        of ``x - mu`` outside span(U) (rank truncation: lam = 0) is scaled by ``sigma_to / sigma_from``.
        Computed in float64, returned in x's dtype. x [B, ...]; sigmas scalar or [B].
        """
        check_input(x, self.dim)
        mean, u, lam = self._params(torch.float64)
        batch = x.shape[0]
        s0 = sigma_column(sigma_from, batch, x.device, torch.float64, name="sigma_from")
        s1 = sigma_column_allow_zero(sigma_to, batch, x.device, torch.float64, name="sigma_to")
        centered = x.reshape(batch, -1).double() - mean
        coeff = centered @ u  # [B, r]
        outside = centered - coeff @ u.T  # [B, n]
        scale = torch.sqrt((lam + s1.square()) / (lam + s0.square()))
        out = mean + (coeff * scale) @ u.T + outside * (s1 / s0)
        return out.to(x.dtype).reshape(x.shape)

    def sample(self, noise: torch.Tensor, sigma_max: float = 80.0) -> torch.Tensor:
        """Map standard normal ``noise`` [B, ...] to data exactly: the PF-ODE from
        ``x_T = sigma_max * noise`` (EDM's starting point) down to sigma = 0."""
        return self.exact_flow(noise * sigma_max, sigma_max, 0.0)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
