"""Per-sample contrastive principal components of a trained model (docs/papers.md section 8, nonlinear regime).

For Gaussians the CFG difference ``D_c - D_u`` is affine in x with the symmetric matrix
``W_c - W_u`` (``diffcore.denoisers.ClassGaussians``). For a trained network the Jacobian of the
guidance difference at each point,

    J_g(x) = d(D_c - D_u)/dx = J_c(x) - J_u(x),

takes the place of ``W_c - W_u``: its eigenvectors are per-sample CPCs (positive: enhanced, negative:
suppressed). ``J_g`` is found from batched JVPs and VJPs of ``g = D_c - D_u`` (never the full d x d
matrix; :func:`diffcore.analysis.jacobian_subspace`): the top-k singular triplets ``J_g v = s u``.
A denoiser's Jacobian is nearly symmetric (it is ``I + sigma^2`` times the Hessian of a log density
for the ideal denoiser), so ``u = +-v`` and the signed eigenvalue is ``s <u, v>``; ``<u, v>`` near
+-1 measures how symmetric the trained Jacobian is along that direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcore.analysis.jacobian import JacobianSubspace, jacobian_subspace
from diffcore.analysis.projection import principal_angles
from diffcore.sampler.guidance import DenoiserDifference


@dataclass
class ContrastiveComponents:
    """Top-k per-sample CPCs, ordered by |eigenvalue| descending.

    Attributes:
        eigenvalues: [B, k] signed estimates ``s_i <u_i, v_i>``.
        vectors: [B, k, *shape] the CPC directions (right singular vectors v_i).
        symmetry: [B, k] ``<u_i, v_i>`` (+-1 for a symmetric Jacobian).
        subspace: the underlying :class:`~diffcore.analysis.JacobianSubspace` (residuals, passes).
    """

    eigenvalues: torch.Tensor
    vectors: torch.Tensor
    symmetry: torch.Tensor
    subspace: JacobianSubspace


def contrastive_components(
    conditional, unconditional, x: torch.Tensor, sigma, k: int, **subspace_kwargs
) -> ContrastiveComponents:
    """Per-sample CPCs of ``D_c - D_u`` at each point of ``x`` [B, ...].

    Args:
        conditional, unconditional: denoisers ``D(x, sigma)`` (pure torch, eval mode, so that
            ``torch.func`` transforms apply; bind class labels beforehand).
        x: points [B, ...]; sigma: float or [B].
        k: number of components (by |eigenvalue|).
        subspace_kwargs: passed to :func:`jacobian_subspace` (method, iters, tol, seed, probes).
    """
    term = DenoiserDifference(unconditional)
    sub = jacobian_subspace(lambda y, s: term(y, s, conditional(y, s)), x, sigma, k, **subspace_kwargs)
    symmetry = (sub.U * sub.V).flatten(2).sum(dim=2).detach()  # [B, k]
    return ContrastiveComponents((sub.singular_values * torch.sign(symmetry)).detach(), sub.V.detach(), symmetry, sub)


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine of the principal angles between the row spans of ``a`` [..., p, d] and
    ``b`` [..., q, d]: 1 for the same span, about ``max(p, q) / d`` for random ones. Shape [...]."""
    angles = principal_angles(a, b)
    return torch.cos(torch.deg2rad(angles)).square().mean(dim=-1)


__all__ = ["ContrastiveComponents", "contrastive_components", "subspace_overlap"]
