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
- a descriptor file with its kind, ``KIND:PATH``: a TorchScript (``torch.jit.save``) network the
  user has, mapping preprocessed images to
  ``[B, F]``; similarity is the cosine of the descriptors, as in the reproducibility paper
  (PAPERS.md section 1, threshold 0.6). The kind states the preprocessing: ``sscd`` (the paper's
  SSCD: 320x320, ImageNet mean/std) or ``raw`` (images in [-1, 1] at their own size). Files load
  running no Python; ``torch.export`` archives are refused (:func:`load_descriptor`).

Thresholds: descriptors default to 0.6 (paper). Pixel-space measures have no universal threshold:
their default is calibrated on the data (``diffcore.metrics.calibrate_threshold``), see
docs/experiments.md.
"""
from __future__ import annotations

import dataclasses
import math
import os
import zipfile
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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DescriptorPreprocess:
    """What a descriptor network receives: images ``[B, C, H, W]`` in [-1, 1] (uint8 as ``u8 / 127.5 - 1``)
    are resized to ``size x size`` (bilinear, ``align_corners=False``; ``None``: own size), one
    channel is repeated to RGB when ``rgb``, and with ``mean``/``std`` the images are mapped to
    [0, 1] and normalized per channel ``(x01 - mean) / std``; without them they stay in [-1, 1].
    """

    size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    rgb: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        if x.dim() != 4:
            raise ValueError(f"similarity: descriptor input must be images [B, C, H, W], got {tuple(x.shape)}")
        if self.rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size is not None:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
            x = ((x + 1.0) / 2.0 - mean) / std
        return x


# Descriptor kinds: the preprocessing each one states. ``sscd``: the copy-detection descriptor of
# the reproducibility paper (Pizzi et al. 2022), as its public code feeds it (resize to 320x320,
# [0, 1], ImageNet mean/std). ``raw``: the generic kind, images exactly as diffcore holds them.
DESCRIPTOR_KINDS = {
    "sscd": DescriptorPreprocess(size=320, mean=IMAGENET_MEAN, std=IMAGENET_STD, rgb=True),
    "raw": DescriptorPreprocess(),
}


@dataclass
class FeatureCosine(Similarity):
    """Cosine of descriptors computed by a TorchScript module loaded from ``path``.

    ``kind`` (a key of ``DESCRIPTOR_KINDS``) states the preprocessing (``preprocess`` overrides it):
    ``"sscd"`` resizes to 320x320 and normalizes with ImageNet mean/std; ``"raw"`` passes images
    ``[B, C, H, W]`` in [-1, 1] at their own size. The module returns ``[B, F]`` (trailing shape
    flattened) and runs under ``torch.no_grad`` in batches of ``batch_size`` on ``device``.
    Files load through :func:`load_descriptor` (TorchScript only, no Python runs).
    """

    path: str
    kind: str
    device: str = "cpu"
    batch_size: int = 256
    preprocess: DescriptorPreprocess | None = None
    default_threshold: float | None = DESCRIPTOR_THRESHOLD
    _module: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.preprocess is None:
            if self.kind not in DESCRIPTOR_KINDS:
                raise ValueError(f"similarity: unknown descriptor kind {self.kind!r}; known: "
                                 f"{', '.join(DESCRIPTOR_KINDS)} (or pass preprocess=)")
            self.preprocess = DESCRIPTOR_KINDS[self.kind]

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.kind}:{os.path.basename(self.path)}"

    def module(self):
        if self._module is None:
            self._module = load_descriptor(self.path, self.device)
        return self._module

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module()
        outs = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = self.preprocess(x[start:start + self.batch_size].to(self.device))
            outs.append(module(batch).reshape(batch.shape[0], -1).float().cpu())
        feats = torch.cat(outs) if outs else torch.zeros(0, 0)
        return _unit_rows(feats)

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance.float().square() / 2.0

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.embed(a) * self.embed(b)).sum(dim=1)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": os.path.abspath(self.path),
                "preprocess": dataclasses.asdict(self.preprocess), "default_threshold": self.default_threshold}


# ------------------------------------------------------------------ loading descriptor files safely

def load_descriptor(path: str | os.PathLike, device: str = "cpu"):
    """Load a descriptor network from a TorchScript file (``torch.jit.save``), running no Python.

    TorchScript files are read by TorchScript's own loader: it compiles the archive's TorchScript
    code and reads its tensors with a restricted unpickler, importing and evaluating no Python.
    ``torch.export`` archives (``.pt2``, recognised by their content, not their suffix) are refused:
    ``torch.export.load`` evaluates text from the archive with ``sympy.sympify`` (a shape
    expression in ``models/*.json`` can run any Python) and resolves graph targets to Python
    callables by name, so no check of the archive short of re-implementing its loader makes it safe.
    What a TorchScript file is still trusted with: its network then runs with your permissions and
    ATen ops can read and write files, so use descriptor files from a source you trust.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"similarity: descriptor (feature extractor) file {path!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"similarity: descriptor file {path!r} is not a TorchScript file (torch.jit.save)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(name.split("/", 1)[-1] == "archive_format" for name in names):
            raise ValueError(f"similarity: refusing torch.export archive {path!r}: loading one evaluates "
                             "text from the file as Python (sympy), so only TorchScript descriptors are "
                             "accepted; save the network with torch.jit.save(torch.jit.trace(model, images))")
        if not any("/code/" in name for name in names) or not any(n.endswith("/data.pkl") for n in names):
            raise ValueError(f"similarity: descriptor file {path!r} is a zip archive but not a TorchScript "
                             "file (torch.jit.save)")
    return torch.jit.load(path, map_location=device).eval()


def get_similarity(spec: str | Similarity, device: str = "cpu") -> Similarity:
    """A similarity from its name: ``"cosine"``, ``"l2"``, or ``"KIND:PATH"`` for a descriptor file,
    with KIND one of ``DESCRIPTOR_KINDS`` (``"sscd:/models/sscd_disc_large.torchscript.pt"``,
    ``"raw:/path/descriptor.pt"``). A path without its kind is refused: the kind states what the
    network receives."""
    if isinstance(spec, Similarity):
        return spec
    if spec == "cosine":
        return PixelCosine()
    if spec == "l2":
        return PixelL2()
    kind, sep, path = spec.partition(":")
    if sep and kind in DESCRIPTOR_KINDS and path:
        return FeatureCosine(path=path, kind=kind, device=device)
    kinds = "; ".join(f"'{k}:PATH' ({_kind_summary(v)})" for k, v in DESCRIPTOR_KINDS.items())
    raise ValueError(f"similarity: expected 'cosine', 'l2' or a descriptor file with its kind: {kinds}; "
                     f"got {spec!r}")


def _kind_summary(preprocess: DescriptorPreprocess) -> str:
    if preprocess.size is None and preprocess.mean is None:
        return "images in [-1, 1] at their own size"
    return f"resized to {preprocess.size}x{preprocess.size}, ImageNet mean/std"


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
