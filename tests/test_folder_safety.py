"""Run folders are identified before anything in them is touched, lock files are regular files
opened without following links, nothing is written or deleted through a link, and records are
read only from regular files of bounded size (issue 32: data loss, hangs and runaway reads)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from diffcore import _folder, cli
from diffcore.experiments.base import UnitError, Workspace


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links not followed) with its bytes or link target."""
    found: dict[str, bytes | str] = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            found[rel] = os.readlink(path) if path.is_symlink() else (path.read_bytes() if path.is_file() else "dir")
    return found


def diffusers_folder(root: Path) -> Path:
    """A model folder of another tool, with the names diffcore's own folders use."""
    (root / "checkpoints" / ".tmp-step_000000100-1").mkdir(parents=True)
    (root / "checkpoints" / ".tmp-step_000000100-1" / "model.bin").write_bytes(b"weights in progress")
    (root / "checkpoints" / "step_000000100").mkdir()
    (root / "checkpoints" / "step_000000100" / "MANIFEST.json").write_text('{"format": "other-tool"}')
    (root / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    (root / "metrics.jsonl").write_text('{"loss": 0.1}\n')
    (root / ".config.json.abcd1234.tmp").write_text("the other tool's temporary")
    return root


# ----------------------------------------------------------------------------- identify first


def test_train_refuses_a_foreign_folder_with_diffcore_names_and_changes_nothing(tmp_path, capsys):
    folder = diffusers_folder(tmp_path / "model")
    before = snapshot(folder)
    code = cli.main(["train", "--out-dir", str(folder), "--steps", "1", "--no-progress"])
    assert code == 2
    assert "holds no diffcore run" in capsys.readouterr().err
    after = snapshot(folder)
    after.pop(".lock", None)  # the claim's own lock file, taken before the folder is read
    assert after == before


def test_an_earlier_diffcore_training_run_is_still_adopted(tmp_path):
    from diffcore.train.checkpoint import FORMAT

    step = tmp_path / "checkpoints" / "step_000000004"
    step.mkdir(parents=True)
    (step / "MANIFEST.json").write_text(f'{{"format": "{FORMAT}", "step": 4, "files": {{}}}}')
    (tmp_path / "config.json").write_text("{}")
    from diffcore.train.cli import _claim_run_folder

    with _claim_run_folder(str(tmp_path)):
        pass
    assert _folder.folder_kind(tmp_path) == "train"


def test_a_study_refuses_a_foreign_folder_before_deleting_its_temporaries(tmp_path):
    folder = diffusers_folder(tmp_path / "model")
    before = snapshot(folder)
    with pytest.raises(_folder.FolderError, match="holds no diffcore run"):
        with Workspace(folder).claim("demo"):
            pass
    after = snapshot(folder)
    after.pop(".lock", None)
    assert after == before


def test_an_earlier_study_run_with_a_finished_unit_is_still_adopted(tmp_path):
    unit = tmp_path / "units" / "models" / "m0"
    unit.mkdir(parents=True)
    (unit / "MANIFEST.json").write_text('{"spec": {"n": 1}, "files": {}, "meta": {}}')
    (tmp_path / "config.json").write_text("{}")
    stale = tmp_path / "units" / "models" / ".m1.abcd1234.tmp"
    stale.mkdir()
    with Workspace(tmp_path).claim("demo"):
        pass
    assert not stale.exists()  # identified as ours, then cleaned


# ----------------------------------------------------------------------------- lock files


def _user_file_and_run(tmp_path):
    """A user's file (``precious.txt``) that a planted link points at, and an empty run folder."""
    victim = tmp_path / "precious.txt"
    victim.write_text("user data")
    run = tmp_path / "run"
    run.mkdir()
    return victim, run


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    victim, run = _user_file_and_run(tmp_path)
    (run / ".lock").symlink_to(victim)
    with pytest.raises(_folder.FolderError, match=r"lock file .*\.lock' is a symbolic link"):
        with _folder.claim_folder(run, "demo"):
            pass
    assert victim.read_text() == "user data"


def test_a_workers_lock_and_a_unit_claim_that_are_links_are_refused(tmp_path):
    victim, run = _user_file_and_run(tmp_path)
    (run / ".lock.workers").symlink_to(victim)
    with pytest.raises(_folder.FolderError, match="is a symbolic link"):
        with _folder.claim_folder(run, "demo"):
            pass
    claim = tmp_path / "units" / ".u.claim"
    claim.parent.mkdir()
    claim.symlink_to(victim)
    with pytest.raises(_folder.FolderError, match="is a symbolic link"):
        with _folder.unit_claim(claim):
            pass
    assert victim.read_text() == "user data"


def test_a_lock_file_that_is_a_fifo_is_refused_without_hanging(tmp_path, deadline):
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(_folder.FolderError, match="not a regular file"):
        with _folder.claim_folder(tmp_path, "demo"):
            pass


# ----------------------------------------------------------------------------- links out of the folder


def outside_with_victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "u0").mkdir(parents=True)
    (outside / "u0" / "thesis.tex").write_text("years of work")
    (outside / ".notes.abcd1234.tmp").write_text("a user's file with a temporary's name")
    return outside


@pytest.mark.parametrize("linked", ["units/models", "work/models", "work"])
def test_a_linked_units_or_work_folder_is_refused_and_files_outside_survive(tmp_path, linked):
    outside = outside_with_victim(tmp_path)
    before = snapshot(outside)
    run = tmp_path / "run"
    (run / linked).parent.mkdir(parents=True)
    _folder.record_kind(run, "demo")
    (run / linked).symlink_to(outside if linked != "work" else tmp_path)
    if linked == "work":
        (tmp_path / "models").symlink_to(outside)
    ws = Workspace(run)

    def produce(tmp, work):
        (tmp / "x.txt").write_text("x")

    with ws.claim("demo"), pytest.raises(_folder.FolderError, match="is a symbolic link"):
        ws.bind_config({"a": 1})
        ws.run_unit("models", "u0", {"n": 1}, produce)
    assert snapshot(outside) == before


def test_stale_temporaries_are_not_looked_for_through_links(tmp_path):
    outside = outside_with_victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    _folder.record_kind(run, "demo")
    (run / "data").symlink_to(outside)
    with _folder.claim_folder(run, "demo"):
        pass
    assert (outside / ".notes.abcd1234.tmp").exists()


# ----------------------------------------------------------------------------- bounded regular reads


@pytest.mark.parametrize("record", ["diffcore-run.json", "config.json"])
def test_a_record_that_is_a_fifo_or_dev_zero_is_refused_without_hanging(tmp_path, deadline, record):
    for kind in ("fifo", "device"):
        run = tmp_path / kind
        run.mkdir()
        if record == "config.json":
            _folder.record_kind(run, "demo")
        if kind == "fifo":
            os.mkfifo(run / record)
        else:
            (run / record).symlink_to("/dev/zero")
        ws = Workspace(run)
        with pytest.raises(
            (_folder.FolderError, UnitError), match=f"{record}' (is not a regular file|is a symbolic link)"
        ):
            with ws.claim("demo"):
                ws.bind_config({"a": 1})


def test_a_unit_manifest_pointing_outside_or_at_a_device_is_refused(tmp_path, deadline):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    ws = Workspace(tmp_path / "run")
    unit = ws.unit_path("models", "m0")
    unit.mkdir(parents=True)
    (unit / "zero").symlink_to("/dev/zero")
    os.mkfifo(unit / "fifo")
    cases = {
        "../../../secret.txt": "a path outside the unit",
        "zero": "is a symbolic link",
        "fifo": "not a regular file",
        "/etc/hostname": "a path outside the unit",
    }
    for rel, message in cases.items():
        (unit / "MANIFEST.json").write_text(json.dumps({"spec": {}, "files": {rel: {"size": 7, "sha256": "0"}}}))
        with pytest.raises(UnitError, match=message):
            ws.finished("models", "m0", {})


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    ws = Workspace(tmp_path)
    with ws.claim("demo"):
        ws.bind_config({"a": 1})
    (tmp_path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with contextlib.ExitStack() as stack:
        stack.enter_context(ws.claim("demo"))
        with pytest.raises(UnitError, match="nested too deeply"):
            ws.bind_config({"a": 1})


# ----------------------------------------------------------------------------- binding under a lock


def test_two_shards_with_different_configs_never_both_bind(tmp_path, monkeypatch):
    """Two processes of one sharded run (shared folder lock) bind different configs at the same
    moment: the check and the write are one step under a lock, so exactly one binds."""
    import threading
    import time

    from diffcore.experiments import base

    write = base.atomic_write_json

    def slow_write(path, value):  # widen the window between "no config yet" and the write
        time.sleep(0.5)
        return write(path, value)

    monkeypatch.setattr(base, "atomic_write_json", slow_write)
    outcomes: list[str] = []

    def shard(value):
        ws = Workspace(tmp_path)
        try:
            with ws.claim("demo", shared=True):
                ws.bind_config({"a": value})
            outcomes.append("bound")
        except UnitError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=shard, args=(value,)) for value in (1, 2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert sorted(outcomes)[0] == "bound" and "another config (differs in a)" in sorted(outcomes)[1]


def test_train_never_prunes_or_writes_through_a_linked_checkpoints_folder(tmp_path, capsys):
    outside = outside_with_victim(tmp_path)
    (outside / ".tmp-step_000000001-7").mkdir()  # a name train's pruning removes
    before = snapshot(outside)
    run = tmp_path / "run"
    run.mkdir()
    _folder.record_kind(run, "train")
    (run / "checkpoints").symlink_to(outside)
    assert cli.main(["train", "--out-dir", str(run), "--steps", "1", "--no-progress"]) == 2
    assert "checkpoints' is a symbolic link" in capsys.readouterr().err
    assert snapshot(outside) == before


def test_a_train_config_that_is_a_fifo_or_device_is_one_line(tmp_path, deadline, capsys):
    os.mkfifo(tmp_path / "run.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    for name in ("run.json", "zero.json"):
        assert cli.main(["train", "--config", str(tmp_path / name), "--out-dir", str(tmp_path / "out")]) == 2
        assert f"--config '{tmp_path / name}' is not a regular file" in capsys.readouterr().err
