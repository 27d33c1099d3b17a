"""Reproducibility (RP) score between two sample sets drawn from the same seeds (docs/papers.md section 1).

``RP(A, B)`` = fraction of seeds ``i`` whose samples ``A[i]`` and ``B[i]`` have similarity above the
threshold. Both sets must come from the same initial noise (same seeds, deterministic sampler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcore.metrics.memorization import _resolve_threshold
from diffcore.metrics.similarity import Similarity, exact_mean


@dataclass(frozen=True)
class RPResult:
    score: float
    threshold: float
    similarity: torch.Tensor  # [B] similarity of the two samples of each seed
    reproduced: torch.Tensor  # [B] bool

    def summary(self) -> dict:
        return {"rp": self.score, "threshold": self.threshold, "similarity_mean": exact_mean(self.similarity)}


def rp_score(
    samples_a: torch.Tensor, samples_b: torch.Tensor, similarity: Similarity, threshold: float | None = None
) -> RPResult:
    """RP score of ``samples_a [B, ...]`` vs ``samples_b [B, ...]`` (row i = seed i in both)."""
    if samples_a.shape != samples_b.shape:
        raise ValueError(
            f"samples_b: shape {tuple(samples_b.shape)} differs from samples_a's "
            f"{tuple(samples_a.shape)}; RP compares samples of the same seeds"
        )
    threshold = _resolve_threshold(threshold, similarity)
    sims = similarity.pairwise(samples_a, samples_b).float().cpu()
    reproduced = sims > threshold
    score = exact_mean(reproduced)
    return RPResult(score, threshold, sims, reproduced)
