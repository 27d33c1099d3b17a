"""Inception-v3 features as the FID literature defines them, from a weights file the user has.

FID (Heusel et al. 2017) uses the 2048-d "pool3" features of the TensorFlow Inception graph of
2015-12-05. The PyTorch ports of that graph (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``,
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``) store a state dict whose names
follow torchvision's Inception3; the network below has those names, with the graph's quirks:
average pools in the A, C and first E blocks ignore padded zeros, and the last E block pools
with a max (not an average). BatchNorm eps is 1e-3.

Input convention of pytorch-fid: RGB in [0, 1] resized to 299x299 bilinearly (``align_corners
=False``), then mapped to [-1, 1]. diffcore images are already in [-1, 1] and resizing commutes
with that affine map, so ``InceptionFeatures`` resizes them directly (uint8 images are read as
``u8 / 127.5 - 1``; one-channel images are repeated to RGB). torch-fidelity resizes with a
TF1-style bilinear kernel instead; its FID differs slightly from pytorch-fid's on non-299 inputs.

Nothing is downloaded: pass the path of the file you have. It is read with
``torch.load(weights_only=True)`` (tensors only, no code) or as ``.safetensors``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from diffcore._checks import check_state_dict_values

INCEPTION_SIZE = 299
INCEPTION_FEATURES = "inception-v3-pool3"


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _same_size_avg_pool(x):
    # TensorFlow's average pooling divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        five = self.branch5x5_2(self.branch5x5_1(x))
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), five, double, self.branch_pool(_same_size_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7, row, col = channels_7x7, dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for index in range(2, 6):
            double = getattr(self, f"branch7x7dbl_{index}")(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_same_size_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven = x
        for index in range(1, 5):
            seven = getattr(self, f"branch7x7x3_{index}")(seven)
        return torch.cat([three, seven, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """The E block; ``max_pool=True`` for the graph's last block (``Mixed_7c``)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        three = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _same_size_avg_pool(x)
        return torch.cat([self.branch1x1(x), three, double, self.branch_pool(pooled)], 1)


class InceptionFeatures(nn.Module):
    """FID's Inception-v3: images ``[B, C, H, W]`` (C = 1 or 3; [-1, 1] or uint8) -> pool3 ``[B, 2048]``.

    Build it with :func:`inception_features` to load weights; ``fc`` (1008 classes) is kept
    only so that the published state dicts load unchanged.
    """

    name = INCEPTION_FEATURES

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, 3, 299, 299]`` float32 in [-1, 1] (pytorch-fid's convention)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"inception features: images must be [B, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = x.to(self.fc.weight.device)
        return F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        for stem in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(self, stem)(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{block}")(x)
        return x.mean(dim=(2, 3))  # global average pool: pool3 [B, 2048]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``torch.save`` file read with ``weights_only=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled code or objects other than tensors and containers
        raise ValueError(
            f"weights file {path!r} is not a plain state dict that loads with "
            f"weights_only=True (refused: {type(err).__name__})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path!r} does not hold a state dict of tensors")
    return state


def inception_features(weights: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionFeatures:
    """FID's Inception-v3 pool3 extractor with the weights of the local file ``weights``.

    ``weights``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` (or the same tensors as ``.safetensors``).
    Returns an eval-mode module ``[B, C, H, W] -> [B, 2048]`` on ``device``.
    """
    network = InceptionFeatures()
    state = load_state_dict_file(weights)
    expected = network.state_dict()
    # BatchNorm's step counter is absent from the ported files and unused in eval mode.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"inception weights {os.fspath(weights)!r} do not match FID's Inception-v3: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"inception weights {os.fspath(weights)!r}: wrong shapes for {wrong[:5]}")
    check_state_dict_values(state, expected, f"inception weights {os.fspath(weights)!r}")
    network.load_state_dict(state)
    return network.eval().requires_grad_(False).to(device)
