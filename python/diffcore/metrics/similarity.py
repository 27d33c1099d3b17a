"""Similarity measures between images: pixel-space cosine and l2, and user-supplied descriptors.

Every measure maps images ``[B, ...]`` to embedding rows ``[B, F]`` in which the l2 distance is a
decreasing function of the similarity. Nearest-neighbour search then runs as an exact l2 k-NN on
the embeddings (``diffcore.ops.knn``), and the similarity of a neighbour is recovered from its
distance:

- ``cosine`` (pixel space, default): each image is flattened and *mean-centered per image* (its own
  mean pixel subtracted) before the cosine, i.e. Pearson correlation of pixels. Centering removes
  the constant background offset every image shares (digits and most images have a large uniform
  background at -1), which otherwise inflates every cosine toward 1. Embedding: unit vectors, and
  for unit vectors ``cos = 1 - |a - b|^2 / 2``.
- ``l2`` (pixel space): ``similarity = 1 - rms(a - b) / 2`` with ``rms = |a - b| / sqrt(D)``. For
  images in [-1, 1], rms lies in [0, 2], so the similarity lies in [0, 1] (1 = identical).
  Embedding: rows divided by ``2 sqrt(D)``, similarity = ``1 - distance``.
- a TorchScript (``torch.jit.save``) or ``torch.export`` (``.pt2``) feature extractor (e.g. a copy-detection descriptor such as SSCD that the user
  has): ``torch.jit.load(path)`` maps ``[B, C, H, W]`` to ``[B, F]``; similarity is the cosine of
  the descriptors, as in the reproducibility paper (PAPERS.md section 1, threshold 0.6).

Thresholds: descriptors default to 0.6 (paper). Pixel-space measures have no universal threshold:
their default is calibrated on the data (``diffcore.metrics.calibrate_threshold``), see
docs/experiments.md.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

DESCRIPTOR_THRESHOLD = 0.6  # cosine of copy-detection descriptors, as in the paper (PAPERS.md s.1)


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [B, ...]`` as float32 rows ``[B, D]``; uint8 images map to [-1, 1] as ``u8 / 127.5 - 1``."""
    rows = x.reshape(x.shape[0], -1)
    if rows.dtype == torch.uint8:
        return rows.float() / 127.5 - 1.0
    return rows.float()


def _unit_rows(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit norm; an all-zero row stays zero (its cosine with anything is 0)."""
    norms = rows.norm(dim=1, keepdim=True)
    return torch.where(norms > eps, rows / norms.clamp_min(eps), torch.zeros_like(rows))


class Similarity:
    """Base class: ``embed`` images, and turn embedding distances into similarities."""

    name: str = "similarity"
    default_threshold: float | None = None  # None: calibrate on the data

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, ...]`` -> embedding rows ``[B, F]`` (float32)."""
        raise NotImplementedError

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        """Similarity of two images whose embeddings are ``distance`` apart (elementwise)."""
        raise NotImplementedError

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Similarity of ``a[i]`` and ``b[i]`` for each row: ``[B]``."""
        ea, eb = self.embed(a), self.embed(b)
        return self.from_distance((ea - eb).norm(dim=1))

    def describe(self) -> dict:
        return {"name": self.name, "default_threshold": self.default_threshold}


class PixelCosine(Similarity):
    """Cosine of flattened, per-image mean-centered pixels (Pearson correlation)."""

    name = "cosine"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        rows = flatten_rows(x)
        return _unit_rows(rows - rows.mean(dim=1, keepdim=True))

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance.float().square() / 2.0  # |a - b|^2 = 2 - 2 cos for unit a, b

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.embed(a) * self.embed(b)).sum(dim=1)  # exact cosine, no distance round trip


class PixelL2(Similarity):
    """``1 - rms(a - b) / 2``: 1 for identical images, 0 for opposite images in [-1, 1]."""

    name = "l2"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        rows = flatten_rows(x)
        return rows / (2.0 * math.sqrt(rows.shape[1]))

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance.float()


@dataclass
class FeatureCosine(Similarity):
    """Cosine of descriptors computed by a TorchScript module loaded from ``path``.

    The module takes images ``[B, C, H, W]`` in [-1, 1] (diffcore's convention) and returns
    ``[B, F]`` (any trailing shape is flattened). It runs under ``torch.no_grad`` in batches of
    ``batch_size`` on ``device``.
    """

    path: str
    device: str = "cpu"
    batch_size: int = 256
    default_threshold: float | None = DESCRIPTOR_THRESHOLD
    _module: object = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"features:{os.path.basename(self.path)}"

    def module(self):
        if self._module is None:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"similarity: feature extractor file {self.path!r} does not exist")
            if self.path.endswith(".pt2"):  # torch.export archive
                self._module = torch.export.load(self.path).module().to(self.device)
            else:
                self._module = torch.jit.load(self.path, map_location=self.device).eval()
        return self._module

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        module = self.module()
        outs = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start:start + self.batch_size].to(self.device, torch.float32)
            outs.append(module(batch).reshape(batch.shape[0], -1).float().cpu())
        feats = torch.cat(outs) if outs else torch.zeros(0, 0)
        return _unit_rows(feats)

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance.float().square() / 2.0

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.embed(a) * self.embed(b)).sum(dim=1)

    def describe(self) -> dict:
        return {"name": self.name, "path": os.path.abspath(self.path),
                "default_threshold": self.default_threshold}


def get_similarity(spec: str | Similarity, device: str = "cpu") -> Similarity:
    """A similarity from its name: ``"cosine"``, ``"l2"``, or a path to a TorchScript file
    (``"features:/path/model.pt"`` or just the path)."""
    if isinstance(spec, Similarity):
        return spec
    if spec == "cosine":
        return PixelCosine()
    if spec == "l2":
        return PixelL2()
    path = spec[len("features:"):] if spec.startswith("features:") else spec
    if path.endswith((".pt", ".pth", ".ts", ".jit", ".pt2")) or os.path.isfile(path):
        return FeatureCosine(path=path, device=device)
    raise ValueError(f"similarity: expected 'cosine', 'l2' or a TorchScript file path, got {spec!r}")


def default_knn():
    """The exact k-NN op every metric uses unless one is passed in (``diffcore.ops.knn``)."""
    from diffcore.ops import knn

    return knn


def nearest_neighbors(samples: torch.Tensor, train: torch.Tensor, similarity: Similarity, k: int = 1,
                      knn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar training images of each sample.

    Args:
        samples: ``[B, ...]``; train: ``[N, ...]``; similarity: a :class:`Similarity`;
        knn: ``knn(queries [B, F], train [N, F], k) -> (distances [B, k], indices [B, k])``,
            default ``diffcore.ops.knn``.
    Returns:
        ``(similarities [B, k] float32, indices [B, k] int64)``, most similar first.
    """
    knn = knn or default_knn()
    distances, indices = knn(similarity.embed(samples), similarity.embed(train), k=k)
    return similarity.from_distance(distances.float().cpu()), indices.cpu().long()
