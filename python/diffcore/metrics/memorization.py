"""Generalization (GL) score, memorization ratio, and the calibrated pixel-space threshold.

- GL score (docs/papers.md section 1): the fraction of samples whose most similar training image has
  similarity below the threshold (the memorized fraction is ``1 - GL``).
- Memorization ratio (Gu et al., DiffMemorize): a sample ``x`` is memorized when
  ``|x - NN1| / |x - NN2| < 1/3`` in pixel l2, NN1 and NN2 its two nearest training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcore.metrics.similarity import Similarity, default_knn, exact_mean, flatten_rows, nearest_neighbors

MEMORIZATION_RATIO_THRESHOLD = 1.0 / 3.0  # Gu et al.
CALIBRATION_QUANTILE = 0.95


@dataclass(frozen=True)
class GLResult:
    score: float  # fraction of samples with nn_similarity < threshold
    threshold: float
    nn_similarity: torch.Tensor  # [B] similarity to the most similar training image
    nn_index: torch.Tensor  # [B] index of that training image
    generalized: torch.Tensor  # [B] bool

    def summary(self) -> dict:
        return {"gl": self.score, "threshold": self.threshold, "nn_similarity_mean": exact_mean(self.nn_similarity)}


@dataclass(frozen=True)
class MemorizationResult:
    fraction: float  # fraction of samples with ratio < threshold
    threshold: float
    ratio: torch.Tensor  # [B] |x - NN1| / |x - NN2|
    nn_index: torch.Tensor  # [B, 2] indices of NN1, NN2
    nn_distance: torch.Tensor  # [B, 2] l2 distances
    memorized: torch.Tensor  # [B] bool

    def summary(self) -> dict:
        return {
            "memorized_fraction": self.fraction,
            "threshold": self.threshold,
            "ratio_median": float(self.ratio.median()) if self.ratio.numel() else float("nan"),
        }


def _resolve_threshold(threshold: float | None, similarity: Similarity) -> float:
    threshold = similarity.default_threshold if threshold is None else threshold
    if threshold is None:
        raise ValueError(
            f"threshold: similarity {similarity.name!r} has no fixed default; pass a number "
            "or calibrate one with diffcore.metrics.calibrate_threshold(pool, similarity)"
        )
    return float(threshold)


def gl_score(
    samples: torch.Tensor, train: torch.Tensor, similarity: Similarity, threshold: float | None = None, knn=None
) -> GLResult:
    """GL score of ``samples [B, ...]`` against ``train [N, ...]`` (docs/papers.md section 1)."""
    if samples.shape[1:] != train.shape[1:]:
        raise ValueError(
            f"samples: trailing shape {tuple(samples.shape[1:])} differs from train's {tuple(train.shape[1:])}"
        )
    threshold = _resolve_threshold(threshold, similarity)
    sims, idx = nearest_neighbors(samples, train, similarity, k=1, knn=knn)
    nn_similarity, nn_index = sims[:, 0], idx[:, 0]
    generalized = nn_similarity < threshold
    score = exact_mean(generalized)
    return GLResult(score, threshold, nn_similarity, nn_index, generalized)


def memorization_ratio(
    samples: torch.Tensor, train: torch.Tensor, threshold: float = MEMORIZATION_RATIO_THRESHOLD, knn=None
) -> MemorizationResult:
    """Memorization ratio ``|x - NN1| / |x - NN2|`` in pixel l2 (Gu et al.); needs ``N >= 2``.

    An exact copy of a training image that is duplicated in the training set (both distances 0)
    has ratio 0 (memorized).
    """
    if train.shape[0] < 2:
        raise ValueError(f"train: the memorization ratio needs at least 2 training images, got {train.shape[0]}")
    knn = knn or default_knn()
    distances, indices = knn(flatten_rows(samples), flatten_rows(train), k=2)
    d = distances.double().cpu()
    d1, d2 = d[:, 0], d[:, 1]
    ratio = torch.where(d2 > 0, d1 / d2.clamp_min(1e-300), torch.zeros_like(d1))
    memorized = ratio < threshold
    fraction = exact_mean(memorized)
    return MemorizationResult(fraction, float(threshold), ratio, indices.cpu().long(), d.float(), memorized)


def nearest_other_similarity(
    pool: torch.Tensor, similarity: Similarity, max_queries: int = 2048, seed: int = 0, knn=None
) -> torch.Tensor:
    """Similarity of pool images to their most similar *other* pool image: ``[min(P, max_queries)]``.

    Queries are a seeded random subset of the pool (all of it when ``P <= max_queries``).
    """
    if pool.shape[0] < 2:
        raise ValueError(f"pool: need at least 2 images to calibrate, got {pool.shape[0]}")
    if pool.shape[0] > max_queries:
        gen = torch.Generator().manual_seed(seed)
        query_idx = torch.randperm(pool.shape[0], generator=gen)[:max_queries].sort().values
    else:
        query_idx = torch.arange(pool.shape[0])
    sims, idx = nearest_neighbors(pool[query_idx], pool, similarity, k=2, knn=knn)
    first_is_self = idx[:, 0] == query_idx
    return torch.where(first_is_self, sims[:, 1], sims[:, 0])


def calibrate_threshold(
    pool: torch.Tensor,
    similarity: Similarity,
    quantile: float = CALIBRATION_QUANTILE,
    max_queries: int = 2048,
    seed: int = 0,
    knn=None,
) -> float:
    """Pixel-space threshold calibrated on the data.

    The ``quantile`` (default 0.95) of the similarity between a pool image and its most similar
    *other* pool image: a sample counts as a copy only when it is closer to a training image than
    95% of real images are to their nearest distinct neighbour. Computed once on the full data
    pool (not per subset) so that every N is judged by the same threshold.
    """
    values = nearest_other_similarity(pool, similarity, max_queries=max_queries, seed=seed, knn=knn)
    return float(torch.quantile(values.double(), quantile))
