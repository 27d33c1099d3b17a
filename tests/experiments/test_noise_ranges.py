"""Noise levels far outside float32's range are refused by every study's config (issue 32):
``sigma_max=1e12`` gave garbage samples with exit 0 in pfd and hidden-gaussian."""

from __future__ import annotations

import dataclasses

import pytest

from diffcore.experiments import EXPERIMENTS, experiment
from diffcore.experiments.base import SIGMA_HIGHEST, SIGMA_LOWEST, ConfigError, config_from_preset

SIGMA_FIELDS = (
    "sigma_min",
    "sigma_max",
    "grid_sigma_min",
    "grid_sigma_max",
    "P_mean",
    "sigma_p_mean",
    "target_sigma_min",
)


def _fields(name: str) -> list[str]:
    module = experiment(name)
    return [f.name for f in dataclasses.fields(module.CONFIG_CLASS) if f.name in SIGMA_FIELDS]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_preset_is_inside_the_ranges(name):
    module = experiment(name)
    for preset in module.PRESETS:
        config_from_preset(module.PRESETS, preset)


@pytest.mark.parametrize("name", [n for n in sorted(EXPERIMENTS) if _fields(n)])
def test_extreme_noise_levels_are_refused_naming_the_field(name):
    module = experiment(name)
    preset = "tiny" if "tiny" in module.PRESETS else next(iter(module.PRESETS))
    for field in _fields(name):
        for value in (1e12, -1e12) if "mean" in field.lower() else (1e12, SIGMA_HIGHEST * 1.01, SIGMA_LOWEST / 2):
            with pytest.raises(ConfigError, match=f"^{field}: .*noise levels are bounded"):
                config_from_preset(module.PRESETS, preset, [f"{field}={value}"])
