"""Helpers shared by the tests (import ``from tests.helpers import ...``; conftest.py holds only
pytest hooks and fixtures)."""

from __future__ import annotations

import torch

from diffcore import _backend


def cpu_backends(implemented=("reference", "cpu", "triton")):
    """Backends a test can run on CPU tensors here (Triton through the interpreter, which
    tests/conftest.py turns on before triton is imported)."""
    return [b for b in implemented if _backend.why_unusable(b, torch.device("cpu")) is None]


# A small UNet (diffcore.models.UNet fields): width 8 on 8x8 one-channel images, one block per level,
# attention at the 8x8 level, no dropout. The tests' tiny UNet (tests/models) and its variants.
TINY_UNET_FIELDS = dict(
    img_resolution=8,
    in_channels=1,
    model_channels=8,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(8,),
    dropout=0.0,
)
