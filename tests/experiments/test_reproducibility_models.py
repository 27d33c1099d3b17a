"""What the studies that measure the reproducibility study's models (locality, representation) share
(``_stack.ReproducibilityModelsStudy``): the reproducibility preset and ``models_from`` are checked
before anything is written."""

from __future__ import annotations

import pytest

from diffcore.experiments import locality, representation
from diffcore.experiments.base import ConfigError

STUDIES = [pytest.param(locality, id="locality"), pytest.param(representation, id="representation")]


@pytest.mark.parametrize("study", STUDIES)
def test_unknown_reproducibility_preset_is_refused_before_anything_is_written(study, tmp_path):
    with pytest.raises(ConfigError, match="reproducibility_preset"):
        study.run_preset("tiny", tmp_path / "bad", ["reproducibility_preset=huge"], progress=False)
    assert not (tmp_path / "bad" / "config.json").exists()


@pytest.mark.parametrize("study", STUDIES)
def test_models_from_without_results_is_refused(study, tmp_path):
    with pytest.raises(ConfigError, match="models_from"):
        study.run_preset("tiny", tmp_path / "out", [f"models_from={tmp_path}"], progress=False)
    assert not (tmp_path / "out" / "config.json").exists()
