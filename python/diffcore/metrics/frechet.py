"""Frechet distance between two sets of images in a feature space (FID when the features are Inception's).

``FD = |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr (S_a S_b)^(1/2)`` (Heusel et al. 2017, Eq. 6),
with ``mu, S`` the mean and covariance of the features of each set.

- :class:`FeatureStatistics`: streaming mean and covariance, accumulated in float64 (pairwise
  merge of Chan et al., so a batch's mean is removed before its squares are summed); saved and
  loaded atomically as safetensors or ``.npz`` (the ``mu``/``sigma`` keys of pytorch-fid's
  statistics files), so a reference set is featurized once and reused.
- :func:`feature_statistics`: statistics of images through a feature extractor, batch by batch.
- :func:`frechet_distance`: the distance between two statistics, feature sets or image sets.
- :func:`trace_sqrt_product`: ``Tr (S_a S_b)^(1/2)`` in float64 without scipy, as
  ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))`` (a symmetric positive semi-definite matrix similar
  to ``S_a S_b``, so it has the same eigenvalues; both square roots come from ``eigh``).

A feature extractor is any callable mapping images ``[B, C, H, W]`` to ``[B, F]``; its ``name``
attribute (if any) is recorded in the statistics, and two statistics of different extractors
are refused. Built-in extractors: ``diffcore.metrics.digits_features()`` (shipped digits network)
and ``diffcore.metrics.inception_features(path)`` (FID's Inception-v3 from a local weights file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcore._atomic import atomic_write

log = logging.getLogger(__name__)

_FORMAT = "diffcore.feature_statistics.v1"


@dataclass
class FeatureStatistics:
    """Mean and covariance of feature rows, accumulated in float64.

    ``count`` rows seen; ``mean [F]``; ``scatter [F, F]`` = sum of outer products of the centered
    rows. ``covariance`` is ``scatter / (count - 1)`` (unbiased, as ``numpy.cov`` and pytorch-fid).
    Statistics loaded from a file without a count (pytorch-fid's ``.npz``) can be compared but
    not extended. ``extractor`` names the features (``None``: unknown).
    """

    count: int = 0
    mean: torch.Tensor | None = None
    scatter: torch.Tensor | None = None
    extractor: str | None = None

    @classmethod
    def from_features(cls, features: torch.Tensor, extractor: str | None = None) -> FeatureStatistics:
        """Statistics of ``features [N, F]``."""
        return cls(extractor=extractor).update(features)

    @property
    def dim(self) -> int | None:
        return None if self.mean is None else int(self.mean.shape[0])

    @property
    def covariance(self) -> torch.Tensor:
        """``[F, F]`` float64, unbiased (``count - 1`` in the denominator)."""
        if self.scatter is None or self.count < 2:
            raise ValueError(f"FeatureStatistics: a covariance needs at least 2 feature rows, have {self.count}")
        return self.scatter / (self.count - 1)

    def update(self, features: torch.Tensor) -> FeatureStatistics:
        """Add the rows of ``features [B, F]`` (any float dtype; accumulated in float64). Returns self."""
        rows = _feature_rows(features, "features", self.dim)
        return self._merge(rows.shape[0], rows.mean(dim=0), _centered_scatter(rows))

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add the rows summarized by ``other`` (statistics of the same extractor). Returns self."""
        _check_same_extractor(self, other)
        if other.mean is not None and other.scatter is None:
            raise ValueError(
                "FeatureStatistics.merge: 'other' has no row count (loaded from a file "
                "without one, e.g. pytorch-fid's .npz) and cannot be merged"
            )
        if other.count == 0:
            return self
        _feature_rows(other.mean[None], "other.mean", self.dim)
        return self._merge(other.count, other.mean, other.scatter)

    def _merge(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> FeatureStatistics:
        # Chan, Golub & LeVeque (1979): pairwise update of mean and centered scatter.
        if self.mean is not None and self.scatter is None:
            raise ValueError("FeatureStatistics: statistics loaded without a row count cannot be extended")
        if count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.scatter = count, mean.clone(), scatter.clone()
            return self
        total = self.count + count
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + torch.outer(delta, delta) * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total
        return self

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (``.safetensors`` or ``.npz``) atomically; returns the path.

        ``.npz`` holds ``mu`` and ``sigma`` (covariance) as pytorch-fid's statistics files do,
        plus ``count``; ``.safetensors`` holds the same tensors and the extractor's name.
        """
        path = Path(path)
        if self.count < 2:
            raise ValueError(f"FeatureStatistics.save: need at least 2 feature rows, have {self.count}")
        arrays = {
            "mu": self.mean.numpy(),
            "sigma": self.covariance.numpy(),
            "count": np.array([self.count], dtype=np.int64),
        }
        if path.suffix == ".npz":
            atomic_write(path, lambda fh: np.savez(fh, **arrays))
        elif path.suffix == ".safetensors":
            from safetensors.numpy import save

            metadata = {"format": _FORMAT, "extractor": self.extractor or ""}
            atomic_write(path, lambda fh: fh.write(save(arrays, metadata=metadata)))
        else:
            raise ValueError(f"FeatureStatistics.save: path must end in .safetensors or .npz, got {str(path)!r}")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, extractor: str | None = None) -> FeatureStatistics:
        """Read statistics written by :meth:`save`, or a pytorch-fid ``.npz`` (``mu``, ``sigma``).

        No pickles are read. ``extractor`` names the features of a file that does not say it
        (a pytorch-fid file: pass ``"inception-v3-pool3"``).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FeatureStatistics.load: no file {str(path)!r}")
        if path.suffix not in (".npz", ".safetensors"):
            raise ValueError(f"FeatureStatistics.load: path must end in .safetensors or .npz, got {str(path)!r}")
        try:
            arrays, stored_extractor = _read_arrays(path)
        except Exception as err:  # a corrupt or truncated file: name it
            if str(path) in str(err):
                raise
            raise ValueError(
                f"FeatureStatistics.load: {str(path)!r} is not a readable {path.suffix} "
                f"statistics file ({type(err).__name__}: {err})"
            ) from None
        return cls._from_arrays(arrays, stored_extractor or extractor, str(path))

    @classmethod
    def _from_arrays(cls, arrays: dict, extractor: str | None, source: str) -> FeatureStatistics:
        if "mu" not in arrays or "sigma" not in arrays:
            raise ValueError(f"FeatureStatistics.load: {source!r} lacks the arrays 'mu' and 'sigma'")
        mean = _real_array(arrays["mu"], "mu", source).reshape(-1)
        cov = _real_array(arrays["sigma"], "sigma", source)
        if cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"FeatureStatistics.load: {source!r}: 'sigma' has shape {tuple(cov.shape)}, "
                f"expected {(mean.shape[0], mean.shape[0])} to match 'mu'"
            )
        _check_covariance(cov, source)
        if "count" not in arrays:  # pytorch-fid: mean and covariance only
            return _UncountedStatistics(mean, cov, extractor)
        count = _row_count(arrays["count"], source)
        return cls(count=count, mean=mean, scatter=cov * (count - 1), extractor=extractor)


def _read_arrays(path: Path) -> tuple[dict, str | None]:
    """The arrays of a statistics file and the extractor it names (None for ``.npz``)."""
    if path.suffix == ".npz":
        archive = np.load(path, allow_pickle=False)
        if not hasattr(archive, "files"):
            raise ValueError(f"FeatureStatistics.load: {str(path)!r} is not an .npz archive")
        with archive:
            return {key: archive[key] for key in archive.files}, None
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        arrays = {key: fh.get_tensor(key) for key in fh.keys()}
        metadata = fh.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"FeatureStatistics.load: {str(path)!r} is not a diffcore statistics file")
    return arrays, metadata.get("extractor") or None


def _real_array(array, key: str, source: str) -> torch.Tensor:
    """``array`` as float64, refused (naming the file and key) unless real and finite."""
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"FeatureStatistics.load: {source!r}: {key!r} has dtype {array.dtype}, expected real numbers")
    values = torch.from_numpy(array.astype(np.float64))
    if not torch.isfinite(values).all():
        raise ValueError(f"FeatureStatistics.load: {source!r}: {key!r} holds NaN or infinite values")
    return values


# A stored covariance is symmetric and positive semi-definite up to the rounding of its storage
# (float32 files): asymmetry and negative eigenvalues are allowed up to this fraction of its
# largest absolute entry / eigenvalue.
COVARIANCE_RTOL = 1e-5


def _check_covariance(cov: torch.Tensor, source: str) -> None:
    scale = float(cov.abs().max()) if cov.numel() else 0.0
    asymmetry = float((cov - cov.T).abs().max()) if cov.numel() else 0.0
    if asymmetry > COVARIANCE_RTOL * scale:
        raise ValueError(
            f"FeatureStatistics.load: {source!r}: 'sigma' is not symmetric (largest "
            f"|S - S^T| = {asymmetry:.3g}, largest |S| = {scale:.3g}); not a covariance"
        )
    eigenvalues = torch.linalg.eigvalsh((cov + cov.T) / 2) if cov.numel() else cov.new_zeros(1)
    if float(eigenvalues.min()) < -COVARIANCE_RTOL * max(float(eigenvalues.abs().max()), 1e-300):
        raise ValueError(
            f"FeatureStatistics.load: {source!r}: 'sigma' has a negative eigenvalue "
            f"{float(eigenvalues.min()):.3g}; a covariance is positive semi-definite"
        )


def _row_count(array, source: str) -> int:
    array = np.asarray(array)
    if array.dtype.kind not in "iu" or array.size != 1:
        raise ValueError(
            f"FeatureStatistics.load: {source!r}: 'count' must be one integer, got "
            f"{array.size} value(s) of dtype {array.dtype}"
        )
    count = int(array.reshape(-1)[0])
    if count < 2:
        raise ValueError(f"FeatureStatistics.load: {source!r}: 'count' is {count}; a covariance needs at least 2 rows")
    return count


class _UncountedStatistics(FeatureStatistics):
    """Mean and covariance without a row count (a pytorch-fid ``.npz``): comparable, not extendable."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, extractor: str | None):
        super().__init__(count=0, mean=mean, scatter=None, extractor=extractor)
        self._cov = cov

    @property
    def covariance(self) -> torch.Tensor:
        return self._cov

    def save(self, path):
        raise ValueError("FeatureStatistics.save: statistics loaded without a row count are not re-saved")


def _feature_rows(features: torch.Tensor, name: str, dim: int | None) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name}: expected feature rows [N, F], got {shape}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} features per row (as accumulated so far), got {features.shape[1]}")
    rows = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(rows).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return rows


def _centered_scatter(rows: torch.Tensor) -> torch.Tensor:
    centered = rows - rows.mean(dim=0)
    return centered.T @ centered


def _check_same_extractor(a: FeatureStatistics, b: FeatureStatistics) -> None:
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise ValueError(f"statistics of different feature extractors: {a.extractor!r} and {b.extractor!r}")


# ---------------------------------------------------------------------- computing statistics


def feature_statistics(
    images: torch.Tensor | Iterable[torch.Tensor],
    extractor: Callable,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> FeatureStatistics:
    """Statistics of ``extractor(images)``, computed batch by batch.

    Args:
        images: a tensor ``[N, C, H, W]`` (split into batches of ``batch_size``) or an iterable of
            batches (e.g. a sample generator), in the extractor's input convention.
        extractor: ``[B, C, H, W] -> [B, F]``, run under ``torch.no_grad`` on ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"feature_statistics: batch_size must be >= 1, got {batch_size}")
    if isinstance(images, torch.Tensor):
        batches: Iterable[torch.Tensor] = images.split(batch_size)
        total = -(-images.shape[0] // batch_size)
    else:
        batches, total = images, None
    stats = FeatureStatistics(extractor=getattr(extractor, "name", None))
    from tqdm.auto import tqdm

    with torch.no_grad():
        for batch in tqdm(batches, total=total, disable=not progress, desc="features"):
            stats.update(extractor(batch.to(device)))
    log.debug("feature statistics of %d rows (%s)", stats.count, stats.extractor)
    return stats


# ---------------------------------------------------------------------- the distance


def sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix through ``eigh`` (float64).

    Eigenvalues below 0 (rounding of a singular matrix) are clamped to 0.
    """
    m = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def trace_sqrt_product(cov_a: torch.Tensor, cov_b: torch.Tensor) -> float:
    """``Tr (S_a S_b)^(1/2)`` for covariances ``[F, F]``, in float64.

    ``S_a S_b`` is similar to ``M = S_a^(1/2) S_b S_a^(1/2)`` (symmetric PSD), so the trace is the
    sum of the square roots of ``M``'s eigenvalues, clamped at 0.
    """
    root_a = sqrt_psd(cov_a)
    m = root_a @ cov_b.to(torch.float64) @ root_a
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())


def frechet_distance_gaussians(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """Frechet (2-Wasserstein squared) distance of ``N(mean_a, cov_a)`` and ``N(mean_b, cov_b)``, float64."""
    mean_a, mean_b = mean_a.to(torch.float64).reshape(-1), mean_b.to(torch.float64).reshape(-1)
    dim = mean_a.shape[0]
    for name, value in (("mean_b", mean_b), ("cov_a", cov_a), ("cov_b", cov_b)):
        expected = (dim,) if name == "mean_b" else (dim, dim)
        if tuple(value.shape) != expected:
            raise ValueError(f"frechet_distance: {name} has shape {tuple(value.shape)}, expected {expected}")
    cov_a, cov_b = cov_a.to(torch.float64), cov_b.to(torch.float64)
    mean_term = float((mean_a - mean_b).square().sum())
    return mean_term + float(cov_a.trace() + cov_b.trace()) - 2.0 * trace_sqrt_product(cov_a, cov_b)


def frechet_distance(
    a: FeatureStatistics | torch.Tensor,
    b: FeatureStatistics | torch.Tensor,
    *,
    extractor: Callable | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """Frechet distance between two sets (FID with Inception features).

    Each of ``a`` and ``b`` is a :class:`FeatureStatistics` (e.g. a saved reference set), or a
    tensor: feature rows ``[N, F]`` when ``extractor`` is None, else images ``[N, C, H, W]`` that
    are passed through ``extractor`` (see :func:`feature_statistics`). Returns a float (>= 0 up to
    rounding), computed in float64.
    """
    stats = []
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, FeatureStatistics):
            stats.append(value)
        elif extractor is not None:
            stats.append(feature_statistics(value, extractor, batch_size=batch_size, device=device))
        elif isinstance(value, torch.Tensor):
            stats.append(FeatureStatistics.from_features(_feature_rows(value, name, None)))
        else:
            raise ValueError(
                f"frechet_distance: {name} must be FeatureStatistics or a tensor, got {type(value).__name__}"
            )
    _check_same_extractor(*stats)
    if stats[0].dim != stats[1].dim:
        raise ValueError(f"frechet_distance: a has {stats[0].dim} features, b has {stats[1].dim}")
    return frechet_distance_gaussians(stats[0].mean, stats[0].covariance, stats[1].mean, stats[1].covariance)
