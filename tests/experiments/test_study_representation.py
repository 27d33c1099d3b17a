"""The representation-dynamics study (issue 21) end to end on the real stack at the tiny preset
(width-4 UNets trained for 20 steps: seconds), plus its config checks."""

from __future__ import annotations

import pytest

from diffcore.experiments import representation as study
from diffcore.experiments.base import config_from_preset
from tests.helpers import assert_outputs, assert_refused_before_writing


@pytest.mark.slow
def test_tiny_run_measures_every_model_step_sigma_and_split(tiny_run):
    out, results = tiny_run
    config = config_from_preset(study.PRESETS, "tiny")
    sigmas = config.sigmas()
    assert [m["n"] for m in results["models"]] == [8, 512]
    assert [t["step"] for t in results["trajectory"]] == [10, 20]
    for m in [results["pixels"], *results["models"], *results["trajectory"]]:
        assert len(m["accuracy"]) == len(m["snr"]) == len(sigmas)
        for a in m["accuracy"]:
            assert a["low"] <= a["value"] <= a["high"] and a["n"] == config.probe_splits
        assert m["shape"] in ("unimodal", "decreasing", "increasing", "flat") and m["peak_sigma"] in sigmas
    for m in results["models"] + results["trajectory"]:
        rows = [r for r in results["curves"] if r["model"] == m["model"]]
        assert sorted({r["split"] for r in rows}) == list(range(config.probe_splits))
        assert sorted({r["sigma"] for r in rows}) == pytest.approx(sigmas)
        assert all(0 <= r["probe_accuracy"] <= 1 and r["snr"] > 0 for r in rows)
        assert 0 <= m["gl"]["value"] <= 1 and m["regime"] in ("generalizing", "memorizing", "between")
        gap = m["over_pixels_at_peak"]
        assert m["beats_pixels"] == (gap["low"] > 0)
    claims = results["claims"]
    assert {"signature_w4", "trajectory_n8", "signature", "pixels_not_unimodal"} <= set(claims)
    assert all(isinstance(c["holds"], bool) for c in claims.values())
    # Direction with intervals (the control): on raw pixels, noise at sigma_max destroys the digits.
    first, last = results["pixels"]["accuracy"][0], results["pixels"]["accuracy"][-1]
    assert last["high"] < first["low"]
    assert results["molrg_shape"]["shape"] == "unimodal"
    confidence = [r["confidence"] for r in results["molrg"]]
    assert confidence[0] > 0.99 and confidence[-1] < 0.5
    assert_outputs(out, ("curves.csv", "summary.csv", "models.csv", "molrg.csv", "representation.png"), results)


@pytest.mark.slow
def test_rerun_reuses_every_unit(tiny_run):
    out, results = tiny_run
    again = study.run_preset("tiny", out, progress=False)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in results.items() if k != "seconds"}


@pytest.mark.slow
def test_models_from_reuses_the_reproducibility_run(tiny_run, tmp_path):
    out, results = tiny_run
    reused = study.run_preset(
        "tiny", tmp_path / "reuse", [f"models_from={out / 'reproducibility'}", "trajectory_sizes="], progress=False
    )
    assert reused["trajectory"] == []
    assert [m["accuracy"] for m in reused["models"]] == [m["accuracy"] for m in results["models"]]
    assert not (tmp_path / "reuse" / "reproducibility").exists()


@pytest.mark.parametrize(
    "override",
    [
        "num_sigmas=2",
        "sigma_min=0",
        "probe_l2=nan",
        "pooling=max",
        "probe_train=0",
        "probe_splits=2",
        "generalizes_gl=1.5",
        "molrg_latent_dim=40",
    ],
)
def test_invalid_config_is_refused_before_anything_is_written(override, tmp_path):
    assert_refused_before_writing(study, override, tmp_path / "bad")
