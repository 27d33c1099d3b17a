"""Class-conditional Gaussians and the linear split of classifier-free guidance (docs/papers.md section 8).

Fitted to labeled data: one Gaussian ``N(mu_c, Sigma_c)`` per class and the unconditional
``N(mu_u, Sigma_u)`` of all the data. Their optimal denoisers are linear,
``D_c(x; sigma) = mu_c + W_c (x - mu_c)`` with ``W = U diag(lam / (lam + sigma^2)) U^T``
(:class:`~diffcore.denoisers.GaussianDenoiser`), and the CFG difference splits exactly into

    D_c - D_u = (W_c - W_u)(x - mu_c) + (I - W_u)(mu_c - mu_u)                          (split)

The symmetric ``W_c - W_u = V diag(e) V^T`` has eigenvectors V, the contrastive principal components
(CPCs): those with e > 0 (positive CPCs, directions the class holds more variance in than the data
as a whole) are enhanced by guidance, those with e < 0 (negative CPCs, generic directions) are
suppressed. The three terms of linear guidance are therefore

    positive:   V diag(max(e, 0)) V^T (x - mu_c)
    negative:   V diag(min(e, 0)) V^T (x - mu_c)
    mean_shift: (I - W_u)(mu_c - mu_u)

and ``positive + negative + mean_shift = D_c - D_u`` (to float64 rounding). Each term, or all of
them (``"all"``: ``D_c - D_u`` of the Gaussians), serves as a guidance term of
``diffcore.sampler.GuidedDenoiser``, added either to the Gaussian conditional denoiser or to a
trained network's, as the paper does.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from diffcore._checks import check_positive_int, check_tensor, sigma_per_row
from diffcore.denoisers._common import check_input
from diffcore.denoisers.gaussian import GaussianDenoiser

TERMS = ("positive", "negative", "mean_shift", "all")


@dataclass
class LinearSplit:
    """The three terms of linear CFG for a batch, each [B, ...] (float64 unless stated)."""

    positive: torch.Tensor
    negative: torch.Tensor
    mean_shift: torch.Tensor

    def total(self) -> torch.Tensor:
        """``positive + negative + mean_shift`` (= ``D_c - D_u`` of the Gaussians)."""
        return self.positive + self.negative + self.mean_shift


class ClassGaussians:
    """Per-class Gaussian denoisers, the unconditional one, and the CFG split between them.

    Args:
        conditional: one :class:`GaussianDenoiser` per class (index = class id), all of one dimension.
        unconditional: the :class:`GaussianDenoiser` of all the data.
        cache_size: how many eigen-decompositions of ``W_c - W_u`` (one per class and sigma) to keep;
            a sampler asks for the same few sigmas again and again.
    """

    def __init__(self, conditional: list[GaussianDenoiser], unconditional: GaussianDenoiser, *, cache_size: int = 64):
        if not conditional:
            raise ValueError("conditional: expected at least one class Gaussian")
        for c, g in enumerate(conditional):
            if g.dim != unconditional.dim:
                raise ValueError(
                    f"conditional: class {c} has dimension {g.dim}, the unconditional one {unconditional.dim}"
                )
        self.conditional = list(conditional)
        self.unconditional = unconditional
        self.shape = unconditional.shape
        self.cache_size = check_positive_int("cache_size", cache_size)
        self._eigen: OrderedDict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def fit(
        cls, data: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, rank: int | None = None, **kwargs
    ) -> ClassGaussians:
        """Fit every class and the whole ``data`` [N, ...] (``GaussianDenoiser.fit``: float64,
        covariance normalized by the count; uint8 maps to [-1, 1]). ``labels`` [N] int in
        ``[0, num_classes)``; every class needs at least 2 samples."""
        check_tensor("data", data, min_ndim=2)
        check_tensor("labels", labels, ndim=1)
        if labels.shape[0] != data.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"labels: expected {data.shape[0]} integer class ids, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        labels = labels.to(device=data.device, dtype=torch.int64)
        num_classes = int(labels.max()) + 1 if num_classes is None else check_positive_int("num_classes", num_classes)
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"labels: expected class ids in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
            )
        counts = torch.bincount(labels, minlength=num_classes)
        if int(counts.min()) < 2:
            raise ValueError(
                f"labels: class {int(counts.argmin())} has {int(counts.min())} samples; every class needs at least 2"
            )
        conditional = [GaussianDenoiser.fit(data[labels == c], rank=rank) for c in range(num_classes)]
        return cls(conditional, GaussianDenoiser.fit(data, rank=rank), **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.conditional)

    @property
    def dim(self) -> int:
        return self.unconditional.dim

    # ------------------------------------------------------------------ matrices
    def guidance_matrix(self, label: int, sigma: float) -> torch.Tensor:
        """``W_c(sigma) - W_u(sigma)`` [n, n] float64 for class ``label``."""
        return self.conditional[self._label(label)].jacobian(float(sigma)) - self.unconditional.jacobian(float(sigma))

    def contrastive_components(self, label: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigen-decomposition of ``W_c - W_u``: ``(e [n] descending, V [n, n])`` (columns = CPCs;
        e > 0 positive CPCs, e < 0 negative ones). Cached per (class, sigma)."""
        key = (self._label(label), float(sigma))
        if key in self._eigen:
            self._eigen.move_to_end(key)
            return self._eigen[key]
        matrix = self.guidance_matrix(*key)
        values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
        result = (values.flip(0), vectors.flip(1))
        self._eigen[key] = result
        if len(self._eigen) > self.cache_size:
            self._eigen.popitem(last=False)
        return result

    def mean_shift(self, label: int, sigma: float) -> torch.Tensor:
        """``(I - W_u(sigma))(mu_c - mu_u)`` [n] float64."""
        shift = self.conditional[self._label(label)].mean - self.unconditional.mean
        return shift - self.unconditional.jacobian(float(sigma)) @ shift

    # ------------------------------------------------------------------ denoisers
    def conditional_denoiser(self, labels: torch.Tensor) -> ClassConditionalDenoiser:
        """``D(x, sigma)`` that denoises row i with the Gaussian of class ``labels[i]``."""
        return ClassConditionalDenoiser(self, labels)

    def split(self, x: torch.Tensor, sigma, labels: torch.Tensor) -> LinearSplit:
        """The three terms of linear CFG at ``x`` [B, ...] for classes ``labels`` [B] (float64)."""
        check_input(x, self.dim)
        rows = x.reshape(x.shape[0], -1).to(self.unconditional.device, torch.float64)
        positive, negative, shift = (torch.empty_like(rows) for _ in range(3))
        for label, sigma_value, index in self._groups(labels, sigma, x.shape[0]):
            values, vectors = self.contrastive_components(label, sigma_value)
            coeff = (rows[index] - self.conditional[label].mean) @ vectors  # [b, n]
            positive[index] = (coeff * values.clamp_min(0)) @ vectors.T
            negative[index] = (coeff * values.clamp_max(0)) @ vectors.T
            shift[index] = self.mean_shift(label, sigma_value)
        as_x = lambda t: t.reshape(x.shape)  # noqa: E731
        return LinearSplit(as_x(positive), as_x(negative), as_x(shift))

    def difference(self, x: torch.Tensor, sigma, labels: torch.Tensor) -> torch.Tensor:
        """``D_c(x) - D_u(x)`` of the Gaussians, computed directly (float64) [B, ...]."""
        x64 = x.to(self.unconditional.device, torch.float64)
        return self.conditional_denoiser(labels)(x64, sigma) - self.unconditional(x64, sigma)

    def term(self, name: str, labels: torch.Tensor) -> LinearGuidanceTerm:
        """A guidance term ``G(x, sigma, base)`` for ``diffcore.sampler.GuidedDenoiser``: one of
        ``positive``, ``negative``, ``mean_shift`` or ``all`` (``D_c - D_u``)."""
        return LinearGuidanceTerm(self, name, labels)

    # ------------------------------------------------------------------ helpers
    def _label(self, label) -> int:
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label: expected a class id in [0, {self.num_classes}), got {label}")
        return label

    def _groups(self, labels: torch.Tensor, sigma, batch: int):
        """(class, sigma, row indices) for every distinct (class, sigma) pair of a batch."""
        labels = self._check_labels(labels, batch)
        sigmas = sigma_per_row("sigma", sigma, batch, torch.device("cpu"))
        pairs = torch.stack([labels.double(), sigmas], dim=1)
        unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        for g, (label, sigma_value) in enumerate(unique.tolist()):
            index = (inverse == g).nonzero()[:, 0].to(self.unconditional.device)
            yield int(label), sigma_value, index

    def _check_labels(self, labels: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """``labels`` as a CPU int64 tensor [B] of class ids (B = ``batch`` when given)."""
        check_tensor("labels", labels, ndim=1)
        expected = labels.shape[0] if batch is None else batch
        if labels.shape[0] != expected or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels: expected {expected} integer class ids, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        labels = labels.cpu().to(torch.int64)
        if expected and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels: expected class ids in [0, {self.num_classes})")
        return labels


class ClassConditionalDenoiser:
    """``D(x, sigma)``: row i denoised by the Gaussian of class ``labels[i]`` (output in x's dtype)."""

    def __init__(self, gaussians: ClassGaussians, labels: torch.Tensor):
        self.gaussians = gaussians
        self.labels = gaussians._check_labels(labels)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        check_input(x, self.gaussians.dim)
        out = torch.zeros_like(x)
        for label, sigma_value, index in self.gaussians._groups(self.labels, sigma, x.shape[0]):
            index = index.to(x.device)
            out = out.index_copy(0, index, self.gaussians.conditional[label](x[index], sigma_value))
        return out


class LinearGuidanceTerm:
    """One term of linear CFG as ``G(x, sigma, base_output)`` (the base output is not used):
    ``positive``, ``negative``, ``mean_shift`` (see the module docstring) or ``all`` (D_c - D_u).
    Returned in x's dtype and device."""

    def __init__(self, gaussians: ClassGaussians, name: str, labels: torch.Tensor):
        if name not in TERMS:
            raise ValueError(f"name: expected one of {', '.join(TERMS)}, got {name!r}")
        self.gaussians, self.name = gaussians, name
        self.labels = gaussians._check_labels(labels)

    def __call__(self, x: torch.Tensor, sigma, base_output: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "all":
            out = self.gaussians.difference(x, sigma, self.labels)
        else:
            out = getattr(self.gaussians.split(x, sigma, self.labels), self.name)
        return out.to(device=x.device, dtype=x.dtype)


__all__ = ["ClassConditionalDenoiser", "ClassGaussians", "LinearGuidanceTerm", "LinearSplit", "TERMS"]
