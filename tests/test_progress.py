"""diffcore._progress: a bar on a terminal, log lines (never bar redraws) everywhere else."""

from __future__ import annotations

import logging

from diffcore import _env
from diffcore._progress import Progress, format_seconds


def test_log_lines_when_not_a_terminal(caplog, capsys, monkeypatch):
    monkeypatch.delenv(_env.PROGRESS_VAR, raising=False)
    assert not _env.progress_enabled(True)  # pytest captures stderr: not a terminal
    with caplog.at_level(logging.INFO, logger="diffcore.progress"):
        with Progress(100, "training", "steps", interval=0.0) as progress:
            progress.update(40)
            progress.note("finished models/w8-n16-s0")
            progress.set(100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("training: 40/100 steps (40%)") and "ETA" in lines[0]
    assert "training: finished models/w8-n16-s0" in lines
    assert lines[-1].startswith("training: 100/100 steps (100%)")
    assert capsys.readouterr().err == ""  # no bar


def test_progress_off(caplog, capsys, monkeypatch):
    monkeypatch.setenv(_env.PROGRESS_VAR, "0")
    with caplog.at_level(logging.INFO, logger="diffcore.progress"):
        with Progress(10, "x", "steps", interval=0.0) as progress:
            progress.update(5)
            progress.note("event")
    assert not caplog.records and capsys.readouterr().err == ""
    monkeypatch.setenv(_env.PROGRESS_VAR, "1")  # forces bars even off a terminal
    assert _env.progress_enabled(True) and not _env.progress_enabled(False)


def test_format_seconds():
    assert format_seconds(75.2) == "1:15" and format_seconds(3725) == "1:02:05" and format_seconds(-3) == "0:00"
