"""Metrics of memorization, generalization and reproducibility (PAPERS.md sections 1, 2).

- :func:`gl_score`, :func:`memorization_ratio`, :func:`calibrate_threshold` (memorization.py)
- :func:`rp_score` (reproducibility.py)
- :func:`pfd`, :func:`pfd_from_samples` (pfd.py)
- similarity measures: ``"cosine"`` (pixel, default), ``"l2"``, TorchScript descriptors (similarity.py)
- watermark evaluation: ROC-AUC, TPR at a FPR, PSNR/SSIM, attacks (``diffcore.metrics.watermark``,
  imported on use: it needs scikit-image)
"""
from diffcore.metrics.memorization import (
    CALIBRATION_QUANTILE,
    MEMORIZATION_RATIO_THRESHOLD,
    GLResult,
    MemorizationResult,
    calibrate_threshold,
    gl_score,
    memorization_ratio,
    nearest_other_similarity,
)
from diffcore.metrics.pfd import PFDResult, flow_map, pfd, pfd_from_samples
from diffcore.metrics.reproducibility import RPResult, rp_score
from diffcore.metrics.similarity import (
    DESCRIPTOR_THRESHOLD,
    FeatureCosine,
    PixelCosine,
    PixelL2,
    Similarity,
    get_similarity,
    nearest_neighbors,
)

__all__ = [
    "CALIBRATION_QUANTILE", "DESCRIPTOR_THRESHOLD", "MEMORIZATION_RATIO_THRESHOLD", "FeatureCosine",
    "GLResult", "MemorizationResult", "PFDResult", "PixelCosine", "PixelL2", "RPResult", "Similarity",
    "calibrate_threshold", "flow_map", "get_similarity", "gl_score", "memorization_ratio",
    "nearest_neighbors", "nearest_other_similarity", "pfd", "pfd_from_samples", "rp_score",
]
