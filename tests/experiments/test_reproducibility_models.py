"""What the studies that measure the reproducibility study's models (locality, representation) share
(``_stack.ReproducibilityModelsStudy``): the reproducibility preset and ``models_from`` are checked
before anything is written."""

from __future__ import annotations

import pytest

from diffcore.experiments import locality, representation
from tests.helpers import assert_refused_before_writing

STUDIES = [pytest.param(locality, id="locality"), pytest.param(representation, id="representation")]


@pytest.mark.parametrize("study", STUDIES)
def test_unknown_reproducibility_preset_is_refused_before_anything_is_written(study, tmp_path):
    assert_refused_before_writing(study, "reproducibility_preset=huge", tmp_path / "bad")


@pytest.mark.parametrize("study", STUDIES)
def test_models_from_without_results_is_refused(study, tmp_path):
    assert_refused_before_writing(study, f"models_from={tmp_path}", tmp_path / "out")
