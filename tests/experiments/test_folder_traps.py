"""Invalid values are refused before the output folder is bound: checks against the loaded data and
the referenced folders run first, so a corrected rerun into the same folder is accepted
(issue 32: folder traps)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffcore.experiments import cfg, hidden_gaussian, loco_edit, multistage, representation
from diffcore.experiments.base import ConfigError


def assert_unbound(out):
    """Nothing that binds the folder was written: a corrected rerun is accepted."""
    assert not (out / "config.json").exists() and not (out / "diffcore-run.json").exists()


def assert_refused_before_binding(tmp_path, module, overrides, error, match):
    """``module``'s tiny preset with ``overrides`` raises ``error`` matching ``match``, and its
    output folder is left unbound."""
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        module.run_preset("tiny", out, overrides, progress=False)
    assert_unbound(out)


def truncated_png(path):
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8), mode="L").save(path)
    path.write_bytes(path.read_bytes()[:40])
    return path


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["image_indices=1797"], "image_indices"),
        (["rank=70"], "rank"),
        (["k_out=70", "mask=center"], "k_out"),
        (["spectrum_k=65"], "spectrum_k"),
        (["dataset=cifar10"], "data_root"),
        (["models_from=/no/such/run"], "models_from"),
    ],
)
def test_loco_edit_checks_against_the_data_before_binding(tmp_path, overrides, field):
    assert_refused_before_binding(tmp_path, loco_edit, overrides, (ConfigError, ValueError), field)


def test_loco_edit_truncated_image_file_is_named_before_binding(tmp_path):
    bad = truncated_png(tmp_path / "cut.png")
    overrides = ["image_source=files", f"image_files={bad}"]
    assert_refused_before_binding(
        tmp_path, loco_edit, overrides, ConfigError, f"image_files: '{bad}' is not a readable image"
    )


def test_representation_unknown_layer_is_refused_before_binding(tmp_path):
    match = "layer: these models have no layer 'bogus'; they have: .*decoder_last"
    assert_refused_before_binding(tmp_path, representation, ["layer=bogus"], ConfigError, match)


def test_representation_widths_absent_from_models_from_are_refused_before_binding(tmp_path):
    repro = tmp_path / "repro"
    (repro / "units" / "models" / "w4-n8-s0").mkdir(parents=True)
    (repro / "units" / "models" / "w4-n8-s0" / "MANIFEST.json").write_text('{"spec": {}, "files": {}}')
    (repro / "results.json").write_text(
        json.dumps(
            {
                "experiment": "reproducibility",
                "models": [{"width": 4, "n": 8, "seed": 0, "gl": 0.5, "memorized_ratio": 0.1}],
            }
        )
    )
    overrides = [f"models_from={repro}", "widths=999"]
    assert_refused_before_binding(tmp_path, representation, overrides, ConfigError, "widths, sizes: no model")


def test_multistage_cifar10_without_data_root_is_refused_before_binding(tmp_path):
    assert_refused_before_binding(tmp_path, multistage, ["dataset=cifar10"], ValueError, "data_root|root")


def test_cfg_seed_range_beyond_the_largest_seed_is_refused_before_binding(tmp_path):
    overrides = ["sample_seed_start=4294967295"]
    assert_refused_before_binding(tmp_path, cfg, overrides, ConfigError, "sample_seed_start: seeds 4294967295")


def test_hidden_gaussian_mistyped_models_from_creates_nothing(tmp_path):
    out, typo = tmp_path / "out", tmp_path / "no" / "such" / "run"
    with pytest.raises(ConfigError, match="models_from: .* is not a folder"):
        hidden_gaussian.run_preset("tiny", out, [f"models_from={typo}"], progress=False)
    assert not (tmp_path / "no").exists()
    assert_unbound(out)


def test_hidden_gaussian_read_only_models_from_is_read_not_refused_as_unwritable(tmp_path, monkeypatch):
    models_from = tmp_path / "repro"
    models_from.mkdir()
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: access(path, mode) and not (str(path) == str(models_from) and mode & os.W_OK)
    )  # read-only (also when the tests run as root)
    with pytest.raises(ValueError, match="models_from: no finished model"):
        hidden_gaussian.run_preset("tiny", tmp_path / "out", [f"models_from={models_from}"], progress=False)


@pytest.mark.parametrize(
    "module, override, field",
    [
        (loco_edit, "inversion_steps=1000000000000", "inversion_steps"),
    ],
)
def test_huge_step_counts_are_refused_by_the_config(module, override, field, tmp_path):
    assert_refused_before_binding(tmp_path, module, [override], ConfigError, f"{field}: expected an integer in")


@pytest.mark.parametrize(
    "override, field",
    [("wrong_keys=1000000000000", "wrong_keys"), ("rank_references=1000000000000", "rank_references")],
)
def test_watermark_key_counts_are_bounded(override, field):
    from diffcore.experiments import watermark
    from diffcore.experiments.base import config_from_preset

    with pytest.raises(ConfigError, match=f"{field}: expected an integer in"):
        config_from_preset(watermark.PRESETS, "tiny", [override])


def test_reference_keys_are_bounded_in_the_library():
    from diffcore.analysis import watermark

    key = watermark.ring_key((1, 8, 8), radius=2, channel=0, band="high", seed=0)
    with pytest.raises(ValueError, match="count: expected at most"):
        watermark.reference_keys(key, 10**12)
