"""Fixtures for the UNet and preconditioning tests: tiny networks with non-trivial weights."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore import _env
from diffcore.models import UNet
from tests.helpers import TINY_UNET_FIELDS


def randomize_parameters(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the (near-zero) EDM init of residual branches with O(1) random weights, so that the
    network output, and hence JVPs and gradients, depend on every layer. In place; returns module."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if p.dim() > 1:
                fan_in = math.prod(p.shape[1:])
                p.copy_(noise / math.sqrt(fan_in))
            elif (
                name.endswith("norm0.weight")
                or name.endswith("norm1.weight")
                or name.endswith("norm2.weight")
                or name.endswith("aux_norm.weight")
            ):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


def make_tiny_unet(*, seed: int = 0, randomize: bool = True, **fields) -> UNet:
    """A small UNet (width 8, one block per level) with deterministic weights."""
    config = {**TINY_UNET_FIELDS, **fields}
    torch.manual_seed(seed)
    net = UNet(**config)
    return randomize_parameters(net, seed) if randomize else net


@pytest.fixture
def tiny_unet():
    """Factory: ``tiny_unet(**UNetConfig fields)`` -> an eval-mode UNet with random O(1) weights."""
    return lambda **fields: make_tiny_unet(**fields).eval()


@pytest.fixture(autouse=True)
def single_thread():
    """The networks here are tiny: one intra-op thread is faster than two, and far faster than two
    on a loaded shared machine (OpenMP threads wait on each other). Restored after each test."""
    with _env.torch_threads(1):
        yield


@pytest.fixture
def randomize():
    """``randomize(module, seed)``: :func:`randomize_parameters` for tests of other networks."""
    return randomize_parameters
