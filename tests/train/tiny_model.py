"""A tiny denoiser for training tests, with its own EDM preconditioning (Karras et al. 2022,
Table 1): ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``. Importing this module registers
it as the model ``"tiny_denoiser"`` (subprocesses run ``train_main.py`` or import it first)."""

from __future__ import annotations

import time

import torch
from torch import nn

from diffcore.train import register_model


class TinyConvNet(nn.Module):
    """F(x, c_noise): two 3x3 convolutions with a noise-level bias, ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, channels: int, width: int, num_classes: int = 0):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.noise = nn.Linear(1, width)
        self.label = nn.Linear(num_classes, width, bias=False) if num_classes else None
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        h = self.inp(x) + self.noise(c_noise.reshape(-1, 1))[:, :, None, None]
        if self.label is not None and class_labels is not None:
            h = h + self.label(class_labels)[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


class TinyMLP(nn.Module):
    """F(x, c_noise) for vectors ``[B, D] -> [B, D]``."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, c_noise, class_labels=None):
        return self.net(torch.cat([x, c_noise.reshape(-1, 1).to(x.dtype)], dim=1))


class TinyEDMPrecond(nn.Module):
    """EDM preconditioning around ``inner``; ``forward(x, sigma, class_labels=None)``."""

    def __init__(self, inner: nn.Module, sigma_data: float = 0.5, sleep_s: float = 0.0):
        super().__init__()
        self.inner, self.sigma_data, self.sleep_s = inner, sigma_data, sleep_s

    def forward(self, x, sigma, class_labels=None):
        if self.sleep_s:
            time.sleep(self.sleep_s)  # makes a run slow enough to be killed mid-way
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self.inner(c_in * x, c_noise, class_labels).to(x.dtype)


def tiny_denoiser(
    channels: int = 1, width: int = 8, num_classes: int = 0, sleep_s: float = 0.0, dim: int | None = None
):
    """The tiny preconditioned denoiser: a conv net for images, an MLP when ``dim`` is given."""
    inner = TinyMLP(dim, width) if dim else TinyConvNet(channels, width, num_classes)
    return TinyEDMPrecond(inner, sleep_s=sleep_s)


register_model("tiny_denoiser", tiny_denoiser)


class Oracle(torch.nn.Module):
    """Returns a fixed tensor, for checking loss formulas."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, sigma, class_labels=None):
        return self.output
