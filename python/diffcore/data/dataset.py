"""A minimal in-memory dataset: uint8 images (or float vectors) plus integer labels.

Images are stored as uint8 ``[N, C, H, W]`` and converted on access with ``x = u8 / 127.5 - 1``
(pixels in [-1, 1], the convention of every diffcore op that accepts uint8). Synthetic data
(e.g. a mixture of low-rank Gaussians) is stored as float ``[N, ...]`` and returned as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..] -> float32 in [-1, 1] (``u8 / 127.5 - 1``)."""
    return images.to(torch.float32) / 127.5 - 1.0


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float pixels in [-1, 1] -> uint8 (rounded, clamped); the inverse of ``uint8_to_unit``."""
    return ((images.to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@dataclass
class ArrayDataset:
    """``values [N, ...]`` (uint8 images or float data) with ``labels [N]`` (int64).

    ``dataset[i]`` gives ``(x, label)`` with ``x`` float32 (uint8 values mapped to [-1, 1]);
    ``dataset.batch(indices)`` gives ``(x [B, ...], labels [B])`` for a tensor of indices.
    """

    values: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = "dataset"

    def __post_init__(self):
        if self.values.ndim < 2:
            raise ValueError(f"values must have shape [N, ...], got {tuple(self.values.shape)}")
        if self.labels.shape != (self.values.shape[0],):
            raise ValueError(f"labels must have shape [N] = [{self.values.shape[0]}], got {tuple(self.labels.shape)}")
        if self.values.dtype != torch.uint8 and not self.values.is_floating_point():
            raise ValueError(f"values must be uint8 or floating point, got {self.values.dtype}")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([index]))
        return x[0], int(y[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(C, H, W)``."""
        return tuple(self.values.shape[1:])

    @property
    def is_uint8(self) -> bool:
        return self.values.dtype == torch.uint8

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [B, ...] float32, labels [B] int64)`` for ``indices [B]`` (on the data's device)."""
        indices = indices.to(self.values.device)
        values = self.values.index_select(0, indices)
        x = uint8_to_unit(values) if self.is_uint8 else values.to(torch.float32)
        return x, self.labels.index_select(0, indices.to(self.labels.device))

    def all(self) -> torch.Tensor:
        """Every sample as float32 ``[N, ...]`` (uint8 images mapped to [-1, 1])."""
        return uint8_to_unit(self.values) if self.is_uint8 else self.values.to(torch.float32)

    def to(self, device) -> ArrayDataset:
        """The same dataset with its tensors on ``device``."""
        return ArrayDataset(self.values.to(device), self.labels.to(device), self.num_classes, self.name)

    def select(self, indices: torch.Tensor, name: str | None = None) -> ArrayDataset:
        """The samples at ``indices`` (in that order), as a new dataset."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ArrayDataset(
            self.values[indices.to(self.values.device)],
            self.labels[indices.to(self.labels.device)],
            self.num_classes,
            name or self.name,
        )
