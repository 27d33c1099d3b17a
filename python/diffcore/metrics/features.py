"""Feature extractors for sample-quality metrics: the shipped digits network, and FID's Inception.

An extractor is any callable ``images [B, C, H, W] -> features [B, F]`` with a ``name``
attribute; :func:`diffcore.metrics.frechet_distance` and ``feature_statistics`` accept any of them.

- :func:`digits_features` / :func:`digits_classifier`: a small CNN trained on the embedded 8x8
  digits (``scripts/train_digits_features.py``, deterministic; weights shipped as
  ``diffcore/data/files/digits_cnn.safetensors``, ~0.5 MB). Its 64-d penultimate activations are
  the features of a digits Frechet distance; its logits give class predictions (the class
  accuracy of conditional samples, the class histogram of unconditional ones). The held-out
  accuracy is stored in the file's metadata (``digits_network_info()``) and in docs/metrics.md.
- :func:`diffcore.metrics.inception_features` (inception.py): FID's Inception-v3 from a local file.
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

DIGITS_WEIGHTS = "files/digits_cnn.safetensors"  # inside the diffcore.data package
DIGITS_FEATURES = "digits-cnn-64"
DIGITS_SPLIT_SEED = 20240601
DIGITS_HELDOUT = 360  # held-out images (20% of the 1797 digits)


class DigitsNetwork(nn.Module):
    """CNN for the 8x8 digits: images ``[B, 1, 8, 8]`` ([-1, 1] or uint8) -> features ``[B, 64]``.

    ``forward`` (the extractor contract) returns the 64 features; ``logits`` ``[B, 10]``;
    ``predict`` the classes ``[B]``.
    """

    name = DIGITS_FEATURES

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.embed = nn.Linear(64 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits network: images must be [B, 1, 8, 8], got {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        x = x.to(self.head.weight.device)
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)  # [B, 64, 4, 4]
        x = F.relu(self.conv3(x)).flatten(1)
        return F.relu(self.embed(x))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, 10]``."""
        return self.head(self.forward(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted classes ``[B]`` (int64, on the CPU)."""
        return self.logits(images).argmax(dim=1).cpu()


def digits_heldout_split(num: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_indices, heldout_indices)`` of the digits the shipped network was trained and tested on."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    return order[DIGITS_HELDOUT:].sort().values, order[:DIGITS_HELDOUT].sort().values


def _digits_weights_file():
    return resources.files("diffcore.data").joinpath(DIGITS_WEIGHTS)


def digits_network_info() -> dict[str, str]:
    """The metadata stored with the shipped weights (held-out accuracy, training settings)."""
    from safetensors import safe_open

    with resources.as_file(_digits_weights_file()) as path, safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _load_digits_network(device) -> DigitsNetwork:
    from safetensors.torch import load

    network = DigitsNetwork()
    network.load_state_dict(load(_digits_weights_file().read_bytes()))
    return network.eval().requires_grad_(False).to(device)


def digits_features(device: str | torch.device = "cpu") -> DigitsNetwork:
    """The shipped digits network as a feature extractor: ``[B, 1, 8, 8] -> [B, 64]`` (eval mode)."""
    return _load_digits_network(device)


def digits_classifier(device: str | torch.device = "cpu") -> DigitsNetwork:
    """The shipped digits network as a classifier: ``.predict(images) -> [B]``, ``.logits -> [B, 10]``.

    The same network as :func:`digits_features` (its features feed the classifier head).
    """
    return _load_digits_network(device)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier=None, batch_size: int = 1024) -> float:
    """Fraction of ``images [N, 1, 8, 8]`` that ``classifier`` (default: the shipped one) puts in ``labels [N]``."""
    if labels.shape != (images.shape[0],):
        raise ValueError(f"class_accuracy: labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    classifier = classifier or digits_classifier()
    predicted = torch.cat([classifier.predict(batch) for batch in images.split(batch_size)])
    return float((predicted == labels.cpu().long()).double().mean())
