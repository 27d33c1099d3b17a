"""The PFD teacher-student study (issue 8): E_gen falls and E_mem rises with N.

The study calls ``diffcore.denoisers.EmpiricalDenoiser``; here a float64 empirical denoiser built on
``diffcore.ref.empirical_denoise`` is injected instead (tests only), so the test does not depend on
the op's backends."""
from __future__ import annotations

import json

import pytest
import torch

from diffcore.experiments import EXPERIMENTS
from diffcore.experiments import pfd as study
from diffcore.ref.empirical_denoise import empirical_denoise_ref


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
    s = results["summary"]
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
    for name in ("results.json", "pfd.csv", "curve.csv", "pfd_vs_n.png", "pfd_vs_time.png"):
        assert (out / name).stat().st_size > 0
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
