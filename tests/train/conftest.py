"""Training-test fixtures: the tiny model on the import path and a small digits config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import tiny_model  # noqa: E402,F401  (registers the model "tiny_denoiser")

from diffcore.train import TrainConfig  # noqa: E402


@pytest.fixture
def tiny_config(tmp_path) -> TrainConfig:
    """A digits run of a tiny conv denoiser: 40 steps of batch 8, checkpoints every 10."""
    return TrainConfig(
        data={"name": "digits", "subset": 64, "subset_seed": 1},
        model={"name": "tiny_denoiser", "channels": 1, "width": 8},
        steps=40,
        batch_size=8,
        lr=2e-3,
        lr_warmup_images=64,
        ema_halflife_images=200,
        ema_rampup_ratio=0.5,
        grad_clip=1.0,
        seed=3,
        device="cpu",
        out_dir=str(tmp_path / "run"),
        checkpoint_every=10,
        keep_checkpoints=3,
        log_every=5,
        progress=False,
    )
