"""diffcore.analysis: Jacobian subspaces of denoisers, numerical rank, local linearity, projections.

- :func:`jacobian_subspace` (subspace iteration, randomized SVD, Golub-Kahan-Lanczos; masks) and
  :func:`jacobian_full` (the small-d reference).
- :func:`numerical_rank`, :func:`frobenius_norm_sq`, :func:`rank_along_trajectory`, :func:`euler_trajectory`.
- :func:`local_linearity`.
- :func:`denoiser_similarity`, :func:`contiguous_segmentation`, :func:`stage_boundaries` (stage division
  of multi-stage models).
- :func:`null_space_project`, :func:`principal_angles`, :func:`orthonormal_rows`, :func:`edit_direction`.
"""
from diffcore.analysis.jacobian import JacobianOperator, JacobianSubspace, jacobian_full, jacobian_subspace
from diffcore.analysis.linearity import LocalLinearity, local_linearity
from diffcore.analysis.projection import edit_direction, null_space_project, orthonormal_rows, principal_angles
from diffcore.analysis.rank import (
    TrajectoryRank,
    euler_trajectory,
    frobenius_norm_sq,
    numerical_rank,
    rank_along_trajectory,
)
from diffcore.analysis.stages import (Segmentation, contiguous_segmentation, denoiser_similarity,
                                      segmentation_cost, stage_boundaries)

__all__ = [
    "JacobianOperator", "JacobianSubspace", "LocalLinearity", "Segmentation", "TrajectoryRank", "edit_direction",
    "euler_trajectory", "frobenius_norm_sq", "jacobian_full", "jacobian_subspace", "local_linearity",
    "null_space_project", "numerical_rank", "orthonormal_rows", "principal_angles", "rank_along_trajectory",
    "contiguous_segmentation", "denoiser_similarity", "segmentation_cost", "stage_boundaries",
]
