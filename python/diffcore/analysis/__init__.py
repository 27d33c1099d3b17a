"""diffcore.analysis: Jacobian subspaces of denoisers, numerical rank, local linearity, projections.

- :func:`jacobian_subspace` (subspace iteration, randomized SVD, Golub-Kahan-Lanczos; masks) and
  :func:`jacobian_full` (the small-d reference).
- :func:`numerical_rank`, :func:`frobenius_norm_sq`, :func:`rank_along_trajectory`, :func:`euler_trajectory`.
- :func:`local_linearity`.
- :func:`contrastive_components` (per-sample CPCs of ``D_c - D_u``), :func:`subspace_overlap`.
- :func:`denoiser_similarity`, :func:`contiguous_segmentation`, :func:`stage_boundaries` (stage division
  of multi-stage models).
- :func:`null_space_project`, :func:`principal_angles`, :func:`orthonormal_rows`, :func:`edit_direction`.
- LOCO Edit pipeline (:mod:`diffcore.analysis.editing`): :class:`EditTimeline`, :func:`loco_directions`,
  :func:`edit_samples`, :func:`edit_locality`, :func:`edit_linearity`, :func:`jacobian_spectrum`.
- ``diffcore.analysis.watermark`` (imported on use): Fourier ring keys written into the diffusion
  state, detection by ODE inversion, the key's share of the Jacobian's null space (docs/papers.md section 6).
- :func:`subspace_recovery`, :func:`subspace_distance`, :func:`distance_to_union` (MoLRG subspaces).
- ``diffcore.analysis.generalization`` (imported on use): ``linearity_score``, ``relative_distance``,
  ``distill_affine`` (a denoiser against the Gaussian one: the hidden Gaussian structure).
- ``diffcore.analysis.guidance`` (imported on use): ``LabeledDenoiser``, ``transition_curves``,
  ``cpc_measurements`` (a class-conditional network against per-class Gaussians and the empirical
  denoiser: CFG) and ``feature_coverage`` (precision, density, coverage of samples' features).
"""

from diffcore.analysis.cpc import ContrastiveComponents, contrastive_components, subspace_overlap
from diffcore.analysis.editing import (
    EditTimeline,
    LocoDirections,
    compose_directions,
    edit_linearity,
    edit_locality,
    edit_samples,
    jacobian_spectrum,
    load_directions,
    loco_directions,
    region_mask,
    sample_back,
    save_directions,
)
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
from diffcore.analysis.stages import (
    Segmentation,
    contiguous_segmentation,
    denoiser_similarity,
    segmentation_cost,
    stage_boundaries,
)
from diffcore.analysis.subspaces import Recovery, distance_to_union, subspace_distance, subspace_recovery

__all__ = [
    "EditTimeline",
    "LocoDirections",
    "compose_directions",
    "edit_linearity",
    "edit_locality",
    "edit_samples",
    "jacobian_spectrum",
    "load_directions",
    "loco_directions",
    "region_mask",
    "sample_back",
    "save_directions",
    "ContrastiveComponents",
    "contrastive_components",
    "subspace_overlap",
    "JacobianOperator",
    "JacobianSubspace",
    "LocalLinearity",
    "Recovery",
    "TrajectoryRank",
    "distance_to_union",
    "edit_direction",
    "euler_trajectory",
    "frobenius_norm_sq",
    "jacobian_full",
    "jacobian_subspace",
    "local_linearity",
    "null_space_project",
    "numerical_rank",
    "orthonormal_rows",
    "principal_angles",
    "rank_along_trajectory",
    "subspace_distance",
    "subspace_recovery",
    "Segmentation",
    "contiguous_segmentation",
    "denoiser_similarity",
    "segmentation_cost",
    "stage_boundaries",
]
