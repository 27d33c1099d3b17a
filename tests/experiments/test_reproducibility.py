"""The reproducibility study end to end with closed-form stand-ins (tiny preset, seconds)."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from diffcore.experiments import reproducibility as study
from diffcore.experiments.base import config_from_preset, unit_timings
from diffcore.metrics import intervals as iv

# N = 96 lies between the capacities of the two widths (64 and 128 images): width 4 generalizes there
# while width 8 still memorizes.
OVERRIDES = ["num_samples=16", "grid_samples=4", "sampler_steps=6", "sizes=8,96,512"]


def _config():
    return config_from_preset(study.PRESETS, "tiny", OVERRIDES)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, stand_in_stack):
    StandInStack = stand_in_stack
    out = tmp_path_factory.mktemp("repro")
    stack = StandInStack()
    results = study.run(_config(), out, hooks=stack.hooks(), progress=False)
    return out, results, stack


def test_outputs_have_the_expected_structure(finished_run):
    out, results, _ = finished_run
    cfg = _config()
    for name in ("results.json", "models.csv", "pairs.csv", "figure1.png", "timings.json", "config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    n_models = len(cfg.widths) * len(cfg.sizes) * len(cfg.train_seeds)
    assert len(results["models"]) == n_models
    per_n = len(cfg.widths) * len(cfg.train_seeds)
    assert len(results["pairs"]) == len(cfg.sizes) * per_n * (per_n - 1) // 2
    assert {p["kind"] for p in results["pairs"]} == {"seeds", "widths"}
    with open(out / "models.csv") as fh:
        assert len(list(csv.DictReader(fh))) == n_models
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert len(grids) == n_models + len(cfg.sizes)
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results["curves"]) == {str(w) for w in cfg.widths}
    assert 0.9 < results["threshold"] < 1.0 and results["threshold_source"].startswith("calibrated")
    timings = json.loads((out / "timings.json").read_text())
    assert timings["schema"] == "diffcore-timings/1" and timings["units"]["models"]["units"] == n_models


def test_direction_of_the_effect(finished_run):
    """Smallest N: the models memorize (GL ~ 0, RP vs empirical high); largest N: GL higher."""
    _, results, _ = finished_run
    small, large = min(_config().sizes), max(_config().sizes)
    for row in results["models"]:
        if row["n"] == small:
            assert row["gl"] <= 0.1 and row["rp_empirical"] >= 0.9 and row["memorized_ratio"] >= 0.9
        if row["n"] == large:
            assert row["gl"] >= 0.5 and row["rp_empirical"] <= 0.5
    for emp in results["empirical"]:
        assert emp["gl"] == 0.0  # the empirical denoiser only reproduces training images
    for _width, curve in results["curves"].items():
        assert curve["gl"][-1] > curve["gl"][0]
    at_96 = {m["width"]: m for m in results["models"] if m["n"] == 96 and m["seed"] == 0}
    assert at_96[4]["gl"] > at_96[8]["gl"] and at_96[8]["rp_empirical"] > at_96[4]["rp_empirical"]
    # memorizing models reproduce each other (same training image) and so do generalizing ones
    for pair in results["pairs"]:
        if pair["n"] in (8, 512):
            assert pair["rp"] >= 0.8, pair


def test_every_headline_number_has_its_interval(finished_run):
    """GL, memorized fraction and RP carry Wilson intervals over the 16 samples; RP is recorded at a
    grid of thresholds around the one used; each property is a claim decided on the intervals."""
    _, results, _ = finished_run
    num = _config().num_samples
    for row in results["models"]:
        for key in ("gl", "memorized_ratio", "rp_empirical"):
            expect = iv.wilson_interval(round(row[key] * num), num)
            assert (row[f"{key}_low"], row[f"{key}_high"]) == pytest.approx((expect.low, expect.high))
    grid = results["threshold_grid"]
    assert len(grid) == len(study.THRESHOLD_GAP_FACTORS) and max(grid) < 1.0
    used = grid.index(results["threshold"])
    for pair in results["pairs"]:
        assert pair["rp_low"] <= pair["rp"] <= pair["rp_high"] and pair["rp_grid"][used] == pair["rp"]
        assert pair["rp_grid"] == sorted(pair["rp_grid"], reverse=True)  # a higher threshold reproduces less
        assert pair["similarity_mean_low"] <= pair["similarity_mean"] <= pair["similarity_mean_high"]
    # two seeds: the curves pool the seeds' samples (Wilson over 2 x 16)
    curve = results["curves"]["4"]
    assert curve["gl_method"] == "wilson-pooled" and all(
        lo <= v <= hi for v, lo, hi in zip(curve["gl"], curve["gl_low"], curve["gl_high"])
    )
    by_threshold = results["cross_width"]["rp_by_threshold"]
    assert [e["threshold"] for e in by_threshold] == grid and all("dip" in e for e in by_threshold)
    props = results["figure_properties"]
    assert props == study.figure_properties(results)
    for name, record in props.items():
        assert isinstance(record["holds"], bool), name
    # the width-8 stand-in still memorizes at N = 96, where width 4 generalizes
    assert props["wider_memorizes_longer"]["holds"], props["wider_memorizes_longer"]


def test_figure_properties_decide_on_intervals():
    """Synthetic curves: a dip of 0.25 over 256 samples holds, the same dip over 8 samples does not."""

    def results(num, gl_small):
        sizes = [16, 64, 256]
        models = [
            {"width": w, "n": n, "seed": 0, "gl": g, "memorized_ratio": 1 - g, "rp_empirical": 1 - g}
            for w, gls in ((8, (gl_small, 0.9, 1.0)), (16, (gl_small, 0.4, 1.0)))
            for n, g in zip(sizes, gls)
        ]
        pairs = [
            {"n": n, "kind": "widths", "width_a": 8, "width_b": 16, "rp": rp, "rp_grid": [rp], "similarity_mean": rp}
            for n, rp in zip(sizes, (0.75, 0.5, 0.75))
        ]
        out = {"config": {"num_samples": num}, "models": models, "pairs": pairs, "threshold_grid": [0.9]}
        out.update(study.summarize(out))
        return study.figure_properties(out)

    many, few = results(256, 0.0), results(8, 0.0)
    assert many["rp_dips_at_transition"]["holds"] and not few["rp_dips_at_transition"]["holds"]
    assert many["memorizes_at_smallest_n"]["holds"] and not few["memorizes_at_smallest_n"]["holds"]
    assert many["wider_less_generalized_somewhere"] == {"holds": True, "widths": [8, 16], "at_n": [64]}
    assert not results(256, 0.08)["memorizes_at_smallest_n"]["holds"]  # 0.08 of 256: upper end above 0.1
    assert many["generalizes_at_largest_n"]["holds"] and not few["generalizes_at_largest_n"]["holds"]


def test_rerun_reuses_everything(finished_run, stand_in_stack):
    StandInStack = stand_in_stack

    out, results, _ = finished_run
    stack = StandInStack()
    again = study.run(_config(), out, hooks=stack.hooks(), progress=False)
    assert again == json.loads(json.dumps(results))
    assert stack.calls == {"train": 0, "load": 0, "sample": 0}


def test_kill_and_resume_gives_identical_results(finished_run, tmp_path, stand_in_stack):
    StandInStack = stand_in_stack

    out_full, _, _ = finished_run
    killed = StandInStack(fail_on_train_call=3)
    with pytest.raises(KeyboardInterrupt):
        study.run(_config(), tmp_path, hooks=killed.hooks(), progress=False)
    assert not (tmp_path / "results.json").exists()
    resumed = StandInStack()
    study.run(_config(), tmp_path, hooks=resumed.hooks(), progress=False)
    n_models = len(_config().widths) * len(_config().sizes) * len(_config().train_seeds)
    assert resumed.calls["train"] == n_models - 2  # the two finished models were reused
    assert (tmp_path / "results.json").read_bytes() == (out_full / "results.json").read_bytes()
    assert (tmp_path / "models.csv").read_bytes() == (out_full / "models.csv").read_bytes()


def test_another_config_in_the_same_folder_is_refused(finished_run, stand_in_stack):
    StandInStack = stand_in_stack

    from diffcore.experiments.base import UnitError

    out, _, _ = finished_run
    other = dataclasses.replace(_config(), num_samples=8)
    with pytest.raises(UnitError, match="num_samples"):
        study.run(other, out, hooks=StandInStack().hooks(), progress=False)


def test_fixed_threshold_and_l2_similarity(tmp_path, stand_in_stack):
    StandInStack = stand_in_stack

    cfg = dataclasses.replace(_config(), similarity="l2", threshold=0.9, sizes=(8,), widths=(4,), train_seeds=(0,))
    results = study.run(cfg, tmp_path, hooks=StandInStack().hooks(), progress=False)
    assert results["threshold"] == 0.9 and results["threshold_source"] == "config"
    assert results["similarity"]["name"] == "l2" and results["pairs"] == []
    assert not (tmp_path / "units" / "calibration").exists()


def test_presets_are_valid():
    for name, make in study.PRESETS.items():
        cfg = make()
        assert cfg.sizes == tuple(sorted(cfg.sizes)), name
    paper = study.PRESETS["paper"]()
    assert paper.widths == (64, 128, 256) and paper.sizes[0] == 64 and paper.sizes[-1] == 2**14
    assert paper.num_samples == 10_000 and paper.sample_seed_start == 100000


def test_three_seeds_give_seed_intervals_and_same_width_rp(tmp_path, stand_in_stack):
    assert study.PRESETS["seeds"]().train_seeds == (0, 1, 2)
    assert dataclasses.replace(study.PRESETS["seeds"](), train_seeds=(0,)) == study.PRESETS["quick"]()
    config = config_from_preset(
        study.PRESETS,
        "tiny",
        ["num_samples=8", "grid_samples=0", "sampler_steps=4", "sizes=8,512", "train_seeds=0,1,2"],
    )
    results = study.run(config, tmp_path, hooks=stand_in_stack().hooks(), progress=False)
    for curve in results["curves"].values():
        assert curve["gl_method"] == "seeds-t" and curve["rp_seeds_method"] == "seeds-t"
        assert all(v is not None for v in curve["rp_seeds"])  # three same-width pairs per N
    assert sum(p["kind"] == "seeds" for p in results["pairs"]) == 2 * 2 * 3


def test_torchscript_descriptor_uses_the_paper_threshold(tmp_path, stand_in_stack):
    import torch

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(x, 2).flatten(1)

    path = tmp_path / "descriptor.pt"
    torch.jit.script(Pool()).save(str(path))
    cfg = dataclasses.replace(_config(), similarity=f"raw:{path}", sizes=(8,), widths=(4,), train_seeds=(0,))
    results = study.run(cfg, tmp_path / "out", hooks=stand_in_stack().hooks(), progress=False)
    assert results["threshold"] == 0.6 and results["threshold_source"].startswith("descriptor")
    assert results["similarity"]["name"] == "raw:descriptor.pt"
    assert results["models"][0]["gl"] == 0.0  # memorizing stand-in: exact copies


def test_models_of_one_width_and_seed_train_as_ensembles(tmp_path, stand_in_stack):
    """Worker tasks group the unfinished models of one (width, seed) into ensembles of at most
    train_ensemble; an ensemble trains only members whose model unit is unfinished, and each member's
    unit records the ensemble's metadata and its share of the training seconds."""
    from tests.experiments.conftest import subset

    stack = stand_in_stack()
    ensembles = []

    def train_ensemble(images, specs, work_dirs, device="cpu", progress=True):
        assert [im.shape[0] for im in images] == [s["n"] for s in specs]
        ensembles.append([(s["width"], s["n"], s["seed"]) for s in specs])
        for work_dir in work_dirs:
            (work_dir / "checkpoint.txt").write_text("final step")
        return [{"final_loss": 0.2, "ensemble_size": len(specs), "ensemble_train_seconds": 4.0} for _ in specs]

    config = dataclasses.replace(_config(), widths=(4,), train_seeds=(0, 1), train_ensemble=3)
    lone = study._Study(config, tmp_path, stack.hooks(), "cpu", progress=False)
    assert {t[0] for t in lone.worker_tasks()} == {"model", "empirical"}  # hooks without train_ensemble

    run = study._Study(
        config, tmp_path, dataclasses.replace(stack.hooks(), train_ensemble=train_ensemble), "cpu", progress=False
    )
    pool = stack.pool
    run.model_unit(4, 512, 0, subset(pool, 512, config.subset_seed)[0])  # finished before: not retrained
    tasks = run.worker_tasks()
    assert [t for t in tasks if t[0] != "empirical"] == [
        ("ensemble", 4, (512, 96, 8), 0),
        ("ensemble", 4, (512, 96, 8), 1),
    ]
    run.run_task(tasks[0], pool, tuple(pool.shape[1:]), progress=False)
    assert ensembles == [[(4, 96, 0), (4, 8, 0)]]
    models = [u for u in run.ws.units if u.path.parent.name == "models"]
    metas = {u.spec["n"]: u.meta for u in models}
    assert metas[512] == {"final_loss": 0.1}
    assert metas[96] == metas[8] == {"final_loss": 0.2, "ensemble_size": 2, "ensemble_train_seconds": 4.0}
    made = [u for u in models if not u.reused]  # the lone model is recorded once, when made
    assert len(made) == 3 and unit_timings(run.ws.units)["models"]["units"] == 3
    assert unit_timings(run.ws.units)["models"]["seconds"] == pytest.approx(sum(u.seconds for u in made) + 4.0)
    assert all(
        run.ws.finished("samples", f"w4-n{n}-s0", {**run.model_spec(4, n, 0), **run.sampling_spec()})
        for n in (512, 96, 8)
    )


class _Pool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 2).flatten(1)


class _Rows(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=3).flatten(1)


def test_replacing_a_descriptor_file_recomputes_every_unit_that_used_it(tmp_path, stand_in_stack):
    """Units are keyed on the descriptor's content, not its path (issue 32): after the file at the
    same path is replaced, a rerun makes GL and RP again, with exactly the results of a fresh run
    (old per-model GL never meets new pair RP in one results.json)."""
    path = tmp_path / "descriptor.pt"
    cfg = dataclasses.replace(_config(), similarity=f"raw:{path}", sizes=(8, 96), widths=(4, 8), train_seeds=(0,))
    torch.jit.script(_Pool()).save(str(path))
    first = study.run(cfg, tmp_path / "out", hooks=stand_in_stack().hooks(), progress=False)
    torch.jit.script(_Rows()).save(str(path))  # another network, same path
    rerun = study.run(cfg, tmp_path / "out", hooks=stand_in_stack().hooks(), progress=False)
    study.run(cfg, tmp_path / "fresh", hooks=stand_in_stack().hooks(), progress=False)
    assert rerun["similarity"]["sha256"] != first["similarity"]["sha256"]
    assert (tmp_path / "out" / "results.json").read_bytes() == (tmp_path / "fresh" / "results.json").read_bytes()
    assert [m["nn_similarity_mean"] for m in rerun["models"]] != [m["nn_similarity_mean"] for m in first["models"]]


class _Zeros(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 8)


def test_a_degenerate_descriptor_is_refused_before_anything_is_trained(tmp_path, stand_in_stack):
    path = tmp_path / "zeros.pt"
    torch.jit.script(_Zeros()).save(str(path))
    cfg = dataclasses.replace(_config(), similarity=f"raw:{path}", sizes=(8,), widths=(4,), train_seeds=(0,))
    with pytest.raises(ValueError, match="zeros.pt.*all zeros"):
        study.run(cfg, tmp_path / "out", hooks=stand_in_stack().hooks(), progress=False)
    assert not (tmp_path / "out" / "units").exists() and not (tmp_path / "out" / "config.json").exists()


# ----------------------------------------------------------------------------- subsets=disjoint


def test_disjoint_halves_share_no_image_and_no_near_duplicate():
    """The halves are disjoint, equal in size, and no image of one lies within the rule of the other."""
    pool = torch.rand(60, 1, 4, 4) * 2 - 1
    pool[7] = pool[3] + 0.01  # a near-duplicate (RMS 0.01) of image 3
    halves = study.disjoint_halves(pool, seed=0, duplicate_rms=0.1)
    a, b = halves["a"], halves["b"]
    assert halves["removed"] == 1 and halves["half_size"] == 29 == a.numel() == b.numel()
    assert not set(a.tolist()) & set(b.tolist())
    assert not {3, 7} <= set(a.tolist()) | set(b.tolist())  # one of the pair dropped
    rms = torch.cdist(pool[a].reshape(29, -1), pool[b].reshape(29, -1)) / 4
    assert float(rms.min()) >= 0.1
    assert torch.equal(study.disjoint_halves(pool, 0, 0.1)["a"], a)  # deterministic


def test_disjoint_subsets_strong_generalization(tmp_path, stand_in_stack):
    """Stand-ins: at N = 512 (above capacity) the two halves' Gaussian stand-ins give samples closer
    to each other than to their training images; at N = 8 each model copies its own images."""
    config = config_from_preset(
        study.PRESETS,
        "tiny",
        [
            "num_samples=32",
            "grid_samples=4",
            "sampler_steps=6",
            "sizes=8,512",
            "widths=4",
            "train_seeds=0",
            "subsets=disjoint",
        ],
    )
    stack = stand_in_stack()
    results = study.run(config, tmp_path, hooks=stack.hooks(), progress=False)
    assert results["halves"]["half_size"] * 2 + results["halves"]["removed"] == 1797
    assert len(results["models"]) == 4 and {m["half"] for m in results["models"]} == {"a", "b"}
    small, large = sorted(results["strong_generalization"], key=lambda p: p["n"])
    for point in (small, large):
        assert point["margin_low"] <= point["margin"] <= point["margin_high"]
        assert sum(point["histograms"]["cross"]) == 32 and sum(point["histograms"]["own"]) == 64
    assert small["margin_high"] < 0 < large["margin_low"]
    props = results["figure_properties"]
    assert props["closer_to_each_other_at_largest_n"]["holds"] and props["closer_to_training_at_smallest_n"]["holds"]
    assert props["closer_to_each_other_at_largest_n"]["first_n_closer_to_each_other"] == {"w4-s0": 512}
    for name in ("strong_generalization.png", "strong_generalization.csv", "grids/disjoint-w4-n512-s0.png"):
        assert (tmp_path / name).is_file(), name
    # every model trained on its half: the stand-in's model file lists the half's first N images
    halves = study.disjoint_halves(stack.pool, 0, 0.1)
    trained = json.loads((tmp_path / "units" / "models" / "w4-n8-s0-b" / "model.json").read_text())
    assert trained["indices"] == halves["b"][:8].tolist()
    assert study.summary(results, tmp_path)[1].split()[:2] == ["4", "8"]


def test_disjoint_sizes_are_bounded_by_the_half():
    with pytest.raises(study.base.ConfigError, match="sizes"):
        dataclasses.replace(study._disjoint(), sizes=(16, 899)).validate(1797)
    study._disjoint().validate(1797)


def test_disjoint_sizes_beyond_the_deduplicated_half_are_refused(tmp_path, stand_in_stack):
    """A loose near-duplicate rule removes images: N larger than the half left is refused by name."""
    overrides = ["sizes=8,898", "widths=4", "train_seeds=0", "subsets=disjoint", "duplicate_rms=0.3"]
    config = config_from_preset(study.PRESETS, "tiny", overrides)
    with pytest.raises(study.base.ConfigError, match="^sizes: .*near-duplicates"):
        study.run(config, tmp_path, hooks=stand_in_stack().hooks(), progress=False)


def test_new_fields_at_their_defaults_leave_the_stored_config_and_model_specs_as_they_were():
    """subsets=nested and sigma_log_uniform=0 add nothing to config.json (old folders resume) nor to
    a model's spec; sigma_log_uniform > 0 trains over [sigma_min, sigma_max] (EDMLoss's share)."""
    quick = study._quick()
    assert not {"subsets", "duplicate_rms", "sigma_log_uniform"} & set(quick.result_fields())
    assert "sigma_log_uniform" not in study.model_spec(quick, 8, 16, 0)
    wide = dataclasses.replace(quick, sigma_log_uniform=0.5)
    assert study.model_spec(wide, 8, 16, 0)["sigma_log_uniform"] == [0.5, 0.002, 80.0]
    with pytest.raises(study.base.ConfigError, match="sigma_log_uniform"):
        dataclasses.replace(wide, precond="vp").validate()
