"""Output folders: claimed by one run at a time, of one kind, cleaned of a killed run's temporaries;
workers die with their parent; configs validated (every field has a range) before anything is bound;
results are strict JSON (issue 18, items 3-7 and 9)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from diffcore import _folder
from diffcore.experiments import EXPERIMENTS, base, demo, experiment, reproducibility
from diffcore.experiments.base import VOCABULARY_CHECKS, ConfigError, Workspace, config_from_preset, json_dumps


def _python(code: str, *args: str) -> subprocess.Popen:
    """A Python subprocess running ``code`` (stdout piped, one line per event)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFCORE_PROGRESS": "0"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


HOLD_FOLDER = """
    import os, sys, time
    from diffcore import _folder
    with _folder.claim_folder(sys.argv[1], "demo"):
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
        open(os.path.join(sys.argv[1], "releasing"), "w").close()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie has exited


# ----------------------------------------------------------------------------- kinds (item 3)


def test_demo_refuses_a_folder_of_another_study(tmp_path):
    ws = Workspace(tmp_path / "out")
    with ws.claim("reproducibility"):
        ws.bind_config({"widths": [4]})
    results = tmp_path / "out" / "results.json"
    results.write_text('{"experiment": "reproducibility"}')
    with pytest.raises(_folder.FolderError, match="holds a 'reproducibility' run, not 'demo'"):
        demo.run(config_from_preset(demo.PRESETS, "tiny"), tmp_path / "out", progress=False)
    assert results.read_text() == '{"experiment": "reproducibility"}'  # untouched


def test_a_folder_with_foreign_files_is_refused_and_a_demo_folder_is_reused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    config = config_from_preset(demo.PRESETS, "tiny")
    with pytest.raises(_folder.FolderError, match="not empty and holds no diffcore run"):
        demo.run(config, tmp_path / "mine", progress=False)
    first = demo.run(config, tmp_path / "demo", progress=False)
    assert _folder.folder_kind(tmp_path / "demo") == "demo"
    assert demo.run(config, tmp_path / "demo", progress=False) == first  # same kind, same config
    with pytest.raises(base.UnitError, match="another config"):
        demo.run(dataclasses.replace(config, num_samples=3), tmp_path / "demo", progress=False)


# ----------------------------------------------------------------------------- validation (items 4, 9)

BAD_SETTINGS = [
    "sizes=",
    "train_steps=0",
    "batch_size=-1",
    "sampler_steps=0",
    "threshold=nan",
    "threshold=-5",
    "memorization_ratio=-1",
    "grid_samples=-1",
    "calibration_quantile=2",
    "sigma_min=inf",
    "learning_rate=0",
    "train_seeds=4294967296",
    "widths=4,4",
]


@pytest.mark.parametrize("setting", BAD_SETTINGS)
def test_a_bad_setting_is_refused_naming_the_field_before_the_folder_is_bound(setting, tmp_path):
    from diffcore import cli

    field = setting.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{field}"):
        config_from_preset(reproducibility.PRESETS, "tiny", [setting])
    out = tmp_path / "out"
    assert cli.main(["run", "reproducibility", "--preset", "tiny", "--out", str(out), "--set", setting]) == 2
    assert not out.exists()


def test_library_runs_validate_before_binding(tmp_path, stand_in_stack):
    bad = dataclasses.replace(reproducibility.PRESETS["tiny"](), threshold=float("nan"))
    with pytest.raises(ConfigError, match="threshold: expected a finite number"):
        reproducibility.run(bad, tmp_path / "out", hooks=stand_in_stack().hooks(), progress=False)
    too_many = dataclasses.replace(reproducibility.PRESETS["tiny"](), sizes=(8, 5000))
    with pytest.raises(ConfigError, match="sizes: N = 5000 exceeds"):  # known once the data is loaded
        reproducibility.run(too_many, tmp_path / "out", hooks=stand_in_stack().hooks(), progress=False)
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_field_of_every_study_has_a_range_and_every_preset_is_valid(name):
    module = experiment(name)
    fields = {f.name for f in dataclasses.fields(module.CONFIG_CLASS)}
    assert set(module.FIELD_CHECKS) <= fields  # the study's own checks, of its own fields
    assert fields <= set(module.FIELD_CHECKS) | set(VOCABULARY_CHECKS)  # the rest: the shared vocabulary's
    for preset in module.PRESETS.values():
        preset().validate()
    for field in fields:  # a value of the wrong type is refused naming the field
        config = dataclasses.replace(module.PRESETS["tiny"](), **{field: object()})
        with pytest.raises(ConfigError, match=f"^{field}"):
            config.validate()


def test_results_json_is_strict():
    assert json.loads(json_dumps({"a": None, "b": [1.5]})) == {"a": None, "b": [1.5]}
    with pytest.raises(ValueError, match=r"models\[1\]\.gl is not finite"):
        json_dumps({"models": [{"gl": 0.5}, {"gl": math.nan}]})


# ----------------------------------------------------------------------------- paths (clear messages)


def test_bad_out_paths_are_one_line_errors(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(_folder.FolderError, match="out: expected a folder path, got an empty string"):
        Workspace("")
    with pytest.raises(_folder.FolderError, match="is a file"):
        Workspace(file)
    with pytest.raises(_folder.FolderError, match="is under the file"):
        Workspace(file / "sub")


def test_a_truncated_config_json_is_named(tmp_path):
    ws = Workspace(tmp_path)
    with ws.claim("demo"):
        ws.bind_config({"a": 1})
    (tmp_path / "config.json").write_text('{"a": ')
    with ws.claim("demo"), pytest.raises(base.UnitError, match="config .*config.json' is not valid JSON"):
        ws.bind_config({"a": 1})


# ----------------------------------------------------------------------------- lock (item 5)


def test_a_second_run_names_the_holder_and_exits_or_waits(tmp_path, monkeypatch):
    holder = _python(HOLD_FOLDER, str(tmp_path / "out"), "3")
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(_folder.FolderError, match=f"in use by process {holder.pid} on "):
            demo.run(config_from_preset(demo.PRESETS, "tiny"), tmp_path / "out", progress=False)
        monkeypatch.setenv(_folder.LOCK_WAIT_VAR, "60")
        start = time.monotonic()
        with _folder.claim_folder(tmp_path / "out", "demo"):
            assert (tmp_path / "out" / "releasing").exists()  # got the folder only once the holder let go
        assert time.monotonic() - start < 30
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_concurrent_runs_one_finishes_the_other_is_refused(tmp_path):
    run_demo = """
        import sys
        from diffcore import cli
        sys.exit(cli.main(["demo", "--preset", "tiny", "--out", sys.argv[1], "--no-progress", "-q"]))
    """
    runs = [_python(run_demo, str(tmp_path / "out")) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=120), p.stderr.read()) for p in runs)
    for p in runs:
        p.stdout.close()
        p.stderr.close()
    if outcomes[1][0] == 0:  # the first finished before the second started: both succeed
        assert outcomes[0][0] == 0
    else:
        assert outcomes[0][0] == 0 and outcomes[1][0] == 2
        assert "is in use by process" in outcomes[1][1]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["experiment"] == "demo"


# ----------------------------------------------------------------------------- temporaries (item 6)


def test_stale_temporaries_are_removed_on_the_next_run(tmp_path):
    unit_tmp = tmp_path / "units" / "models" / ".w4-n8-s0.k2j4h6g8.tmp"
    unit_tmp.mkdir(parents=True)
    (unit_tmp / "model.json").write_text("{half")
    file_tmp = tmp_path / ".results.json.ab_cd123.tmp"
    file_tmp.write_text("{half")
    kept = tmp_path / "units" / "notes.tmp"
    kept.write_text("not ours")
    _folder.record_kind(tmp_path, "demo")
    with _folder.claim_folder(tmp_path, "demo"):
        pass
    assert not unit_tmp.exists() and not file_tmp.exists() and kept.exists()


# ----------------------------------------------------------------------------- workers (item 7)

SPAWN_WORKERS = """
    import os, sys, time
    from pathlib import Path
    from diffcore import _folder

    def work(folder):
        Path(folder, f"worker-{os.getpid()}").write_text("started")
        time.sleep(120)

    if __name__ == "__main__":
        root = sys.argv[1]
        with _folder.claim_folder(root, "reproducibility"):
            pool = _folder.worker_pool(2, root)
            futures = [pool.submit(work, root) for _ in range(2)]
            while len(list(Path(root).glob("worker-*"))) < 2:
                time.sleep(0.05)
            print("workers started", flush=True)
            time.sleep(120)
"""


@pytest.mark.slow
def test_workers_die_with_a_killed_parent_and_the_next_run_waits_for_them(tmp_path):
    script = tmp_path / "spawn_workers.py"  # a file: spawned workers re-import the main module
    script.write_text(textwrap.dedent(SPAWN_WORKERS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, text=True
    )
    workers = []
    try:
        assert parent.stdout.readline().strip() == "workers started"
        workers = [int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("worker-*")]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
        with _folder.claim_folder(tmp_path / "out", "reproducibility"):
            pass
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        for pid in workers:  # only if the test failed: never leave them running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_run_never_starts_beside_a_surviving_worker(tmp_path, monkeypatch):
    survivor = _python(
        """
        import fcntl, os, sys, time
        fd = os.open(os.path.join(sys.argv[1], ".lock.workers"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_SH)
        print("holding", flush=True)
        time.sleep(60)
    """,
        str(tmp_path),
    )
    try:
        assert survivor.stdout.readline().strip() == "holding"
        monkeypatch.setattr(_folder, "WORKERS_GRACE_SECONDS", 0.5)
        with pytest.raises(_folder.FolderError, match="worker processes of an earlier run still write"):
            with _folder.claim_folder(tmp_path, "demo"):
                pass
    finally:
        survivor.kill()
        survivor.wait()
    with _folder.claim_folder(tmp_path, "demo"):  # and the lock was released on the refusal
        pass


def test_a_training_request_is_validated_before_training(tmp_path, monkeypatch):
    from diffcore import train
    from diffcore.experiments import _stack

    monkeypatch.setattr(train, "train_from_config", lambda *a, **k: pytest.fail("trained"))
    spec = {
        "dataset": "digits",
        "n": 8,
        "subset_seed": 0,
        "model_preset": "ddpmpp-digits",
        "width": 4,
        "seed": 0,
        "train_steps": 0,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "lr_warmup_images": 0,
    }
    with pytest.raises(ValueError, match="steps must be positive"):
        _stack.train_model(torch.zeros(8, 1, 8, 8), spec, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="images: expected the 8 training images, got 3"):
        _stack.train_model(torch.zeros(3, 1, 8, 8), {**spec, "train_steps": 5}, tmp_path, tmp_path)


def test_an_unwritable_out_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (root may write anywhere)
    with pytest.raises(_folder.FolderError, match="out: the folder .* is not writable"):
        Workspace(tmp_path / "ro")
