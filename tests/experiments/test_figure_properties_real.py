"""Issue 19 on the REAL stack (trainer, light DDPM++ UNets, sampler, empirical denoiser, k-NN):
the quick preset's training recipe with fewer samples (128 seeds, 12 Heun steps instead of 256 and
18), so that it fits CI (a few minutes on 2 cores); the full check is the documented command

    diffcore run reproducibility --preset quick --out runs/quick
    python -c "import json; from diffcore.experiments.reproducibility import figure_properties as f; \
print(f(json.load(open('runs/quick/results.json'))))"

1. The reproducibility study shows the seed's Figure 1 (``figure_properties``): memorization at the
   smallest N, generalization at the largest, a dip of RP across widths at the transition, and the
   wider model memorizing up to at least the same N.
2. The hidden-Gaussian study, reusing those models (``models_from``), shows its effect: at high
   sigma the models are close to the Gaussian denoiser; in sigma [0.1, 2] the largest-N model is
   closer to the Gaussian denoiser than to the empirical one, the N = 16 model the other way round.
"""
from __future__ import annotations

import pytest

from diffcore.experiments import hidden_gaussian, reproducibility
from diffcore.experiments.base import config_from_preset

REDUCED = ["num_samples=128", "sampler_steps=12", "grid_samples=4"]


@pytest.fixture(scope="module")
def quick_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    config = config_from_preset(reproducibility.PRESETS, "quick", REDUCED)
    return out, reproducibility.run(config, out, device="cpu", progress=False)


@pytest.mark.slow
def test_reproducibility_shows_figure1(quick_models):
    _, results = quick_models
    properties = reproducibility.figure_properties(results)
    assert all(properties.values()), (properties, results["curves"], results["cross_width"])
    assert results["figure_properties"] == properties


@pytest.mark.slow
def test_hidden_gaussian_on_the_study_models(quick_models, tmp_path):
    models_dir, repro = quick_models
    sizes = sorted({m["n"] for m in repro["models"]})
    width = max(m["width"] for m in repro["models"])
    config = config_from_preset(hidden_gaussian.PRESETS, "quick",
                                [f"models_from={models_dir}", f"widths={width}", f"sizes={sizes[0]},{sizes[-1]}",
                                 "num_sigmas=16", "num_samples=16", "grid_samples=4"])
    results = hidden_gaussian.run(config, tmp_path, device="cpu", progress=False)
    assert hidden_gaussian.effect_properties(results) == {
        "close_to_gaussian_at_high_sigma": True, "largest_n_closer_to_gaussian": True,
        "smallest_n_closer_to_empirical": True}, results["curves"]
