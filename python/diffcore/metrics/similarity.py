"""Similarity measures between images: pixel-space cosine and l2, and user-supplied descriptors.

Every measure maps images ``[B, ...]`` to embedding rows ``[B, F]`` in which the l2 distance is a
decreasing function of the similarity. Nearest-neighbour search then runs as an exact l2 k-NN on
the embeddings (``diffcore.ops.knn``), and the similarity of a neighbour is recovered from its
distance:

- ``cosine`` (pixel space, default): each image is flattened and *mean-centered per image* (its own
  mean pixel subtracted) before the cosine, i.e. Pearson correlation of pixels. Centering removes
  the constant background offset every image shares (digits and most images have a large uniform
  background at -1), which otherwise inflates every cosine toward 1. Embedding: unit vectors, and
  for unit vectors ``cos = 1 - |a - b|^2 / 2``. A *constant* image (a blank sample: every pixel
  equal, so its Pearson correlation is undefined) has similarity 0 to every non-constant image and
  1 to every other constant image, in the k-NN (GL) and the pairwise (RP) path alike: the
  embedding has one extra coordinate, 0 for non-constant images and 1 for constant ones (whose
  other coordinates are 0).
- ``l2`` (pixel space): ``similarity = 1 - rms(a - b) / 2`` with ``rms = |a - b| / sqrt(D)``. For
  images in [-1, 1], rms lies in [0, 2], so the similarity lies in [0, 1] (1 = identical).
  Embedding: rows divided by ``2 sqrt(D)``, similarity = ``1 - distance``.
- a descriptor file with its kind, ``KIND:PATH``: a TorchScript (``torch.jit.save``) network the
  user has, mapping preprocessed images to
  ``[B, F]``; similarity is the cosine of the descriptors, as in the reproducibility paper
  (docs/papers.md section 1, threshold 0.6). The kind states the preprocessing: ``sscd`` (the paper's
  SSCD: 320x320, ImageNet mean/std) or ``raw`` (images in [-1, 1] at their own size). Files load
  running no Python; ``torch.export`` archives are refused (:func:`load_descriptor`). A
  descriptor row that is not finite or all zero
  has no direction, so no cosine: it is refused (ValueError naming the descriptor file and the
  image), as is an output that is not one tensor ``[B, F]`` for a batch of B images.

Every measure refuses images with a NaN or infinite pixel. Embeddings are computed in float64 and
rounded to float32 once, and means of similarities are exact (:func:`exact_mean`), so a result
does not depend on the number of threads that reduced it.

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

DESCRIPTOR_THRESHOLD = 0.6  # cosine of copy-detection descriptors, as in the paper (docs/papers.md section 1)


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [B, ...]`` as float32 rows ``[B, D]``; uint8 images map to [-1, 1] as ``u8 / 127.5 - 1``."""
    rows = x.reshape(x.shape[0], -1)
    if rows.dtype == torch.uint8:
        return rows.float() / 127.5 - 1.0
    return rows.float()


def exact_mean(values: torch.Tensor) -> float:
    """The mean of ``values [B]`` as a float, summed exactly (``math.fsum``): the same whatever the
    order or thread count; NaN for no values."""
    flat = values.detach().reshape(-1).double().cpu().tolist()
    return math.fsum(flat) / len(flat) if flat else float("nan")


def check_finite_rows(rows: torch.Tensor, what: str) -> None:
    """ValueError naming ``what`` and the first row of ``rows [B, F]`` holding a NaN or infinity."""
    bad = ~torch.isfinite(rows).all(dim=1) if rows.numel() else torch.zeros(rows.shape[0], dtype=torch.bool)
    if bool(bad.any()):
        raise ValueError(
            f"{what}: row {int(bad.nonzero()[0, 0])} (image index) of {rows.shape[0]} holds a "
            "NaN or infinity (no similarity is defined for it)"
        )


ROW_CHUNK = 2048  # rows embedded at once: bounds the float64 copies of large pools (rows are independent)


def _by_row_chunks(rows: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` applied to chunks of at most ROW_CHUNK rows of ``rows [B, F]``, results concatenated."""
    if rows.shape[0] <= ROW_CHUNK:
        return fn(rows)
    return torch.cat([fn(chunk) for chunk in rows.split(ROW_CHUNK)])


def _unit_rows(rows: torch.Tensor, what: str) -> torch.Tensor:
    """Rows ``[B, F]`` scaled to unit norm in float64, as float32; a non-finite or all-zero row is
    refused (ValueError naming ``what``): it has no direction."""
    check_finite_rows(rows, what)
    norms = rows.double().norm(dim=1)
    zero = (norms == 0).nonzero()
    if zero.numel():
        raise ValueError(
            f"{what}: row {int(zero[0, 0])} (image index) of {rows.shape[0]} is all zeros "
            "(it has no direction, so no cosine)"
        )
    return _by_row_chunks(rows, lambda chunk: (chunk.double() / chunk.double().norm(dim=1, keepdim=True)).float())


def _centered_unit_rows(rows: torch.Tensor, what: str) -> torch.Tensor:
    """Pixel rows ``[B, D]`` mean-centered and scaled to unit norm (float64, returned as float32),
    with one extra coordinate: 0 for a row that varies, 1 for a constant row (whose centered
    coordinates are 0). Constant images are thus orthogonal to every other image and identical
    to each other (module docstring)."""
    check_finite_rows(rows, what)

    def embed(chunk: torch.Tensor) -> torch.Tensor:
        chunk = chunk.double()
        centered = chunk - chunk.mean(dim=1, keepdim=True)
        norms = centered.norm(dim=1, keepdim=True)
        constant = (chunk == chunk[:, :1]).all(dim=1, keepdim=True)
        unit = torch.where(constant, torch.zeros_like(centered), centered / torch.where(constant, 1.0, norms))
        return torch.cat([unit, constant.double()], dim=1).float()

    return _by_row_chunks(rows, embed)


def _dot_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``[B]`` of ``a, b [B, F]``, accumulated in float64, as float32."""
    return (a.double() * b.double()).sum(dim=1).float()


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
        """Images ``[B, ...]`` -> ``[B, D + 1]``: centered unit pixel rows, and 1 in the last
        coordinate for a constant image (module docstring)."""
        return _centered_unit_rows(flatten_rows(x), "similarity 'cosine': images")

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance.float().square() / 2.0  # |a - b|^2 = 2 - 2 cos for unit a, b

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _dot_rows(self.embed(a), self.embed(b))  # exact cosine, no distance round trip


class PixelL2(Similarity):
    """``1 - rms(a - b) / 2``: 1 for identical images, 0 for opposite images in [-1, 1]."""

    name = "l2"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        rows = flatten_rows(x)
        check_finite_rows(rows, "similarity 'l2': images")
        return rows / (2.0 * math.sqrt(rows.shape[1]))

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance.float()


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

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
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
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
                raise ValueError(
                    f"similarity: unknown descriptor kind {self.kind!r}; known: "
                    f"{', '.join(DESCRIPTOR_KINDS)} (or pass preprocess=)"
                )
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
        """Images ``[B, C, H, W]`` -> unit descriptor rows ``[B, F]``; a descriptor output that is
        not one tensor ``[B, F]`` (a tuple, a 1-D tensor, another batch size, complex numbers) or
        a row that is not finite or all zero is refused naming the descriptor file."""
        module = self.module()
        outs = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = self.preprocess(x[start : start + self.batch_size].to(self.device))
            outs.append(self._checked_output(module(batch), batch.shape[0]))
        feats = torch.cat(outs) if outs else torch.zeros(0, 0)
        return _unit_rows(feats, f"similarity: descriptor {self.path!r}: its output for the images")

    def _checked_output(self, out, batch: int) -> torch.Tensor:
        what = f"similarity: descriptor {self.path!r}"
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{what} returned a {type(out).__name__}; expected one tensor [B, F]")
        if out.dim() < 2 or out.shape[0] != batch:
            raise ValueError(
                f"{what} returned shape {tuple(out.shape)} for {batch} images; expected [B, F] with B = {batch}"
            )
        if out.is_complex() or not (out.is_floating_point() or out.dtype in _INTEGER_DTYPES):
            raise ValueError(f"{what} returned {out.dtype} descriptors; expected real numbers")
        return out.reshape(batch, -1).double().cpu()

    def from_distance(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance.float().square() / 2.0

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _dot_rows(self.embed(a), self.embed(b))

    def describe(self) -> dict:
        """The descriptor's name, kind, path, preprocessing and threshold, and its file's SHA-256
        (``sha256``: results and units are keyed on the content, not the path)."""
        from diffcore._digest import file_digest

        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"similarity: descriptor (feature extractor) file {self.path!r} does not exist")
        return {
            "name": self.name,
            "kind": self.kind,
            "path": os.path.abspath(self.path),
            "sha256": file_digest(self.path),
            "preprocess": dataclasses.asdict(self.preprocess),
            "default_threshold": self.default_threshold,
        }


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
            raise ValueError(
                f"similarity: refusing torch.export archive {path!r}: loading one evaluates "
                "text from the file as Python (sympy), so only TorchScript descriptors are "
                "accepted; save the network with torch.jit.save(torch.jit.trace(model, images))"
            )
        if not any("/code/" in name for name in names) or not any(n.endswith("/data.pkl") for n in names):
            raise ValueError(
                f"similarity: descriptor file {path!r} is a zip archive but not a TorchScript file (torch.jit.save)"
            )
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
    raise ValueError(f"similarity: expected 'cosine', 'l2' or a descriptor file with its kind: {kinds}; got {spec!r}")


def _kind_summary(preprocess: DescriptorPreprocess) -> str:
    if preprocess.size is None and preprocess.mean is None:
        return "images in [-1, 1] at their own size"
    return f"resized to {preprocess.size}x{preprocess.size}, ImageNet mean/std"


def default_knn():
    """The exact k-NN op every metric uses unless one is passed in (``diffcore.ops.knn``)."""
    from diffcore.ops import knn

    return knn


def nearest_neighbors(
    samples: torch.Tensor, train: torch.Tensor, similarity: Similarity, k: int = 1, knn=None
) -> tuple[torch.Tensor, torch.Tensor]:
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
