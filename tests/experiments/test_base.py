"""The experiment framework: overrides, atomic writes, resumable units."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from diffcore.experiments.base import (
    ConfigError,
    UnitError,
    Workspace,
    apply_overrides,
    atomic_write_csv,
    atomic_write_json,
    config_from_preset,
)


@dataclass(frozen=True)
class Cfg:
    steps: int = 3
    lr: float = 0.1
    name: str = "a"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    threshold: float | None = None


def test_overrides_parse_field_types():
    cfg = apply_overrides(Cfg(), ["steps=7", "lr=1e-3", "name=b", "flag=true", "sizes=4,8,16", "threshold=0.5"])
    assert cfg == Cfg(7, 1e-3, "b", True, (4, 8, 16), 0.5)
    assert apply_overrides(cfg, ["threshold=none"]).threshold is None


@pytest.mark.parametrize(
    "bad, match", [("steps", "key=value"), ("nope=1", "unknown key"), ("steps=x", "steps"), ("flag=maybe", "flag")]
)
def test_bad_overrides_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Cfg(), [bad])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        config_from_preset({"a": Cfg}, "b")


def test_atomic_writes_leave_no_temporaries(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": (1, 2)})
    atomic_write_csv(tmp_path / "r.csv", [{"x": 1, "y": 2}, {"x": 3, "z": 4}])
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "r.csv").read_text() == "x,y,z\n1,2,\n3,,4\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]


def _produce(calls):
    def produce(tmp, work):
        calls.append(1)
        (tmp / "value.txt").write_text("42")
        return {"value": 42}

    return produce


def test_unit_is_made_once_and_reused(tmp_path):
    ws, calls = Workspace(tmp_path), []
    first = ws.run_unit("k", "u", {"p": 1}, _produce(calls))
    second = ws.run_unit("k", "u", {"p": 1}, _produce(calls))
    assert len(calls) == 1 and not first.reused and second.reused
    assert second.meta == {"value": 42} and second.file("value.txt").read_text() == "42"


def test_killed_producer_leaves_no_unit_and_keeps_work(tmp_path):
    ws = Workspace(tmp_path)

    def killed(tmp, work):
        (work / "ckpt").write_text("step 5")
        (tmp / "value.txt").write_text("4")  # half written
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ws.run_unit("k", "u", {"p": 1}, killed)
    assert ws.finished("k", "u", {"p": 1}) is None
    assert not list(ws.unit_path("k", "u").parent.glob(".*tmp"))
    assert (ws.work_path("k", "u") / "ckpt").read_text() == "step 5"
    calls = []
    ws.run_unit("k", "u", {"p": 1}, _produce(calls))
    assert calls and not (tmp_path / "work" / "k" / "u").exists()


def test_folder_without_manifest_is_redone(tmp_path):
    ws, calls = Workspace(tmp_path), []
    path = ws.unit_path("k", "u")
    path.mkdir(parents=True)
    (path / "value.txt").write_text("garbage")
    unit = ws.run_unit("k", "u", {"p": 1}, _produce(calls))
    assert calls and unit.file("value.txt").read_text() == "42"


def test_corrupt_unit_and_changed_spec_raise(tmp_path):
    ws = Workspace(tmp_path)
    unit = ws.run_unit("k", "u", {"p": 1}, _produce([]))
    with pytest.raises(UnitError, match="spec"):
        ws.run_unit("k", "u", {"p": 2}, _produce([]))
    unit.file("value.txt").write_text("43")
    with pytest.raises(UnitError, match="checksum"):
        ws.finished("k", "u", {"p": 1})
    unit.file("value.txt").write_text("4")
    with pytest.raises(UnitError, match="size"):
        ws.finished("k", "u", {"p": 1})


def test_bind_config_refuses_another_config(tmp_path):
    ws = Workspace(tmp_path)
    ws.bind_config(Cfg())
    ws.bind_config(Cfg())
    with pytest.raises(UnitError, match="steps"):
        ws.bind_config(Cfg(steps=4))


def test_a_unit_whose_files_were_replaced_is_made_again(tmp_path):
    """A spec that differs only in content digests (sha256 keys) marks a unit made from files that
    have been replaced: it is made again, not reused and not an error (issue 32)."""
    from diffcore.experiments.base import Workspace, file_digest, folder_digest

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("one")
    ws = Workspace(tmp_path / "out")
    calls = []

    def produce(tmp, work):
        calls.append(1)
        (tmp / "value.txt").write_text((data / "a.txt").read_text())

    def spec():
        return {"path": str(data), "data_sha256": folder_digest(data), "file": {"sha256": file_digest(data / "a.txt")}}

    assert ws.run_unit("k", "u", spec(), produce).file("value.txt").read_text() == "one"
    assert ws.run_unit("k", "u", spec(), produce).reused and len(calls) == 1
    (data / "a.txt").write_text("two")
    unit = ws.run_unit("k", "u", spec(), produce)
    assert not unit.reused and unit.file("value.txt").read_text() == "two" and len(calls) == 2
    with pytest.raises(UnitError, match="was made with spec"):  # other differences stay errors
        ws.run_unit("k", "u", {**spec(), "path": "elsewhere"}, produce)
