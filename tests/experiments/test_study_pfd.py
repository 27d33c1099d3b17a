"""The PFD teacher-student study (issue 8): E_gen falls and E_mem rises with N.

The study calls ``diffcore.denoisers.EmpiricalDenoiser``; here a float64 empirical denoiser built on
``diffcore.ref.empirical_denoise`` is injected instead (tests only), so the test does not depend on
the op's backends."""

from __future__ import annotations

import json

import pytest
import torch

from diffcore.experiments import EXPERIMENTS, pfd as study
from diffcore.ref.empirical_denoise import empirical_denoise_ref
from tests.helpers import assert_outputs


def reference_empirical(train):
    t = train.double()

    def denoise(x, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return empirical_denoise_ref(x.double(), t, s)[0].to(x.dtype)

    return denoise


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pfd")
    return out, study.run_preset("tiny", out, progress=False, hooks=study.PFDHooks(reference_empirical))


def test_registered_and_default_empirical_denoiser():
    from diffcore.denoisers import EmpiricalDenoiser

    assert EXPERIMENTS["pfd"] == "diffcore.experiments.pfd"
    assert study.default_hooks().empirical_denoiser is EmpiricalDenoiser


def test_e_gen_falls_and_e_mem_rises_with_n(tiny_run):
    _, results = tiny_run
    s = results["summary"]["64"]
    assert s["N"] == sorted(s["N"])
    assert s["e_gen"][-1] < s["e_gen"][0]
    assert s["e_mem"][-1] > s["e_mem"][0]
    # the memorizer itself is far from the teacher at small N and nearer at large N
    assert s["pfd_teacher_empirical"][-1] < s["pfd_teacher_empirical"][0]


def test_training_time_curve(tiny_run):
    _, results = tiny_run
    curve = results["curve"]
    steps = [p["step"] for p in curve]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == results["config"]["train_steps"]
    # at small N the student ends closer to the empirical denoiser than it starts
    assert curve[-1]["e_mem"] < curve[0]["e_mem"]


def test_outputs_and_resume(tiny_run):
    out, results = tiny_run
    assert_outputs(out, ("results.json", "pfd.csv", "curve.csv", "pfd_vs_n.png", "pfd_vs_time.png"))
    again = study.run_preset("tiny", out, progress=False, hooks=study.PFDHooks(reference_empirical))
    assert again == results
    timings = json.loads((out / "timings.json").read_text())
    assert sum(kind["reused"] for kind in timings["units"].values()) == len(results["students"])


def test_gaussian_teacher_exact_flow_matches_the_sampler():
    cfg = study.PRESETS["tiny"]()
    import dataclasses

    from diffcore import sampler

    cfg = dataclasses.replace(cfg, teacher="gaussian", teacher_flow="exact", sampler_steps=32)
    teacher = study.make_teacher(cfg)
    z = sampler.noise_from_seeds(range(16), (cfg.ambient_dim,), dtype=torch.float64)
    sig = sampler.karras_sigmas(cfg.sampler_steps).double()
    exact = teacher.sample(z, cfg.sigma_max)
    heun = sampler.sample_heun(teacher, sig[0] * z, sig)
    assert float((exact - heun).norm() / exact.norm()) < 3e-2  # Heun discretization, 32 steps


def test_bad_config_is_refused(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(study.PRESETS["tiny"](), teacher_flow="exact")
    with pytest.raises(ValueError, match="teacher_flow"):
        study.run(cfg, tmp_path, hooks=study.PFDHooks(reference_empirical), progress=False)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pfd-sweep")
    return study.run_preset("tiny-sweep", out, progress=False, hooks=study.PFDHooks(reference_empirical))


def test_sweep_intervals_bias_variance_and_claims(sweep_run):
    """Two widths x three seeds: seeds-t intervals, the bias-variance split adds up to the seeds'
    mean E_gen^2, the transition per seed on both axes, the claims decided on intervals."""
    results = sweep_run
    cfg = study.PRESETS["tiny-sweep"]()
    for width, entry in results["summary"].items():
        assert entry["e_gen_method"] == "seeds-t" and entry["params"] == study.student_params(cfg, int(width))
        assert all(lo <= v <= hi for v, lo, hi in zip(entry["e_gen"], entry["e_gen_low"], entry["e_gen_high"]))
    for bv in results["bias_variance"]:
        e2 = [r["e_gen"] ** 2 for r in results["students"] if r["width"] == bv["width"] and r["N"] == bv["N"]]
        assert bv["bias2"] + bv["variance"] == pytest.approx(sum(e2) / len(e2), rel=1e-6)
        assert bv["variance"] > 0 and bv["bias2_low"] <= bv["bias2"] <= bv["bias2_high"]
    assert len(results["bias_variance"]) == len(cfg.widths) * len(cfg.sizes)
    per_seed = results["transition"]["per_seed"]
    assert [p["seed"] for p in per_seed] == list(cfg.train_seeds)
    props = results["effect_properties"]
    assert props == study.effect_properties(results)
    assert set(props) == {
        "e_gen_falls_with_n",
        "e_mem_rises_with_n",
        "transition_aligns_on_n_over_sqrt_params",
        "early_learning_dip",
    }
    # the direction the tiny students show with their intervals: E_gen falls, E_mem rises with N
    assert props["e_gen_falls_with_n"]["holds"] and props["e_mem_rises_with_n"]["holds"]
    # the curve: the width-64 student at N = 2, every checkpoint with its interval
    assert {p["width"] for p in results["curve"]} == {64}
    assert all(p["e_gen_low"] <= p["e_gen"] <= p["e_gen_high"] for p in results["curve"])


def test_transition_crossing_on_known_curves():
    assert study._crossing([4, 16, 64], [1.0, 0.5, 0.2], [0.2, 0.5, 0.6]) == pytest.approx(16.0)
    assert study._crossing([4, 16], [1.0, 0.9], [0.2, 0.3]) is None
    rows = [
        {"width": w, "params": p, "N": n, "seed": 0, "e_gen": g, "e_mem": m}
        for w, p, curve in ((8, 64, ((4, 1.0, 0.0), (16, 0.0, 1.0))), (32, 1024, ((4, 1.0, 0.0), (64, 0.0, 1.0))))
        for n, g, m in curve
    ]
    got = study.transition(rows)["per_seed"][0]
    # N* = 8 and 16: spread of log2 N* is 0.5; on N / sqrt(params) the points are 1 and 0.5: also 0.5
    assert got["n_star"] == {"8": pytest.approx(8.0), "32": pytest.approx(16.0)}
    assert got["spread_n"] == pytest.approx(0.5) and got["spread_scaled"] == pytest.approx(0.5)
