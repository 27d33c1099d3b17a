"""Datasets by name, for configs: ``load_dataset({"name": "cifar10", "root": ..., "subset": 1024})``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffcore.data.dataset import ArrayDataset
from diffcore.data.subsets import subset

DATASET_NAMES = ("digits", "cifar10", "image_folder", "molrg", "random_images")


def _digits(spec):
    from diffcore.data.digits import load_digits

    images, labels = load_digits(as_uint8=True)
    return ArrayDataset(images, labels, num_classes=10, name="digits")


def _cifar10(spec):
    from diffcore.data.cifar10 import load_cifar10

    return load_cifar10(_required(spec, "root"), split=spec.get("split", "train"))


def _image_folder(spec):
    from diffcore.data.image_folder import load_image_folder

    resolution, channels = spec.get("resolution"), spec.get("channels")  # None: the images' own
    return load_image_folder(
        _required(spec, "root"),
        None if resolution is None else int(resolution),
        channels=None if channels is None else int(channels),
    )


def _molrg(spec):
    from diffcore.data.molrg import molrg

    sample = molrg(*(int(_required(spec, key)) for key in ("K", "n", "d", "num", "seed")))
    return ArrayDataset(sample.data, sample.labels, num_classes=int(spec["K"]), name="molrg")


def _random_images(spec):
    """Uniform random uint8 images (benchmarks and smoke tests): ``shape`` [C, H, W], ``num``, ``seed``."""
    import torch

    shape = tuple(int(v) for v in _required(spec, "shape"))
    generator = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    num = int(_required(spec, "num"))
    values = torch.randint(0, 256, (num, *shape), generator=generator, dtype=torch.uint8)
    return ArrayDataset(values, torch.zeros(num, dtype=torch.int64), num_classes=1, name="random_images")


def _required(spec, key):
    if key not in spec:
        raise ValueError(f"dataset {spec.get('name')!r} needs the field {key!r} in its config")
    return spec[key]


_LOADERS = {
    "digits": _digits,
    "cifar10": _cifar10,
    "image_folder": _image_folder,
    "molrg": _molrg,
    "random_images": _random_images,
}


def load_dataset(spec: Mapping[str, Any]) -> ArrayDataset:
    """The dataset a config names, optionally reduced to a nested subset.

    ``spec``: ``name`` (one of ``DATASET_NAMES``) and its fields (``root``, ``split``,
    ``resolution``, ``channels`` (image_folder: optional, the images' own by default);
    ``K, n, d, num, seed`` for molrg; ``shape, num, seed`` for
    random_images), plus optional ``subset``
    (size n) and ``subset_seed`` (default 0) for ``subset(dataset, n, seed)``, or ``indices`` (a
    list of positions in the dataset, in that order: a subset that is not nested, e.g. one half
    of a split; not together with ``subset``).
    """
    name = spec.get("name")
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    dataset = _LOADERS[name](spec)
    if spec.get("indices") is not None:
        if spec.get("subset") is not None:
            raise ValueError("dataset spec: give either 'subset' (a nested subset) or 'indices', not both")
        import torch

        indices = torch.as_tensor([int(i) for i in spec["indices"]], dtype=torch.int64)
        if indices.numel() == 0 or int(indices.min()) < 0 or int(indices.max()) >= len(dataset):
            raise ValueError(f"dataset spec: 'indices' must be non-empty positions in [0, {len(dataset)})")
        return dataset.select(indices, name=f"{dataset.name}[{indices.numel()} indices]")
    if spec.get("subset") is not None:
        dataset = subset(dataset, int(spec["subset"]), int(spec.get("subset_seed", 0)))
    return dataset
