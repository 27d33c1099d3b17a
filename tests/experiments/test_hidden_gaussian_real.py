"""Issue 19's hidden-Gaussian directions on the REAL stack (diffcore.train, the light DDPM++ UNet,
the Gaussian and empirical denoisers), and the training-noise recipe that reaches the trainer.
(Issue 27: the quick preset now trains by plain EDM score matching; the slow test below runs issue
19's recipe, the ``empirical-target`` preset, which these numbers were measured with.)

The quick preset itself trains two width-16 UNets for 1000 steps (about 2 min of CPU, docs/studies.md),
too long for CI; the slow test runs it reduced (REDUCED below: fewer steps, N = 8 instead of 16,
16 grid levels, fewer probes and samples), which still shows the two directions the quick preset
shows. The third target ("within 0.05 of the Gaussian denoiser at sigma >= 5") is not met by the
quick preset either (docs/studies.md: 0.03-0.10 there, the largest at sigma 5-8); the test checks
the bound its recipe (noise levels N(1.0, 2.0^2), empirical target at sigma >= 2) reaches in the
reduced run (0.109 at most, measured; with EDM's N(-1.2, 1.2^2) the models stayed 0.13-0.32 away).
"""

from __future__ import annotations

import pytest

from diffcore.experiments import _stack, hidden_gaussian
from diffcore.experiments.base import ConfigError, config_from_preset

REDUCED = [
    "train_steps=500",
    "sizes=8,1797",
    "num_sigmas=16",
    "linearity_pairs=16",
    "distill_samples=96",
    "num_samples=8",
    "sampler_steps=8",
    "grid_samples=4",
]


def _digits_spec(recipe: dict) -> dict:
    """A study's model spec of a width-8 light UNet on 16 digits, 10 steps, with ``recipe``
    (:func:`diffcore.experiments._stack.recipe_spec`)."""
    return {
        "dataset": "digits",
        "n": 16,
        "subset_seed": 0,
        "model_preset": "ddpmpp-digits-light",
        "width": 8,
        "seed": 0,
        "train_steps": 10,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "lr_warmup_images": 0,
        **recipe,
    }


def test_training_noise_levels_reach_the_trainer(tmp_path):
    spec = _digits_spec(_stack.recipe_spec("edm", 0.0, (-0.4, 2.0)))
    assert spec["sigma_lognormal"] == [-0.4, 2.0]
    request = _stack.training_request(spec, tmp_path, "cpu", progress=False)
    assert request.loss == "edm" and request.loss_options == {"P_mean": -0.4, "P_std": 2.0}
    # EDM's own levels add nothing to the spec: existing specs (and finished units) are unchanged
    assert _stack.recipe_spec("edm", 0.0, _stack.EDM_SIGMA_LOGNORMAL) == {}
    del spec["sigma_lognormal"]
    assert _stack.training_request(spec, tmp_path, "cpu", progress=False).loss_options == {}
    with pytest.raises(ValueError, match="sigma_lognormal"):
        _stack.recipe_spec("vp", 0.0, (-0.4, 2.0))
    with pytest.raises(ValueError, match="sigma_lognormal"):
        _stack.recipe_spec("edm", 0.0, (-0.4, 0.0))


def test_config_names_the_noise_level_fields(tmp_path):
    # the quick preset: plain EDM denoising score matching, half of the noise levels log-uniform
    # over the measured range; issue 19's recipe is the empirical-target preset
    quick = config_from_preset(hidden_gaussian.PRESETS, "quick")
    assert (quick.sigma_p_mean, quick.sigma_p_std) == _stack.EDM_SIGMA_LOGNORMAL and not quick.models_from
    assert (quick.train_target, quick.sigma_log_uniform) == ("clean", 0.5)
    spec = hidden_gaussian._Study(quick, tmp_path, None, "cpu", False).model_spec(16, 16, 0)
    assert spec["sigma_log_uniform"] == [0.5, 0.002, 80.0] and "target" not in spec
    assert _stack.training_request(spec, tmp_path, "cpu", progress=False).loss_options == {
        "log_uniform_fraction": 0.5,
        "log_uniform_range": [0.002, 80.0],
    }
    old = config_from_preset(hidden_gaussian.PRESETS, "empirical-target")
    assert (old.sigma_p_mean, old.sigma_p_std, old.sigma_log_uniform) == (1.0, 2.0, 0.0)
    assert (old.train_target, old.target_sigma_min) == ("empirical", 2.0)
    for preset, override, message in (
        ("quick", "sigma_log_uniform=1.5", "sigma_log_uniform"),
        ("quick", "sigma_p_std=0", "sigma_p_std"),
        ("empirical-target", "precond=vp", "sigma_p_mean, sigma_p_std"),
        ("quick", "precond=vp", "sigma_log_uniform: only precond=edm"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_preset(hidden_gaussian.PRESETS, preset, [override])


@pytest.mark.slow
def test_reduced_quick_recipe_shows_the_directions(tmp_path):
    config = config_from_preset(hidden_gaussian.PRESETS, "empirical-target", REDUCED)
    results = hidden_gaussian.run(config, tmp_path, device="cpu", progress=False)
    properties = results["effect_properties"]
    assert properties == hidden_gaussian.effect_properties(results)
    mid = [r for r in results["curves"] if 0.1 <= r["sigma"] <= 2]
    assert len({r["sigma"] for r in mid}) >= 3
    # for sigma in [0.1, 2], on noisy training images: the N = 1797 model closer to the Gaussian
    # denoiser than to the empirical one, the N = 8 model closer to the empirical one (point
    # estimates; the claims decided on intervals are in results.json, docs/studies.md)
    assert all(r["gap_train"] < 0 for r in mid if r["n"] == 1797), mid
    assert all(r["gap_train"] > 0 for r in mid if r["n"] == 8), mid
    # at sigma >= 5 both models within 0.125 of the Gaussian denoiser (on both probe sets; measured
    # 0.109 at most, at sigma 5.84, and 0.058 at most for sigma >= 20: 15-20% room for other CPUs)
    high = {
        (r["n"], r["sigma"]): max(r["dist_gaussian"], r["dist_gaussian_train"])
        for r in results["curves"]
        if r["sigma"] >= 5
    }
    assert high and max(high.values()) < 0.125, high
    assert max(d for (n, sigma), d in high.items() if sigma >= 20) < 0.07, high


def test_training_target_reaches_the_trainer(tmp_path):
    spec = _digits_spec(_stack.recipe_spec("edm", 0.0, (-0.4, 2.0), ("empirical", 5.0)))
    assert (spec["target"], spec["target_sigma_min"]) == ("empirical", 5.0)
    request = _stack.training_request(spec, tmp_path, "cpu", progress=False)
    assert request.loss_options == {"P_mean": -0.4, "P_std": 2.0, "target": "empirical", "target_sigma_min": 5.0}
    assert _stack.recipe_spec("edm", 0.0, _stack.EDM_SIGMA_LOGNORMAL, ("clean", 0.0)) == {}
    with pytest.raises(ValueError, match="target: expected one of clean, empirical"):
        _stack.recipe_spec("edm", 0.0, target=("posterior", 5.0))
    with pytest.raises(ValueError, match="needs EDM preconditioning without augmentation"):
        _stack.recipe_spec("edm", 0.12, target=("empirical", 5.0))
    option = config_from_preset(hidden_gaussian.PRESETS, "empirical-target", ["target_sigma_min=5"])
    assert (option.train_target, option.target_sigma_min) == ("empirical", 5.0)
    with pytest.raises(ConfigError, match="target_sigma_min: only train_target=empirical"):
        config_from_preset(hidden_gaussian.PRESETS, "empirical-target", ["train_target=clean"])
    with pytest.raises(ConfigError, match="train_target"):
        config_from_preset(hidden_gaussian.PRESETS, "quick", ["train_target=posterior"])
