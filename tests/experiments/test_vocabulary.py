"""One vocabulary across studies: a shared field is checked by base.VOCABULARY_CHECKS (or by the
study's own, stricter entry), and an out-of-range value is refused naming the field in every study
that has it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from diffcore.experiments import EXPERIMENTS, experiment, recipes
from diffcore.experiments.base import VOCABULARY_CHECKS, ConfigError, check_fields, field_checks

# A value out of range for every field of the vocabulary, refused by the shared check and by every
# study's own entry for that field (e.g. dynamics' threshold in (0, 1]).
OUT_OF_RANGE = {
    "dataset": "nope",
    "data_root": 3,
    "subset_seed": -1,
    "num_train": 1,
    "sizes": (1,),
    "models_from": 3,
    "model_preset": "nope",
    "width": 0,
    "widths": (0,),
    "train_seed": -1,
    "train_seeds": (-1,),
    "train_steps": 0,
    "batch_size": 0,
    "learning_rate": 0.0,
    "lr_warmup_images": -1,
    "precond": "nope",
    "augment_p": 1.5,
    "label_dropout": 1.0,
    "sigma_p_mean": 100.0,
    "sigma_p_std": 0.0,
    "P_mean": 100.0,
    "P_std": 0.0,
    "sigma_log_uniform": 1.5,
    "num_components": 0,
    "ambient_dim": 0,
    "latent_dim": 0,
    "mlp_width": 0,
    "mlp_depth": 0,
    "num_samples": 0,
    "sample_seed_start": -1,
    "sampler_steps": 0,
    "solver": "nope",
    "sigma_min": 0.0,
    "sigma_max": 1e9,
    "sample_batch": 0,
    "similarity": 3,
    "threshold": 2.0,
    "num_sigmas": 0,
    "probe_seed": -1,
    "control_seed": -1,
    "attack_seed": -1,
    "inception_weights": 3,
    "grid_samples": -1,
    "torch_threads": -1,
}


def _shared_fields() -> list[tuple[str, str]]:
    pairs = []
    for name in sorted(EXPERIMENTS):
        fields = {f.name for f in dataclasses.fields(experiment(name).CONFIG_CLASS)}
        pairs.extend((name, field) for field in sorted(fields & set(VOCABULARY_CHECKS)))
    return pairs


def test_every_word_of_the_vocabulary_has_an_out_of_range_value_here():
    assert set(OUT_OF_RANGE) == set(VOCABULARY_CHECKS)


@pytest.mark.parametrize(("study", "field"), _shared_fields())
def test_an_out_of_range_shared_field_is_refused_naming_it(study, field):
    module = experiment(study)
    config = dataclasses.replace(module.PRESETS["tiny"](), **{field: OUT_OF_RANGE[field]})
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}(\[0\])?: expected"):
        config.validate()


@pytest.mark.parametrize("study", sorted(EXPERIMENTS))
def test_a_study_declares_a_shared_field_only_to_bound_it_otherwise(study):
    """A field the study's table does not declare gets the vocabulary's check itself."""
    module = experiment(study)
    checks = field_checks(module.PRESETS["tiny"](), module.FIELD_CHECKS)
    for field, check in checks.items():
        if field not in module.FIELD_CHECKS:
            assert check is VOCABULARY_CHECKS[field]


def test_the_accidental_differences_are_gone():
    """model_preset was free text in dynamics, learning_rate unbounded above in four studies."""
    dynamics = experiment("dynamics").PRESETS["tiny"]()
    with pytest.raises(ConfigError, match="^model_preset: expected one of"):
        dataclasses.replace(dynamics, model_preset="nope").validate()
    for study in ("dynamics", "hidden-gaussian", "pfd", "multistage", "reproducibility"):
        config = experiment(study).PRESETS["tiny"]()
        with pytest.raises(ConfigError, match=r"^learning_rate: expected a finite number in \(0, 1\]"):
            dataclasses.replace(config, learning_rate=1e3).validate()


def test_a_field_in_neither_table_is_a_type_error():
    @dataclasses.dataclass(frozen=True)
    class Config:
        learning_rate: float = 1e-3
        undeclared: int = 0

    with pytest.raises(TypeError, match="no range declared for undeclared"):
        check_fields(Config(), {})
    check_fields(Config(), {"undeclared": lambda name, value: None})


RECIPE_PRESETS = [
    ("reproducibility", "quick", "DIGITS_QUICK_TRAINING"),
    ("reproducibility", "seeds", "DIGITS_QUICK_TRAINING"),
    ("reproducibility", "disjoint", "DIGITS_QUICK_TRAINING"),
    ("hidden-gaussian", "quick", "DIGITS_QUICK_TRAINING"),
    ("hidden-gaussian", "empirical-target", "DIGITS_QUICK_TRAINING"),
    ("dynamics", "quick", "DIGITS_QUICK_TRAINING"),
    ("reproducibility", "paper", "EDM_CIFAR10_TRAINING"),
    ("hidden-gaussian", "paper", "EDM_CIFAR10_TRAINING"),
    ("cfg", "paper", "EDM_CIFAR10_TRAINING"),
]


@pytest.mark.parametrize(("study", "preset", "recipe"), RECIPE_PRESETS)
def test_a_preset_built_from_a_recipe_keeps_every_value_of_it(study, preset, recipe):
    shared = getattr(recipes, recipe)
    assert set(shared) <= set(VOCABULARY_CHECKS)  # a recipe speaks the shared vocabulary
    config = experiment(study).PRESETS[preset]()
    assert {field: getattr(config, field) for field in shared} == dict(shared)
