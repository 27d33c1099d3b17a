"""The multi-stage study (issue 16) at its tiny preset: stage division, both models, cost and quality."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffcore.analysis import segmentation_cost
from diffcore.experiments import multistage as study
from diffcore.experiments.base import ConfigError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("multistage")
        yield out, study.run_preset("tiny", out, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)


def test_stage_division_is_the_optimal_contiguous_split(tiny_run):
    out, results = tiny_run
    stages = results["stages"]
    grid = len(stages["sigmas"])
    assert len(stages["similarity"]) == grid and stages["segment_starts"][0] == 0
    assert len(stages["dp_boundaries"]) == 2 == len(results["training_boundaries"])
    assert results["training_boundaries"] == stages["dp_boundaries"]  # tiny preset: the DP's are used
    assert stages["cost"] == pytest.approx(segmentation_cost(stages["similarity"], stages["segment_starts"]))
    for a in range(1, grid):  # no other two cuts do better
        for b in range(a + 1, grid):
            assert segmentation_cost(stages["similarity"], (0, a, b)) >= stages["cost"] - 1e-12
    assert (out / "similarity.png").stat().st_size > 0


def test_both_models_are_trained_and_measured(tiny_run):
    out, results = tiny_run
    for model in study.MODELS:
        points = results["evaluations"][model]
        assert [p["steps"] for p in points] == [3, 6]
        assert [p["trained_steps"] for p in points] == [3, 3]  # the second point resumes the first
        for p in points:
            assert p["train_img_per_s"] > 0 and p["train_cpu_s"] > 0 and p["flops_per_sample"] > 0
            assert math.isfinite(p["frechet_distance"]) and p["frechet_distance"] > 0
            assert 0 < p["classifier_confidence"] <= 1 and 0 <= p["class_entropy"] <= 1
            assert [s["stage"] for s in p["stage_loss"]] == [0, 1, 2]
            assert sum(s["count"] for s in p["stage_loss"]) == 32
    single, multi = (results["evaluations"][m][-1] for m in study.MODELS)
    assert single["parameters_per_call"] == [single["parameters"]]
    assert len(multi["parameters_per_call"]) == 3 and multi["parameters"] > max(multi["parameters_per_call"])
    assert results["quality_floor"] > 0
    assert (out / "quality.png").stat().st_size > 0 and (out / "cost.csv").read_text().count("\n") == 3
    assert json.loads((out / "results.json").read_text())["cost"] == results["cost"]


def test_rerun_reuses_every_unit(tiny_run):
    out, results = tiny_run
    again = study.run_preset("tiny", out, progress=False, device="cpu")
    assert again["evaluations"] == results["evaluations"] and again["stages"] == results["stages"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_stages", 0),
        ("grid_points", 1),
        ("decoder_channels", (8, 8)),
        ("stage_boundaries", (2.0, 1.0)),
        ("eval_steps", (6, 3)),
        ("torch_threads", -1),
        ("grid_sigma_min", 0.0),
        ("learning_rate", 0.0),
        ("num_train", 1),
    ],
)
def test_bad_config_names_the_field(field, value):
    config = study.PRESETS["tiny"]().__class__(**{**study.PRESETS["tiny"]().__dict__, field: value})
    with pytest.raises(ConfigError, match=field):
        config.validate()
