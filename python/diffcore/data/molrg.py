"""Mixture of low-rank Gaussians (MoLRG), docs/papers.md section 4 (arXiv 2409.02426).

K classes with orthonormal bases ``U_k`` (``[n, d]``), mutually orthogonal (so ``K d <= n``);
a sample of class k is ``x = U_k a`` with ``a ~ N(0, I_d)``; classes have equal weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoLRGSample:
    """``data [num, n]``, ``labels [num]`` (int64 class k), ``bases [K, n, d]`` (orthonormal columns)."""

    data: torch.Tensor
    labels: torch.Tensor
    bases: torch.Tensor

    def __iter__(self):  # allows ``data, labels, bases = molrg(...)``
        return iter((self.data, self.labels, self.bases))


def molrg_bases(K: int, n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """``[K, n, d]``: K mutually orthogonal orthonormal bases (QR of a Gaussian ``[n, K d]``)."""
    K, n, d = int(K), int(n), int(d)
    if K <= 0 or n <= 0 or d <= 0:
        raise ValueError(f"K, n and d must be positive, got K={K}, n={n}, d={d}")
    if K * d > n:
        raise ValueError(f"mutually orthogonal bases need K * d <= n, got K={K}, d={d}, n={n}")
    generator = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn(n, K * d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique QR: positive diagonal of r
    return q.T.reshape(K, d, n).transpose(1, 2).contiguous().to(dtype)


def molrg(K: int, n: int, d: int, num: int, seed: int, dtype=torch.float32) -> MoLRGSample:
    """Draw ``num`` samples of a MoLRG with K classes, ambient dimension n, intrinsic dimension d.

    Returns ``MoLRGSample(data [num, n], labels [num], bases [K, n, d])``; it unpacks as a tuple.
    The same seed gives the same bases and samples.
    """
    num = int(num)
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    bases = molrg_bases(K, n, d, seed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(int(seed) + 1)
    labels = torch.randint(0, int(K), (num,), generator=generator)
    latents = torch.randn(num, int(d), generator=generator, dtype=torch.float64)
    data = torch.einsum("bnd,bd->bn", bases[labels], latents)
    return MoLRGSample(data.to(dtype), labels, bases.to(dtype))
