"""The cfg study (docs/papers.md section 8) end to end on its tiny preset, resume, and config validation."""

from __future__ import annotations

import json

import pytest
import torch

from diffcore.experiments import EXPERIMENTS, cfg
from diffcore.experiments.base import ConfigError, apply_overrides
from diffcore.sampler import karras_sigmas

FIGURES = ("cfg-samples.png", "cfg-metrics.png", "cfg-cpc.png", "cfg-transition.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg")
    return out, cfg.run_preset("tiny", out, device="cpu", progress=False)


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_run):
    out, results = tiny_run
    config = cfg.PRESETS["tiny"]()
    names = [s["name"] for s in results["settings"]]
    assert names == [s["name"] for s in cfg.setting_list(config)] and len(set(names)) == len(names)
    for s in results["settings"]:
        for key in ("accuracy", "frechet", "precision", "density", "coverage"):
            assert s[key]["low"] <= s[key]["value"] <= s[key]["high"], key
        assert 0.0 <= s["accuracy"]["value"] <= 1.0 and s["frechet"]["value"] >= -1e-9 and s["diversity"] > 0
        assert 0.0 <= s["coverage"]["value"] <= 1.0 and s["accuracy"]["method"] == "wilson"
    claims = results["claims"]
    assert "conditional_not_saturated" in claims and all(isinstance(v["holds"], bool) for v in claims.values())
    assert results["data"]["accuracy"] > 0.95  # the shipped digits classifier
    grid = karras_sigmas(3, 0.002, 80.0, append_zero=False).tolist()
    assert [r["sigma"] for r in results["transition"]] == pytest.approx(grid, rel=1e-12)
    for row in results["transition"]:
        for name in ("conditional", "unconditional", "guidance"):
            for key in (f"dist_{name}", f"dist_{name}_empirical", f"ratio_{name}"):
                assert 0 <= row[f"{key}_low"] <= row[key] <= row[f"{key}_high"], key
        assert not any(key.startswith("score_dist") for key in row)
    cpc = results["cpc"]
    assert len(cpc) == config.cpc_sigmas
    for row in cpc:
        assert 0.0 <= row["overlap"] <= 1.0 + 1e-9 and row["random_overlap"] == pytest.approx(2 / 64)
        assert row["overlap_low"] <= row["overlap"] <= row["overlap_high"]
        values = row["net_singular_values"]
        assert len(values) == config.cpc_points and len(values[0]) == config.cpc_k
        assert all(v >= 0 for point in values for v in point)  # singular values, not signed eigenvalues
    jac = [s for s in results["settings"] if s["guidance"] == "jacobian_cpc" and s["high"] is None and s["low"] == 0]
    assert [s["w"] for s in jac] == list(config.cpc_guidance_scales)
    alignment = results["cpc_term_alignment"]
    assert [r["sigma"] for r in alignment] == pytest.approx(grid, rel=1e-12)
    assert all(r["cos_low"] <= r["cos"] <= r["cos_high"] and r["norm_ratio"] > 0 for r in alignment)
    comparison = results["equal_accuracy"]
    assert comparison["target"] == config.equal_accuracy and set(comparison) >= {"cfg", "jacobian_cpc"}
    for method in ("cfg", "jacobian_cpc"):  # reached: interpolated inside its bracket; else None
        entry = comparison[method]
        assert entry is None or (entry["between"][0] <= entry["w"] <= entry["between"][1])
        reached = claims["jacobian_cpc_lower_frechet_than_cfg_at_equal_accuracy"]["reached"][method]
        assert reached == (entry is not None)
    assert claims["jacobian_cpc_reaches_equal_accuracy"]["holds"] == (comparison["jacobian_cpc"] is not None)
    for name in FIGURES + ("results.json", "settings.csv", "transition.csv", "timings.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["settings"] == results["settings"]
    samples = torch.load(next((out / "units" / "samples").glob("net-conditional/samples.pt")), weights_only=True)
    assert samples["samples"].shape == (20, 1, 8, 8) and samples["labels"].tolist() == [
        c for c in range(10) for _ in range(2)
    ]


@pytest.mark.slow
def test_rerun_reuses_every_unit(tiny_run):
    out, results = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "units").rglob("MANIFEST.json")}
    again = cfg.run_preset("tiny", out, device="cpu", progress=False)
    assert again == results
    assert {p: p.stat().st_mtime_ns for p in (out / "units").rglob("MANIFEST.json")} == stamps


def test_registered_and_paper_preset_checks_before_binding(tmp_path):
    assert EXPERIMENTS["cfg"] == "diffcore.experiments.cfg"
    assert set(cfg.PRESETS) == {"quick", "tiny", "paper"}
    paper = cfg.PRESETS["paper"]()
    assert (paper.dataset, paper.model_preset, paper.width) == ("cifar10", "ddpmpp-cifar", 128)
    with pytest.raises(ConfigError, match="^data_root:"):
        cfg.run(paper, tmp_path / "a", device="cpu")  # the local CIFAR-10 folder is needed
    with pytest.raises(ConfigError, match="^inception_weights:"):
        cfg.run(apply_overrides(paper, ["data_root=/nowhere"]), tmp_path / "b", device="cpu")
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()


@pytest.mark.parametrize(
    "override, field",
    [
        ("width=0", "width"),
        ("label_dropout=1.0", "label_dropout"),
        ("label_dropout=0", "label_dropout"),
        ("guidance_scales=1,-2", "guidance_scales"),
        ("split_sigmas=100", "split_sigmas"),
        ("solver=rk4", "solver"),
        ("sigma_max=0.001", "sigma_max"),
        ("cpc_sigmas=99", "cpc_sigmas"),
        ("grid_per_class=500", "grid_per_class"),
        ("cpc_method=power", "cpc_method"),
        ("cpc_iters=1", "cpc_iters"),
        ("learning_rate=nan", "learning_rate"),
        ("linear_low=-1", "linear_low"),
        ("model_preset=unet9", "model_preset"),
        ("gaussian_scale=inf", "gaussian_scale"),
        ("dataset=mnist", "dataset"),
        ("inception_weights=w.pth", "inception_weights"),
        ("cpc_guidance_scales=0", "cpc_guidance_scales"),
        ("cpc_guidance_rank=-1", "cpc_guidance_rank"),
        ("equal_accuracy=1", "equal_accuracy"),
    ],
)
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ConfigError, match=f"^{field}[:\\[]"):
        apply_overrides(cfg.PRESETS["quick"](), [override]).validate()


def test_setting_intervals():
    settings = {s["name"]: s for s in cfg.setting_list(cfg.PRESETS["quick"]())}
    assert settings["net conditional"]["w"] == 0.0
    high, low = settings["net cfg w=2 sigma>1"], settings["net cfg w=2 sigma<=1"]
    assert (high["low"], high["high"]) == (1.0, None) and (low["low"], low["high"]) == (0.0, 1.0)
    assert settings["net + linear mean_shift w=2 sigma>1"]["guidance"] == "mean_shift"
