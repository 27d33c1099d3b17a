"""Subspace geometry of mixtures of low-rank Gaussians (docs/papers.md section 4): how far learned
bases are from the true ones, and how far points are from a union of subspaces."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from diffcore.analysis.projection import principal_angles


def subspace_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalized projection distance ``|P_a - P_b|_F^2 / (2 d)`` = mean sin^2 of the principal
    angles, in [0, 1], between column spans of orthonormal ``a`` [..., n, d] and ``b`` [..., n, d]."""
    d = a.shape[-1]
    overlap = (a.transpose(-1, -2).double() @ b.double()).square().sum((-1, -2))
    return (1 - overlap / d).clamp_min(0.0)


@dataclass
class Recovery:
    """Subspace recovery after matching learned to true components by the best permutation."""

    error: float  # mean normalized projection distance (0 = exact recovery)
    max_angle_deg: float  # largest principal angle over matched pairs
    mean_angle_deg: float  # mean principal angle over matched pairs and directions
    permutation: list


def subspace_recovery(learned: torch.Tensor, true: torch.Tensor) -> Recovery:
    """Match ``learned`` [K, n, d] to ``true`` [K, n, d] (orthonormal columns) by the permutation
    with the smallest total distance (exhaustive; K <= 7), then principal angles of each pair
    (``diffcore.analysis.principal_angles``)."""
    k = true.shape[0]
    if learned.shape != true.shape:
        raise ValueError(f"learned: expected shape {tuple(true.shape)}, got {tuple(learned.shape)}")
    if k > 7:
        raise ValueError("subspace_recovery: exhaustive matching supports K <= 7")
    cost = subspace_distance(learned[:, None], true[None])  # [K, K]
    perm = min(itertools.permutations(range(k)), key=lambda p: float(sum(cost[p[j], j] for j in range(k))))
    matched = learned[list(perm)]
    angles = principal_angles(matched.transpose(1, 2).double(), true.transpose(1, 2).double())  # [K, d]
    return Recovery(
        error=float(torch.stack([cost[perm[j], j] for j in range(k)]).mean()),
        max_angle_deg=float(angles.max()),
        mean_angle_deg=float(angles.mean()),
        permutation=list(perm),
    )


def distance_to_union(x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Relative distance [B] of each row of ``x`` [B, n] to the union of span(U_k):
    ``min_k |x - U_k U_k^T x| / |x|``."""
    x = x.reshape(x.shape[0], -1).double()
    u = bases.double()
    coeff = torch.einsum("bn,knd->bkd", x, u)
    # The residual itself, not sqrt(|x|^2 - |U^T x|^2): that difference cancels to ~1e-8 relative.
    residual = (x[:, None, :] - torch.einsum("bkd,knd->bkn", coeff, u)).norm(dim=-1)  # [B, K]
    return residual.min(-1).values / x.norm(dim=-1).clamp_min(1e-30)
