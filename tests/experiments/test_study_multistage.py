"""The multi-stage study at its tiny preset: stage division, width allocation, three models,
FD and per-stage losses with intervals, claims decided on paired intervals."""

from __future__ import annotations

import json
import math

import numpy as np
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


def test_allocation_is_the_largest_paper_shaped_one_within_the_single_unets_flops(tiny_run):
    _, results = tiny_run
    decoder = results["allocation"]["decoder"]
    widths, p = decoder["widths"], results["stage_probabilities"]
    assert sum(p) == pytest.approx(1.0) and widths == sorted(widths, reverse=True)  # narrower with noise
    assert decoder["expected_flops"] == pytest.approx(sum(a * b for a, b in zip(p, decoder["stage_flops"])))
    assert decoder["expected_flops"] <= decoder["single_flops"] < decoder["next_expected_flops"]
    assert decoder["next_widths"][0] == widths[0] + 4  # the next candidate is over the budget
    training = results["allocation"]["training_flops"]
    for model in study.MODELS:  # the training FLOPs per image are the stage law's expectation
        assert training[model]["per_image"] == pytest.approx(
            sum(a * b for a, b in zip(p, training[model]["per_stage"]))
        )
    assert training["multistage"]["per_image"] <= training["single"]["per_image"]


def test_every_model_is_trained_and_measured_with_intervals(tiny_run):
    out, results = tiny_run
    per_stage = study.PRESETS["tiny"]().loss_draws_per_stage
    for model in study.MODELS:
        points = results["evaluations"][model]
        assert [p["steps"] for p in points] == [3, 6]
        assert [p["trained_steps"] for p in points] == [3, 3]  # the second point resumes the first
        assert points[1]["train_cpu_s_cumulative"] == pytest.approx(points[0]["train_cpu_s"] + points[1]["train_cpu_s"])
        flops = results["allocation"]["training_flops"][model]["per_image"]
        assert [p["train_flops"] for p in points] == pytest.approx([p["images"] * flops for p in points])
        for p in points:
            fd = p["frechet_interval"]
            assert fd["low"] <= fd["value"] <= fd["high"] and fd["n"] == 32
            assert fd["value"] == pytest.approx(p["frechet_distance"], rel=1e-6)  # the metric's own FD
            assert [s["stage"] for s in p["stage_loss"]] == [0, 1, 2]
            assert all(s["count"] == per_stage for s in p["stage_loss"])  # every stage equally drawn
            for s in p["stage_loss"]:
                assert s["loss"]["low"] <= s["loss"]["value"] <= s["loss"]["high"]
    assert results["quality_floor"]["value"] > 0
    assert (out / "quality.png").stat().st_size > 0 and (out / "cost.csv").read_text().count("\n") == 4
    assert json.loads((out / "results.json").read_text())["cost"] == results["cost"]


def test_stratified_draws_stay_inside_their_stage_and_cover_it():
    train = torch.zeros(4, 1, 8, 8)
    bounds = [0.5, 3.0]
    draws = study.stratified_stage_draws(train, bounds, 64, seed=0)
    edges = [0.0, *bounds, math.inf]
    for k, (x0, sigma, noise) in enumerate(draws):
        assert x0.shape == noise.shape == (64, 1, 8, 8) and sigma.shape == (64,)
        assert bool(((sigma >= edges[k]) & (sigma <= edges[k + 1])).all())
    # the stratification spreads draws over the stage's mass: the lowest stage reaches far below 0.5
    assert float(draws[0][1].min()) < 0.05 and float(draws[2][1].max()) > 6.0


def test_claims_follow_their_numbers(tiny_run):
    _, results = tiny_run
    claims = results["claims"]
    for model in ("multistage", "separate"):
        flops_claim, cpu_claim = claims[f"{model}_less_compute_for_quality"], claims[f"{model}_less_cpu_for_quality"]
        diff = flops_claim["fd_difference"]
        finals = [results["evaluations"][m][-1]["frechet_interval"]["value"] for m in (model, "single")]
        assert diff["value"] == pytest.approx(finals[0] - finals[1], rel=1e-9, abs=1e-9)  # paired, same seeds
        assert flops_claim["holds"] == (diff["high"] < 0 and flops_claim["train_flops_ratio"] <= 1)
        # CPU-seconds are measured, not counted: decided on the interval of the per-image ratio
        # over the training stretches (two per model in the tiny preset), never on the point ratio.
        ratio = cpu_claim["cpu_per_image_ratio"]
        assert ratio["method"] == "welch-log" and ratio["n"] == 2 and ratio["low"] <= ratio["value"] <= ratio["high"]
        assert cpu_claim["holds"] == (diff["high"] < 0 and ratio["high"] <= 1)
    sampling = claims["multistage_cheaper_sampling"]
    assert sampling["holds"] == (sampling["sampling_flops_ratio"] < 1)
    for model in ("multistage", "separate"):
        for row in claims["stage_loss_difference"][model]:
            assert row["low"] <= row["value"] <= row["high"]


def test_fd_bootstrap_equals_the_metric():
    from diffcore.metrics import frechet_distance
    from diffcore.metrics.frechet import FeatureStatistics, sqrt_psd

    gen = np.random.default_rng(0)
    ref, rows = gen.normal(size=(300, 5)), gen.normal(size=(80, 5)) + 0.3
    stats = FeatureStatistics.from_features(torch.from_numpy(ref))
    cov = stats.covariance
    ours = study._frechet_from_features(rows, stats.mean.numpy(), sqrt_psd(cov).numpy(), float(cov.trace()))
    assert ours == pytest.approx(frechet_distance(stats, torch.from_numpy(rows)), rel=1e-9)


def test_rerun_reuses_every_unit(tiny_run):
    out, results = tiny_run
    again = study.run_preset("tiny", out, progress=False, device="cpu")
    assert again["evaluations"] == results["evaluations"] and again["claims"] == results["claims"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_stages", 0),
        ("grid_points", 1),
        ("decoder_channels", (8, 8)),
        ("separate_channels", (8,)),
        ("stage_boundaries", (2.0, 1.0)),
        ("eval_steps", (6, 3)),
        ("torch_threads", -1),
        ("grid_sigma_min", 0.0),
        ("learning_rate", 0.0),
        ("num_train", 1),
        ("loss_draws_per_stage", 1),
        ("fd_resamples", 10),
    ],
)
def test_bad_config_names_the_field(field, value):
    config = study.PRESETS["tiny"]().__class__(**{**study.PRESETS["tiny"]().__dict__, field: value})
    with pytest.raises(ConfigError, match=field):
        config.validate()


def test_allocation_rule_needs_three_stages():
    config = study.PRESETS["tiny"]().__class__(**{**study.PRESETS["tiny"]().__dict__, "num_stages": 2})
    with pytest.raises(ConfigError, match="decoder_channels"):
        config.validate()
