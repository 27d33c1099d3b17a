"""Datasets: the embedded 8x8 digits, CIFAR-10 from a local folder, image folders, synthetic data.

Images are stored as uint8 and read as float32 in [-1, 1]; ``subset(dataset, n, seed)`` gives
nested subsets; ``load_dataset(spec)`` builds any of them from a config dict.
"""

from diffcore.data.cifar10 import load_cifar10
from diffcore.data.dataset import ArrayDataset, uint8_to_unit, unit_to_uint8
from diffcore.data.digits import load_digits
from diffcore.data.image_folder import load_image_folder
from diffcore.data.molrg import MoLRGSample, molrg, molrg_bases
from diffcore.data.registry import DATASET_NAMES, load_dataset
from diffcore.data.subsets import subset, subset_indices

__all__ = [
    "ArrayDataset",
    "DATASET_NAMES",
    "MoLRGSample",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "molrg",
    "molrg_bases",
    "subset",
    "subset_indices",
    "uint8_to_unit",
    "unit_to_uint8",
]
