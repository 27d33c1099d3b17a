"""Datasets: the embedded 8x8 digits, CIFAR-10 from a local folder, image folders, synthetic data."""
from diffcore.data.digits import load_digits

__all__ = ["load_digits"]
