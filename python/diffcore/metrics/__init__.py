"""Metrics of memorization, generalization and reproducibility (docs/papers.md sections 1, 2).

- :func:`gl_score`, :func:`memorization_ratio`, :func:`calibrate_threshold` (memorization.py)
- :func:`rp_score` (reproducibility.py)
- :func:`pfd`, :func:`pfd_from_samples` (pfd.py)
- similarity measures: ``"cosine"`` (pixel, default), ``"l2"``, descriptor files with their kind
  (``"sscd:PATH"``, ``"raw:PATH"``), loaded without unpickling (similarity.py)
- sample quality: :func:`frechet_distance`, :class:`FeatureStatistics` (frechet.py); feature
  extractors :func:`digits_features` / :func:`digits_classifier` (shipped digits network,
  features.py) and :func:`inception_features` (FID's Inception-v3 from a local file, inception.py)
- watermark evaluation: ROC-AUC, TPR at a FPR, PSNR/SSIM, attacks (``diffcore.metrics.watermark``,
  imported on use: it needs scikit-image)
"""

from diffcore.metrics.features import (
    DigitsNetwork,
    class_accuracy,
    digits_classifier,
    digits_features,
    digits_network_info,
)
from diffcore.metrics.frechet import FeatureStatistics, feature_statistics, frechet_distance
from diffcore.metrics.inception import InceptionFeatures, inception_features
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
    DESCRIPTOR_KINDS,
    DESCRIPTOR_THRESHOLD,
    DescriptorPreprocess,
    FeatureCosine,
    PixelCosine,
    PixelL2,
    Similarity,
    exact_mean,
    get_similarity,
    load_descriptor,
    nearest_neighbors,
)

__all__ = [
    "DigitsNetwork",
    "FeatureStatistics",
    "InceptionFeatures",
    "class_accuracy",
    "digits_classifier",
    "digits_features",
    "digits_network_info",
    "feature_statistics",
    "frechet_distance",
    "inception_features",
    "DESCRIPTOR_KINDS",
    "DescriptorPreprocess",
    "load_descriptor",
    "CALIBRATION_QUANTILE",
    "DESCRIPTOR_THRESHOLD",
    "MEMORIZATION_RATIO_THRESHOLD",
    "FeatureCosine",
    "GLResult",
    "MemorizationResult",
    "PFDResult",
    "PixelCosine",
    "PixelL2",
    "RPResult",
    "Similarity",
    "calibrate_threshold",
    "exact_mean",
    "flow_map",
    "get_similarity",
    "gl_score",
    "memorization_ratio",
    "nearest_neighbors",
    "nearest_other_similarity",
    "pfd",
    "pfd_from_samples",
    "rp_score",
]
