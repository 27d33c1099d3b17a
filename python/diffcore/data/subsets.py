"""Nested subsets: for one seed, the subset of size n1 is contained in the subset of size n2 >= n1.

A fixed permutation of ``range(N)`` per seed is drawn once; the subset of size n is its first n
entries (so the smaller subset is even a prefix of the larger one, in the same order). This is
how the reproducibility/generalization studies train on N = 2^6 ... 2^14 images of one dataset
(docs/papers.md section 1): every larger training set contains every smaller one.
"""

from __future__ import annotations

import numpy as np
import torch

from diffcore.data.dataset import ArrayDataset


def subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """Indices ``[n]`` (int64) of the nested subset of size ``n`` of ``range(total)`` for ``seed``."""
    total, n = int(total), int(n)
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if n > total:
        raise ValueError(f"n = {n} is larger than the dataset ({total} samples)")
    permutation = np.random.default_rng([int(seed), 0x5EB5E7]).permutation(total)
    return torch.from_numpy(permutation[:n].astype(np.int64))


def subset(dataset, n: int, seed: int):
    """The nested subset of size ``n`` of ``dataset`` for ``seed``.

    ``dataset`` is an ``ArrayDataset`` (returns an ``ArrayDataset``), a tensor ``[N, ...]``
    (returns a tensor), or a tuple of tensors sharing the first dimension, such as
    ``(images, labels)`` (returns a tuple).
    """
    if isinstance(dataset, ArrayDataset):
        indices = subset_indices(len(dataset), n, seed)
        return dataset.select(indices, name=f"{dataset.name}[subset n={n} seed={seed}]")
    if isinstance(dataset, torch.Tensor):
        return dataset[subset_indices(dataset.shape[0], n, seed).to(dataset.device)]
    if isinstance(dataset, (tuple, list)) and dataset and all(isinstance(t, torch.Tensor) for t in dataset):
        sizes = {int(t.shape[0]) for t in dataset}
        if len(sizes) != 1:
            raise ValueError(f"dataset tensors must share their first dimension, got sizes {sorted(sizes)}")
        indices = subset_indices(sizes.pop(), n, seed)
        return tuple(t[indices.to(t.device)] for t in dataset)
    raise TypeError(f"dataset must be an ArrayDataset, a tensor or a tuple of tensors, got {type(dataset).__name__}")
