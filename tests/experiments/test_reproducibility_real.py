"""The reproducibility study with the REAL stack (trainer, DDPM++ UNet, sampler, empirical denoiser,
k-NN), shrunk to seconds of CPU: one light UNet of width 16 trained on 8 digits memorizes them,
the same training on all 1797 digits does not reproduce training images. The two models train
in two worker processes (train_workers=2), the quick preset's path.

This checks the direction of the effect end to end, not its size: 300 steps are far too few for
the N = 1797 model to make good digits (its samples are blurry), so "generalizes" here only means
"does not copy training images". The quick preset (docs/experiments.md) is the real measurement.
"""
from __future__ import annotations

import json

import pytest

from diffcore.experiments import reproducibility as study
from diffcore.experiments.base import config_from_preset

OVERRIDES = ["model_preset=ddpmpp-digits-light", "widths=16", "sizes=8,1797", "train_seeds=0",
             "train_steps=300", "batch_size=32", "num_samples=32", "sampler_steps=12",
             "grid_samples=8", "torch_threads=1", "train_workers=2"]


@pytest.mark.slow
def test_real_stack_small_n_memorizes_large_n_does_not(tmp_path):
    config = config_from_preset(study.PRESETS, "tiny", OVERRIDES)
    results = study.run(config, tmp_path, device="cpu", progress=False)
    rows = {row["n"]: row for row in results["models"]}
    small, large = rows[8], rows[1797]
    assert small["gl"] <= 0.2 and small["memorized_ratio"] >= 0.7, small
    assert large["gl"] >= 0.5 and large["memorized_ratio"] <= 0.3, large
    assert small["rp_empirical"] > large["rp_empirical"], (small, large)
    assert {e["n"]: e["gl"] for e in results["empirical"]} == {8: 0.0, 1797: 0.0}
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["train"]["units"] == 2 and timings["torch_threads"] == 1
    assert timings["train"]["reused"] == 2 and timings["train"]["parallel_wall_seconds"] > 0  # made by workers
    assert (tmp_path / "figure1.png").is_file() and len(list((tmp_path / "grids").iterdir())) == 4
