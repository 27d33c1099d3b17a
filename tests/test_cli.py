"""The diffcore command: info, run (with stand-in hooks), demo, errors, train hook."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from diffcore import cli
from diffcore.experiments import hooks as study_hooks

_spec = importlib.util.spec_from_file_location(
    "experiments_standins", Path(__file__).parent / "experiments" / "conftest.py"
)
stack_standins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stack_standins)


@pytest.fixture
def stand_in_hooks(monkeypatch):
    stack = stack_standins.StandInStack()
    monkeypatch.setattr(study_hooks, "default_hooks", stack.hooks)
    return stack


def test_info_lists_backends_and_variables(capsys):
    import diffcore

    with capsys.disabled():  # an editable install may rebuild _C on first import, writing to stdout
        diffcore.build_info()
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends on cpu" in text and "reference" in text and "DIFFCORE_PROGRESS" in text
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"]["cpu"]["reference"] == "usable"
    assert "DIFFCORE_BACKEND" in data["environment"]
    assert set(data["experiments"]["reproducibility"]) == {"quick", "paper", "tiny", "seeds", "disjoint"}


def test_show_config_applies_overrides(capsys):
    assert cli.main(["run", "reproducibility", "--preset", "tiny", "--set", "widths=2,3", "--show-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["widths"] == [2, 3] and config["train_steps"] == 20


def test_bad_override_is_a_clean_error(capsys):
    assert cli.main(["run", "reproducibility", "--preset", "tiny", "--set", "nope=1", "--out", "x"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["run", "reproducibility", "--preset", "huge", "--out", "x"]) == 2
    assert "preset" in capsys.readouterr().err


def test_run_reproducibility_tiny(tmp_path, capsys, stand_in_hooks):
    argv = [
        "run",
        "reproducibility",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path),
        "--no-progress",
        "-q",
        "--set",
        "sizes=8",
        "--set",
        "widths=4",
        "--set",
        "num_samples=6",
        "--set",
        "sampler_steps=4",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "figure1.png" in out and (tmp_path / "figure1.png").is_file()
    assert len(json.loads((tmp_path / "results.json").read_text())["models"]) == 2
    calls = dict(stand_in_hooks.calls)
    assert cli.main(argv) == 0  # resumes: nothing to redo
    assert stand_in_hooks.calls == calls


def test_demo_writes_figure_and_results(tmp_path, capsys, stand_in_hooks):
    assert (
        cli.main(
            [
                "demo",
                "--out",
                str(tmp_path),
                "--no-progress",
                "-q",
                "--set",
                "num_samples=5",
                "--set",
                "sampler_steps=8",
            ]
        )
        == 0
    )
    assert "memorized" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert len(results["samples"]) == 5
    # the empirical denoiser of all the digits returns training images: every sample is memorized
    assert results["memorized_fraction"] == 1.0 and results["gl"] == 0.0
    assert all(s["nn_distance"] < 1e-2 for s in results["samples"])


def test_train_is_delegated(monkeypatch):
    from diffcore import train

    seen = {}
    monkeypatch.setattr(train, "main_train", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli.main(["train", "--steps", "5", "--help"]) == 0
    assert seen["argv"] == ["--steps", "5", "--help"]


@pytest.mark.parametrize(
    "out, message",
    [
        ("", "out: expected a folder path, got an empty string"),
        ("{file}", "is a file; expected a folder"),
        ("{file}/sub", "is under the file"),
    ],
)
def test_bad_out_is_one_line_naming_it(tmp_path, capsys, out, message):
    file = tmp_path / "file"
    file.write_text("x")
    assert cli.main(["demo", "--preset", "tiny", "--out", out.format(file=file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_train_config_file_errors_name_the_file(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text('{"steps": ')
    assert cli.main(["train", "--config", str(config)]) == 2
    assert f"--config '{config}' is not valid JSON" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert f"--config '{tmp_path / 'missing.json'}' does not exist" in capsys.readouterr().err


def test_train_refuses_a_study_folder_before_training(tmp_path, capsys):
    from diffcore.experiments.base import Workspace

    ws = Workspace(tmp_path / "study")
    with ws.claim("demo"):
        ws.bind_config({"num_samples": 4})
    assert cli.main(["train", "--out-dir", str(tmp_path / "study"), "--steps", "1", "--no-progress"]) == 2
    assert "holds a 'demo' run, not 'train'" in capsys.readouterr().err
    assert cli.main(["train", "--out-dir", str(tmp_path / "t"), "--steps", "0"]) == 2  # validated first
    assert "steps must be positive" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_shard_is_checked_and_only_for_the_study_that_spreads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFCORE_SHARD", "")  # restored after: the CLI sets it in this process
    assert cli.main(["run", "reproducibility", "--preset", "tiny", "--shard", "2/2", "--out", str(tmp_path)]) == 2
    assert "--shard: expected I/N with 0 <= I < N, got '2/2'" in capsys.readouterr().err
    assert cli.main(["run", "molrg", "--preset", "tiny", "--shard", "0/2", "--out", str(tmp_path / "m")]) == 2
    assert "molrg runs in one process" in capsys.readouterr().err and not (tmp_path / "m").exists()
