"""The locality study (closed-form local denoisers against trained networks) end to end on the real
stack at the tiny preset (width-4 UNets trained for 20 steps), its resume, the P calibration on a
synthetic case, its measures and its config checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffcore.analysis.locality import calibrate_patch_sizes, pearson_per_sample, per_sample_r2
from diffcore.experiments import locality as study
from diffcore.experiments.base import config_from_preset
from diffcore.ops import local_denoise, wiener_masks
from tests.helpers import assert_outputs, assert_refused_before_writing


@pytest.mark.slow
def test_tiny_run_measures_every_machine_of_every_model(tiny_run):
    out, results = tiny_run
    config = config_from_preset(study.PRESETS, "tiny")
    assert [m["n"] for m in results["models"]] == [8, 64]
    assert not set(results["calibration_seeds"]) & set(results["evaluation_seeds"])
    for m in results["models"]:
        levels = m["levels"]
        assert len(levels) == results["sampler"]["sampler_steps"] and levels == sorted(levels, reverse=True)
        for kind in study.CALIBRATED:
            assert len(m["patch_schedule"][kind]) == len(levels)
            assert set(m["patch_schedule"][kind]) <= set(config.patch_sizes)
        assert set(m["agreement"]) == {*study.MACHINES, "nearest_train"}
        for name in study.MACHINES:
            seeds = m["per_seed"][name]
            assert all(len(seeds[k]) == config.num_samples for k in study.MEASURES)
            assert all(-1 <= r <= 1 for r in seeds["pearson"]) and all(v >= 0 for v in seeds["mse"])
            for measure in study.MEASURES:
                iv = m["agreement"][name][measure]
                assert iv["low"] <= iv["value"] <= iv["high"] and iv["method"] == "bootstrap"
    regimes = {(c["n"], c["measure"]) for c in results["claims"].values()}
    assert regimes == {(n, k) for n in (8, 64) for k in study.MEASURES}
    assert all(isinstance(c["holds"], bool) and "difference" in c for c in results["claims"].values())
    assert_outputs(out, ("agreement.csv", "schedules.csv", "samples.png", "agreement.png", "schedules.png"), results)


@pytest.mark.slow
def test_a_killed_run_resumes_reusing_its_finished_units(tiny_run):
    out, results = tiny_run
    # a run killed before its last model: that model's unit and the results are missing
    shutil.rmtree(out / "units" / "machines" / "w4-n64-s0")
    (out / "results.json").unlink()
    resumed = study.run_preset("tiny", out, progress=False)
    machines = json.loads((out / "timings.json").read_text())["units"]["machines"]
    assert (machines["units"], machines["reused"]) == (2, 1)  # the finished model's unit reused
    models = json.loads((out / "reproducibility" / "timings.json").read_text())["units"]["models"]
    assert models["reused"] == models["units"] == 2  # the networks are not retrained
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(resumed) == strip(results)  # the remade unit gives the same numbers


def test_calibration_picks_the_patch_size_that_made_the_target():
    """Targets made by LS with P = 5 at the first level and P = 3 at the second: the calibration finds
    them (R^2 = 1 there, below 1 for the other candidate)."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(12, 1, 7, 7, generator=gen) * 2 - 1
    levels = [2.0, 0.5]
    sigmas = torch.tensor([2.0] * 5 + [0.5] * 5, dtype=torch.float64)
    states = train[:10] + sigmas.float().reshape(-1, 1, 1, 1) * torch.randn(10, 1, 7, 7, generator=gen)
    truth = [5] * 5 + [3] * 5
    targets = local_denoise(states, train, sigmas, kind="ls", patch_size=truth)

    def machine(x, sigma, size):
        return local_denoise(x, train, sigma, kind="ls", patch_size=size)

    chosen, table = calibrate_patch_sizes(machine, states, sigmas, targets, levels, [1, 3, 5])
    assert chosen == [5, 3]
    assert table[0][2] == pytest.approx(1.0) and table[1][1] == pytest.approx(1.0)
    assert max(table[0][:2]) < 0.999 and max(table[1][0], table[1][2]) < 0.999


def test_agreement_measures_on_known_cases():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(4, 1, 5, 5, generator=gen)
    mean = target.mean(dim=(1, 2, 3), keepdim=True).expand_as(target)
    assert per_sample_r2(target, target).tolist() == [1.0] * 4
    assert per_sample_r2(mean, target) == pytest.approx(torch.zeros(4, dtype=torch.float64), abs=1e-12)
    assert pearson_per_sample(3 * target + 1, target) == pytest.approx(torch.ones(4, dtype=torch.float64))
    assert pearson_per_sample(-target, target) == pytest.approx(-torch.ones(4, dtype=torch.float64))


def test_wiener_masks_public_rule_follows_the_public_formula():
    """rule='public': rows of W over their diagonal, one threshold relative to the largest entry,
    output m reads column m (C = 1: per pixel)."""
    gen = torch.Generator().manual_seed(2)
    train = torch.randn(40, 1, 3, 3, generator=gen).cumsum(dim=3)  # correlated pixels
    rows = train.reshape(40, -1).double()
    cov = (rows - rows.mean(0)).T @ (rows - rows.mean(0)) / 40
    w = cov @ torch.linalg.inv(cov + 0.5**2 * torch.eye(9, dtype=torch.float64))
    normalized = (w / torch.diagonal(w).unsqueeze(1)).abs()
    expected = (normalized >= 0.1 * normalized.max()).T.clone()
    expected |= (expected.sum(1, keepdim=True) == 0) & torch.eye(9, dtype=torch.bool)
    masks = wiener_masks(train, 0.5, 0.1, rule="public")
    assert torch.equal(masks, expected.float())
    assert 1 < float(masks.sum(dim=1).mean()) < 9  # neither the diagonal alone nor everything
    with pytest.raises(ValueError, match="rule"):
        wiener_masks(train, 0.5, 0.3, rule="columns")


@pytest.mark.parametrize(
    "override",
    [
        "patch_sizes=4",
        "calibration_seed_start=100002",
        "num_samples=2",
        "wiener_threshold=0",
        "wiener_rule=rows",
        "padding=reflect",
        "grid_samples=9",
    ],
)
def test_invalid_config_is_refused_before_anything_is_written(override, tmp_path):
    assert_refused_before_writing(study, override, tmp_path / "bad")
