"""Stage division for multi-stage diffusion models (docs/papers.md section 9).

Noise levels are grouped into stages by how similar the *empirical optimal denoiser*
``D_emp(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i`` behaves across them:

1. :func:`denoiser_similarity`: for probes ``x0_p`` and fixed noise draws ``n_p``, the outputs
   ``D_g(p) = D_emp(x0_p + sigma_g n_p; sigma_g)`` at every sigma of an ordered grid (the same
   ``(x0, n)`` at every sigma), centred on the training mean, and the matrix of mean cosine
   similarities ``S[g, h] = mean_p cos(D_g(p) - mu, D_h(p) - mu)`` ([G, G], symmetric, diagonal 1
   wherever the centred output is non-zero).
2. :func:`contiguous_segmentation`: the split of the grid into K contiguous intervals that
   minimizes the within-segment scatter

       cost = sum_segments  (1 / |seg|) * sum_{g, h in seg} (1 - S[g, h])  / 2,

   i.e. k-means restricted to contiguous clusters: for unit vectors ``|u - v|^2 = 2 (1 - cos)``, so
   each segment's term is the sum of squared distances of its (normalized) outputs to their centroid,
   averaged over probes. Exactly solved by dynamic programming in O(K G^2) time from 2-D prefix sums
   (no solver). Maximizing within-segment similarity in this size-normalized form does not favour
   one big segment or singletons; a block-constant similarity is split exactly at its blocks at any
   grid density that contains the block edges.
3. :func:`stage_boundaries`: the sigma at each cut, the geometric mean of the last sigma of one
   segment and the first of the next (the midpoint in log sigma).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffcore.ops import empirical_denoise


@dataclass(frozen=True)
class Segmentation:
    """``starts``: first grid index of every segment (``starts[0] == 0``), K entries; ``cost``:
    the minimized within-segment scatter (module docstring)."""

    starts: tuple[int, ...]
    cost: float

    def segments(self, grid_size: int) -> list[tuple[int, int]]:
        """Half-open index ranges ``[(start, stop), ...]`` covering ``range(grid_size)``."""
        stops = list(self.starts[1:]) + [grid_size]
        return list(zip(self.starts, stops))


def denoiser_similarity(
    probes: torch.Tensor,
    noise: torch.Tensor,
    train: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    backend: str = "auto",
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean cosine similarity of centred empirical-denoiser outputs across a sigma grid.

    probes: x0 [P, ...]; noise: n [P, ...] (same shape); train: the training set [N, ...] of the
    empirical denoiser; sigmas: G increasing noise levels > 0. Float64 tensors use the float64
    reference backend; float32 any backend. Returns S [G, G] float64 (module docstring, step 1).
    """
    if not isinstance(probes, torch.Tensor) or not isinstance(noise, torch.Tensor) or probes.shape != noise.shape:
        raise ValueError(
            f"noise: expected a tensor of the probes' shape {tuple(getattr(probes, 'shape', ()))}, "
            f"got {tuple(getattr(noise, 'shape', ()))}"
        )
    grid = _check_sigmas(sigmas)
    mean = train.to(torch.float64).mean(0).reshape(1, -1)
    units = []
    for sigma in grid:
        outputs = []
        for start in range(0, probes.shape[0], batch_size):
            x = probes[start : start + batch_size] + sigma * noise[start : start + batch_size]
            outputs.append(empirical_denoise(x, train, sigma, backend=backend))
        centred = torch.cat(outputs).reshape(probes.shape[0], -1).to(torch.float64) - mean.to(probes.device)
        units.append(centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-300))
    stacked = torch.stack(units)  # [G, P, d]
    return torch.einsum("gpd,hpd->gh", stacked, stacked).cpu() / probes.shape[0]


def contiguous_segmentation(similarity, num_segments: int) -> Segmentation:
    """Best split of the ordered grid into ``num_segments`` contiguous segments (module docstring).

    similarity: S [G, G] (array-like, symmetric); num_segments: K in [1, G]. O(K G^2) time.
    Ties go to the earliest cut positions.
    """
    dissimilarity = 1.0 - _check_square(similarity)
    grid_size = dissimilarity.shape[0]
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or not 1 <= num_segments <= grid_size:
        raise ValueError(f"num_segments: expected an integer in [1, {grid_size}], got {num_segments!r}")
    prefix = np.zeros((grid_size + 1, grid_size + 1))
    prefix[1:, 1:] = dissimilarity.cumsum(0).cumsum(1)
    idx = np.arange(grid_size + 1)
    # cost[i, j]: scatter of segment [i, j) (j > i), from the 2-D prefix sums in O(1) each.
    block = (
        prefix[idx[None, :], idx[None, :]]
        - prefix[idx[:, None], idx[None, :]]
        - prefix[idx[None, :], idx[:, None]]
        + prefix[idx[:, None], idx[:, None]]
    )
    lengths = idx[None, :] - idx[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(lengths > 0, block / (2.0 * np.maximum(lengths, 1)), np.inf)
    best = cost[0].copy()  # best[j]: one segment covering [0, j)
    choices = []
    for _ in range(1, num_segments):
        totals = best[:, None] + cost  # [i, j]: the best of [0, i) then segment [i, j)
        choice = totals.argmin(0)
        best = totals[choice, idx]
        choices.append(choice)
    starts = [grid_size]
    for choice in reversed(choices):
        starts.append(int(choice[starts[-1]]))
    starts = tuple(reversed(starts[1:]))
    return Segmentation(starts=(0,) + starts, cost=float(best[grid_size]))


def segmentation_cost(similarity, starts: Sequence[int]) -> float:
    """The within-segment scatter of a given split (direct sum; the check on the dynamic program)."""
    dissimilarity = 1.0 - _check_square(similarity)
    bounds = list(starts) + [dissimilarity.shape[0]]
    return float(sum(dissimilarity[a:b, a:b].sum() / (2.0 * (b - a)) for a, b in zip(bounds, bounds[1:])))


def stage_boundaries(sigmas: Sequence[float] | torch.Tensor, segmentation: Segmentation) -> list[float]:
    """The K-1 sigma boundaries of a segmentation: geometric means of the sigmas either side of each cut."""
    grid = _check_sigmas(sigmas)
    return [math.sqrt(grid[s - 1] * grid[s]) for s in segmentation.starts[1:]]


def _check_sigmas(sigmas) -> list[float]:
    grid = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if not grid or any(not (math.isfinite(s) and s > 0) for s in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
        raise ValueError(
            f"sigmas: expected a non-empty, strictly increasing grid of finite values > 0, got {grid[:8]}..."
        )
    return grid


def _check_square(similarity) -> np.ndarray:
    matrix = np.asarray(similarity.cpu() if isinstance(similarity, torch.Tensor) else similarity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"similarity: expected a non-empty square [G, G] matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("similarity: contains NaN or infinite values")
    return matrix
