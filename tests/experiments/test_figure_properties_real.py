"""Issue 19 on the REAL stack (trainer, light DDPM++ UNets, sampler, empirical denoiser, k-NN):
the quick preset itself (its training dominates: about 2 min on 2 idle AVX-512 cores, 4-5 min on
AVX2-only ones; fewer samples or sampler steps would move the N = 16 memorized fraction of the
width-8 model, 0.92, too close to the 0.9 bound). The same check by hand:

    diffcore run reproducibility --preset quick --out runs/quick
    python -c "import json; from diffcore.experiments.reproducibility import figure_properties as f; \
print(f(json.load(open('runs/quick/results.json'))))"

1. The reproducibility study shows the seed's Figure 1 (``figure_properties``): memorization at the
   smallest N, generalization at the largest, a dip of RP across widths at the transition, and the
   wider model memorizing up to at least the same N.
2. The hidden-Gaussian study, reusing those models (``models_from``): the directions these models
   show (see the test; two of issue 19's three targets are not met by them, documented).
"""

from __future__ import annotations

import pytest

from diffcore.experiments import hidden_gaussian, reproducibility
from diffcore.experiments.base import config_from_preset


@pytest.fixture(scope="module")
def quick_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    config = config_from_preset(reproducibility.PRESETS, "quick")
    return out, reproducibility.run(config, out, device="cpu", progress=False)


@pytest.mark.slow
def test_reproducibility_shows_figure1(quick_models):
    _, results = quick_models
    properties = reproducibility.figure_properties(results)
    assert results["figure_properties"] == properties
    # decided on 95% intervals (issue 27; measured in docs/studies.md): these hold
    for name in (
        "generalizes_at_largest_n",
        "rp_dips_at_transition",
        "wider_memorizes_longer",
        "wider_less_generalized_somewhere",
    ):
        assert properties[name]["holds"], (name, properties[name])
    # memorization at N = 16 holds on the point estimates (GL <= 0.1, memorized >= 0.9 at both
    # widths), but not on the intervals: width 8's memorized fraction 0.918 has [0.878, 0.946]
    first = {w: (c["gl"][0], c["memorized_ratio"][0]) for w, c in results["curves"].items()}
    assert all(gl <= 0.1 and mem >= 0.9 for gl, mem in first.values()), first


@pytest.mark.slow
def test_hidden_gaussian_on_the_study_models(quick_models, tmp_path):
    models_dir, repro = quick_models
    sizes = sorted({m["n"] for m in repro["models"]})
    width = max(m["width"] for m in repro["models"])
    config = config_from_preset(
        hidden_gaussian.PRESETS,
        "quick",
        [
            f"models_from={models_dir}",
            f"widths={width}",
            f"sizes={sizes[0]},{sizes[-1]}",
            "num_sigmas=16",
            "num_samples=16",
            "grid_samples=4",
        ],
    )
    results = hidden_gaussian.run(config, tmp_path, device="cpu", progress=False)
    assert results["effect_properties"] == hidden_gaussian.effect_properties(results)
    # what these models show (measured on the quick models, docs/experiments.md): for sigma in
    # [0.1, 2] the largest-N model is closer to the Gaussian denoiser than to the empirical one,
    # and closer to the Gaussian denoiser than the N = 16 model is, at every sigma >= 0.1
    assert all(r["gap_train"] < 0 for r in results["curves"] if r["n"] == sizes[-1] and 0.1 <= r["sigma"] <= 2), (
        results["curves"]
    )
    rows = {(r["n"], r["sigma"]): r for r in results["curves"]}
    sigmas = sorted({s for _, s in rows if s >= 0.1})
    assert all(rows[(sizes[-1], s)]["dist_gaussian"] < rows[(sizes[0], s)]["dist_gaussian"] for s in sigmas)
    # the N = 16 model is closer to the empirical denoiser than to the Gaussian one for sigma in
    # [0.3, 2]; NOT met (documented, issue 19): the same below sigma 0.3 (on probe images outside
    # its 16 training images the memorizing model stays near the identity there, while the
    # empirical denoiser snaps to a training image), and "within 0.05 of the Gaussian denoiser
    # at sigma >= 5" (these models are 0.13-0.27 away: EDM's ln sigma ~ N(-1.2, 1.2^2) trains
    # sigma >= 5 on about 1% of the samples)
    mid = [r for r in results["curves"] if r["n"] == sizes[0] and 0.3 <= r["sigma"] <= 2]
    assert mid and all(r["dist_empirical"] < r["dist_gaussian"] for r in mid), mid
