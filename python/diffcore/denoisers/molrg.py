"""Mixture of low-rank Gaussians (MoLRG): optimal denoiser, posterior weights, exact log-density.

docs/papers.md section 4. Component k has an orthonormal basis ``U_k`` [n, d_k] and ``x0 = U_k a``,
``a ~ N(0, I_{d_k})`` (unit latent variance), chosen with probability ``pi_k``. In the VE convention
``x = x0 + sigma n``, given k, ``x ~ N(0, C_k)`` with ``C_k = U_k U_k^T + sigma^2 I``, whose
eigenvalues are ``1 + sigma^2`` (d_k times) and ``sigma^2`` (n - d_k times), so

    C_k^{-1} = I / sigma^2 - U_k U_k^T / (sigma^2 (1 + sigma^2))
    log N(x; 0, C_k) = -n/2 log(2 pi) - d_k/2 log(1 + sigma^2) - (n - d_k)/2 log(sigma^2)
                       - |x|^2 / (2 sigma^2) + |U_k^T x|^2 / (2 sigma^2 (1 + sigma^2)).

Posterior weights (the terms common to all k cancel in the softmax):

    w_k(x) = softmax_k( log pi_k + |U_k^T x|^2 / (2 sigma^2 (1 + sigma^2)) - d_k/2 log((1 + sigma^2) / sigma^2) ).

The last term is the normalizing constant that cancels only when all d_k are equal; it is kept, so
components of different dimensions are handled exactly. With equal weights and equal d_k this is
docs/papers.md's ``softmax_k(|U_k^T x|^2 / (2 sigma^2 (1 + sigma^2)))``. The posterior mean given k is
``U_k E[a | x] = U_k U_k^T x / (1 + sigma^2)``, hence

    D(x; sigma) = sum_k w_k(x) U_k U_k^T x / (1 + sigma^2).

Noisy MoLRG (``noise_std`` = delta > 0, the data model of the representation-dynamics paper,
docs/papers.md section 7): ``x0 = U_k a + delta e`` with ``e ~ N(0, I_n)``. Given k, ``x ~ N(0, U_k U_k^T +
s^2 I)`` with ``s^2 = sigma^2 + delta^2``, so the weights above hold with ``sigma^2 -> s^2``, and the
posterior mean given k is ``(1 + delta^2)/(1 + s^2) U_k U_k^T x + delta^2/s^2 (I - U_k U_k^T) x``:

    D(x; sigma) = delta^2/s^2 x + sum_k w_k(x) [(1 + delta^2)/(1 + s^2) - delta^2/s^2] U_k U_k^T x.

With delta = 0 this is the formula above. Bases of different dimensions are stored zero-padded to
``d_max`` columns (zero columns change
neither ``U_k^T x`` norms nor ``U_k U_k^T``) together with their true dimensions ``dims``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffcore._checks import check_positive_int, check_tensor
from diffcore.denoisers._common import FLOAT_DTYPES, check_input, sigma_column


class MoLRGDenoiser:
    """Optimal denoiser of a mixture of low-rank Gaussians with unit latent variance.

    Args:
        bases: ``[K, n, d]`` tensor (equal dimensions) or a sequence of K tensors ``[n, d_k]``;
            each with orthonormal columns (checked to 1e-4; the bases need not be mutually orthogonal).
        weights: mixture weights ``pi`` [K] (normalized here); uniform when None.
        shape: per-sample data shape (``x`` is ``[B, *shape]``), default ``(n,)``.
        noise_std: isotropic data noise delta >= 0 (``x0 = U_k a + delta e``; 0 = the plain MoLRG).
    """

    def __init__(self, bases, weights: torch.Tensor | None = None, shape=None, noise_std: float = 0.0):
        padded, dims = _pad_bases(bases)
        k, n, _ = padded.shape
        gram = padded.transpose(1, 2) @ padded
        eye = torch.diag_embed(
            (torch.arange(padded.shape[2], device=padded.device)[None, :] < dims[:, None]).to(torch.float64)
        )
        if not torch.allclose(gram, eye, atol=1e-4):
            raise ValueError("bases: each basis must have orthonormal columns")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        check_tensor("weights", weights, ndim=1, dtypes=FLOAT_DTYPES)
        if weights.shape[0] != k or not bool((weights > 0).all()):
            raise ValueError(f"weights: expected {k} positive values, got shape {tuple(weights.shape)}")
        self.bases = padded  # [K, n, d_max] float64
        self.dims = dims  # [K] int64
        self.weights = (weights.double() / weights.double().sum()).to(padded.device)
        self.shape = tuple(shape) if shape is not None else (n,)
        if math.prod(self.shape) != n:
            raise ValueError(f"shape: {self.shape} does not hold {n} numbers")
        noise_std = float(noise_std)
        if not (noise_std >= 0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std: expected a finite value >= 0, got {noise_std!r}")
        self.noise_std = noise_std
        self._cache: dict = {}

    @classmethod
    def random(
        cls,
        num_components: int,
        ambient_dim: int,
        latent_dim: int,
        *,
        orthogonal: bool = True,
        seed: int = 0,
        weights=None,
        shape=None,
        noise_std: float = 0.0,
    ) -> MoLRGDenoiser:
        """Random bases: mutually orthogonal (one QR of an n x K d Gaussian, as in the public code;
        needs K d <= n; the same bases as ``diffcore.data.molrg.molrg_bases(K, n, d, seed)``) or
        independent (one QR per component)."""
        for name, v in (("num_components", num_components), ("ambient_dim", ambient_dim), ("latent_dim", latent_dim)):
            check_positive_int(name, v)
        if latent_dim > ambient_dim:
            raise ValueError(f"latent_dim: {latent_dim} exceeds ambient_dim {ambient_dim}")
        g = torch.Generator().manual_seed(seed)
        if orthogonal:
            if num_components * latent_dim > ambient_dim:
                raise ValueError(
                    f"orthogonal bases need num_components * latent_dim <= ambient_dim, got "
                    f"{num_components} * {latent_dim} > {ambient_dim}"
                )
            q, r = torch.linalg.qr(
                torch.randn(ambient_dim, num_components * latent_dim, generator=g, dtype=torch.float64)
            )
            q = q * torch.sign(torch.diagonal(r))[None, :]  # unique QR (positive diagonal of r)
            bases = q.reshape(ambient_dim, num_components, latent_dim).permute(1, 0, 2).contiguous()
        else:
            bases = torch.stack(
                [
                    torch.linalg.qr(torch.randn(ambient_dim, latent_dim, generator=g, dtype=torch.float64))[0]
                    for _ in range(num_components)
                ]
            )
        return cls(bases, weights=weights, shape=shape, noise_std=noise_std)

    def to(self, device) -> MoLRGDenoiser:
        bases = [self.bases[k, :, : int(d)].to(device) for k, d in enumerate(self.dims)]
        return MoLRGDenoiser(bases, self.weights.to(device), self.shape, self.noise_std)

    @property
    def dim(self) -> int:
        return self.bases.shape[1]

    @property
    def device(self) -> torch.device:
        return self.bases.device

    def _params(self, dtype):
        if dtype not in self._cache:
            self._cache[dtype] = (self.bases.to(dtype), self.dims.to(dtype), self.weights.log().to(dtype))
        return self._cache[dtype]

    # ------------------------------------------------------------------ core
    def _logits_and_coeffs(self, x: torch.Tensor, sigma):
        """Posterior logits [B, K], latent coefficients U_k^T x [B, K, d_max], s^2 = sigma^2 + delta^2 [B, 1]."""
        check_input(x, self.dim)
        bases, dims, log_pi = self._params(x.dtype)
        s2 = sigma_column(sigma, x.shape[0], x.device, x.dtype).square() + self.noise_std**2  # [B, 1]
        coeff = torch.einsum("bn,knd->bkd", x.reshape(x.shape[0], -1), bases)  # [B, K, d]
        energy = coeff.square().sum(-1)  # [B, K]
        logits = log_pi + energy / (2 * s2 * (1 + s2)) - 0.5 * dims * torch.log((1 + s2) / s2)
        return logits, coeff, s2

    def posterior_weights(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``w_k(x) = P(component k | x_sigma = x)`` [B, K] (rows sum to 1)."""
        logits, _, _ = self._logits_and_coeffs(x, sigma)
        return torch.softmax(logits, dim=-1)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``D(x; sigma) = sum_k w_k(x) U_k U_k^T x / (1 + sigma^2)`` with x's shape and dtype (the
        noisy-MoLRG form of the module docstring when ``noise_std > 0``)."""
        logits, coeff, s2 = self._logits_and_coeffs(x, sigma)
        w = torch.softmax(logits, dim=-1)  # [B, K]
        bases = self._params(x.dtype)[0]
        delta2 = self.noise_std**2
        gain = (1 + delta2) / (1 + s2) - delta2 / s2  # [B, 1]
        weighted = coeff * (w * gain)[:, :, None]  # [B, K, d]
        out = torch.einsum("bkd,knd->bn", weighted, bases)
        if delta2 > 0:
            out = out + (delta2 / s2) * x.reshape(x.shape[0], -1)
        return out.reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact ``log p_sigma(x)`` [B] of the noised mixture (see the module docstring)."""
        logits, _, s2 = self._logits_and_coeffs(x, sigma)
        n = self.dim
        sq = x.reshape(x.shape[0], -1).square().sum(-1)
        common = -0.5 * n * math.log(2 * math.pi) - 0.5 * n * torch.log(s2[:, 0]) - sq / (2 * s2[:, 0])
        # logits hold log pi_k + |U^T x|^2/(2 s^2(1+s^2)) - d_k/2 log((1+s^2)/s^2); adding
        # -n/2 log s^2 - |x|^2/(2 s^2) - n/2 log 2pi gives log pi_k + log N(x; 0, C_k).
        return torch.logsumexp(logits, dim=-1) + common

    def sample(self, num: int, *, seed: int = 0, dtype=torch.float32, return_labels: bool = False):
        """``num`` clean samples ``x0 = U_k a (+ delta e)`` [num, *shape] (labels k drawn from the weights)."""
        check_positive_int("num", num)
        g = torch.Generator().manual_seed(seed)
        labels = torch.multinomial(self.weights.cpu(), num, replacement=True, generator=g)
        latent = torch.randn(num, self.bases.shape[2], generator=g, dtype=torch.float64)
        latent = latent * (torch.arange(self.bases.shape[2])[None, :] < self.dims.cpu()[labels][:, None])
        x0 = torch.einsum("bnd,bd->bn", self.bases.cpu()[labels], latent)
        if self.noise_std > 0:
            x0 = x0 + self.noise_std * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x0 = x0.to(device=self.device, dtype=dtype).reshape(num, *self.shape)
        return (x0, labels.to(self.device)) if return_labels else x0


def _pad_bases(bases) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bases into [K, n, d_max] float64 (zero columns pad the smaller ones) and their dims [K]."""
    if isinstance(bases, torch.Tensor):
        check_tensor("bases", bases, ndim=3, dtypes=FLOAT_DTYPES)
        k, _, d = bases.shape
        return bases.detach().double(), torch.full((k,), d, dtype=torch.int64, device=bases.device)
    if not isinstance(bases, Sequence) or len(bases) == 0:
        raise TypeError("bases: expected a [K, n, d] tensor or a non-empty sequence of [n, d_k] tensors")
    for i, b in enumerate(bases):
        check_tensor(f"bases[{i}]", b, ndim=2, dtypes=FLOAT_DTYPES)
    n = bases[0].shape[0]
    if any(b.shape[0] != n for b in bases):
        raise ValueError("bases: every basis must have the same number of rows n")
    d_max = max(b.shape[1] for b in bases)
    padded = torch.zeros(len(bases), n, d_max, dtype=torch.float64, device=bases[0].device)
    for i, b in enumerate(bases):
        padded[i, :, : b.shape[1]] = b.detach().double()
    dims = torch.tensor([b.shape[1] for b in bases], dtype=torch.int64, device=bases[0].device)
    return padded, dims
