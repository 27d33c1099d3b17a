"""Training recipes that several studies' presets share, declared once.

A recipe is a mapping of config fields (the shared vocabulary of ``base.VOCABULARY_CHECKS``) to
values; a preset spreads it into its config and adds its own fields::

    ReproducibilityConfig(**recipes.DIGITS_QUICK_TRAINING, widths=(8, 16), ...)

A recipe holds only the fields that every preset built from it sets to the same value with the
same meaning; where a study departs (another batch, augmentation it has no field for), the preset
says so itself. Changing a recipe changes every preset built from it, and with them the specs of
their units (old output folders then refuse the new config): change one only on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

DIGITS_QUICK_TRAINING: Mapping[str, Any] = MappingProxyType(
    {
        "model_preset": "ddpmpp-digits-light",
        "train_steps": 1000,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "lr_warmup_images": 1000,
    }
)
"""The quick recipe on the embedded digits (chosen by measurement: docs/experiments.md,
"The quick recipe"): the light 8x8 UNet (one block per level, no dropout), 1000 Adam steps at batch
32 and lr 1e-3 after a 1000-image warm-up. The quick presets of reproducibility, hidden-gaussian
and dynamics train their models with it."""

EDM_CIFAR10_TRAINING: Mapping[str, Any] = MappingProxyType(
    {
        "dataset": "cifar10",
        "model_preset": "ddpmpp-cifar",
        "train_steps": 390_625,
        "learning_rate": 1e-3,
        "lr_warmup_images": 10_000_000,
    }
)
"""EDM's CIFAR-10 training (Karras et al. 2022; docs/papers.md, "Common substrate (EDM)"): DDPM++
at 32x32, Adam at lr 1e-3 after a 10 Mimg warm-up, 390 625 optimizer steps (EDM's 200 Mimg at its
batch 512). The paper presets of reproducibility (at batch 128: 50 Mimg, as that paper's public
code trains), hidden-gaussian and cfg (both at batch 512) train with it; set ``data_root`` to the
local CIFAR-10 copy."""
