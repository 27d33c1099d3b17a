"""The study contract as code: studies sit on shared floors and never import one another."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffcore.experiments import EXPERIMENTS

_PACKAGE = Path(importlib.util.find_spec("diffcore").origin).parent


def _imported_modules(path: Path) -> set[str]:
    """Every ``diffcore...`` module a file imports (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("diffcore")}


def _file_of(module: str) -> Path:
    return _PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_no_study_imports_another_study(name):
    own = EXPERIMENTS[name]
    others = set(EXPERIMENTS.values()) - {own}
    crossing = _imported_modules(_file_of(own)) & others
    assert not crossing, f"{own} imports the studies {sorted(crossing)}; move what they share down a floor"


@pytest.mark.parametrize("shared", ["_stack", "hooks", "base", "_vector", "plotting"])
def test_shared_modules_import_no_study(shared):
    studies = set(EXPERIMENTS.values())
    crossing = _imported_modules(_PACKAGE / "experiments" / f"{shared}.py") & studies
    assert not crossing, f"experiments/{shared}.py imports the studies {sorted(crossing)}"


# ----------------------------------------------------------------------------- one vocabulary


def test_old_field_names_work_in_set_with_a_deprecation_message(caplog):
    from diffcore.experiments import base, pfd, watermark

    config = base.config_from_preset(pfd.PRESETS, "tiny", ["steps=7", "lr=0.01"])
    assert (config.train_steps, config.learning_rate) == (7, 0.01)
    assert "'steps' is the old name of 'train_steps'" in caplog.text
    # a current field always means the current field: watermark's batch_size is its training batch
    config = base.config_from_preset(watermark.PRESETS, "tiny", ["batch_size=5", "train_batch_size=6"])
    assert (config.batch_size, config.sample_batch) == (6, 64)
    with pytest.raises(base.ConfigError, match="unknown key"):
        base.config_from_preset(pfd.PRESETS, "tiny", ["gl_threshold=0.5"])  # another study's old name


def test_a_stored_config_with_old_names_reads_as_the_new_ones():
    from diffcore.experiments import base

    fields = ["batch_size", "sample_batch", "sample_seed_start", "sampler_steps", "key_seed"]
    old = {"train_batch_size": 8, "batch_size": 4, "seed_start": 10, "steps": 3, "key_seed": 1}
    assert base.upgrade_stored_config("watermark", old, fields) == {
        "batch_size": 8,
        "sample_batch": 4,
        "sample_seed_start": 10,
        "sampler_steps": 3,
        "key_seed": 1,
    }
    new = {"batch_size": 8, "sample_batch": 4, "sample_seed_start": 10, "sampler_steps": 3, "key_seed": 1}
    assert base.upgrade_stored_config("watermark", new, fields) == new


def test_an_old_run_folder_resumes(tmp_path, caplog):
    """A folder whose config.json was written with the old names (pfd's steps, lr) resumes: every
    unit is reused and the results are the same."""
    import dataclasses

    from diffcore.experiments import pfd
    from diffcore.ref.empirical_denoise import empirical_denoise_ref

    def reference_empirical(train):
        def denoise(x, sigma):
            s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
            return empirical_denoise_ref(x.double(), train.double(), s)[0].to(x.dtype)

        return denoise

    config = dataclasses.replace(pfd.PRESETS["tiny"](), sizes=(2, 16), train_steps=60, curve_points=2)
    hooks = pfd.PFDHooks(reference_empirical)
    first = pfd.run(config, tmp_path, hooks=hooks, progress=False)
    stored = json.loads((tmp_path / "config.json").read_text())
    stored["steps"], stored["lr"] = stored.pop("train_steps"), stored.pop("learning_rate")
    (tmp_path / "config.json").write_text(json.dumps(stored))
    again = pfd.run(config, tmp_path, hooks=hooks, progress=False)
    assert again == first
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert all(kind["reused"] == kind["units"] for kind in timings["units"].values())
    assert "old field names" in caplog.text


# ----------------------------------------------------------------------------- one run body


@pytest.mark.parametrize("name", ["pfd", "molrg"])
def test_a_cpu_only_study_refuses_another_device(tmp_path, name):
    from diffcore.experiments import base, experiment

    module = experiment(name)
    with pytest.raises(base.ConfigError, match="runs only on the CPU"):
        module.run(module.PRESETS["tiny"](), tmp_path / "out", device="cuda", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_study_declares_its_contract(name):
    from diffcore.experiments import base, experiment

    module = experiment(name)
    assert EXPERIMENTS[name] == module.__name__
    assert isinstance(module.STUDY, base.Study) and module.STUDY.name == name == module.NAME
    assert set(module.PRESETS) >= {"tiny", "quick"}  # tiny: seconds, for tests
    assert module.STUDY.config_class is module.CONFIG_CLASS
    assert set(module.PRESETS) and all(isinstance(make(), module.CONFIG_CLASS) for make in module.PRESETS.values())


# ----------------------------------------------------------------------------- shared field checks


@pytest.mark.parametrize(
    "check, good, bad",
    [
        ("fraction", [1e-9, 0.5, 1.0], [0.0, 1.5, float("nan"), True]),
        ("boolean", [True, False], [0, 1, "true", None]),
        ("solver", ["heun", "ddim"], ["rk4", ""]),
        ("model_preset", ["ddpmpp-digits", "ddpmpp-cifar"], ["ddpmpp-huge", 3]),
    ],
)
def test_shared_field_checks(check, good, bad):
    from diffcore.experiments import base

    for value in good:
        getattr(base, check)("field", value)
    for value in bad:
        with pytest.raises(base.ConfigError, match="^field: expected"):
            getattr(base, check)("field", value)


def test_below_is_open_at_both_ends():
    from diffcore.experiments import base

    base.below(0.5)("radius", 0.25)
    for value in (0.0, 0.5, float("inf"), False):
        with pytest.raises(base.ConfigError, match=r"radius: expected a finite number in \(0, 0.5\)"):
            base.below(0.5)("radius", value)
