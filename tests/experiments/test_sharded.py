"""The reproducibility study spread over processes (issue 11, section 1): two gloo ranks, two
``--shard`` processes plus the aggregating run, and a killed shard followed by a rerun all give
exactly the results.json of one process; no unit is made twice."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diffcore.experiments import reproducibility as study
from diffcore.experiments.base import config_from_preset
from tests.helpers import finish_processes, start_study_process

HERE = Path(__file__).resolve().parent
OVERRIDES = ["num_samples=8", "grid_samples=2", "sampler_steps=4", "sizes=8,96"]
NUM_MODELS = 2 * 2 * 2  # widths x sizes x train seeds of the tiny preset with OVERRIDES

RUN = f"""
    import os, sys, time
    sys.path.insert(0, {str(HERE)!r})
    from conftest import StandInStack
    from diffcore.experiments import reproducibility as study
    from diffcore.experiments.base import config_from_preset

    class Logged(StandInStack):
        def train(self, *args, **kwargs):
            with open(os.path.join(sys.argv[2], "train-calls.txt"), "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")
            time.sleep(float(sys.argv[3]))
            return super().train(*args, **kwargs)

    config = config_from_preset(study.PRESETS, "tiny", {OVERRIDES!r})
    study.run(config, sys.argv[1], hooks=Logged().hooks(), progress=False)
"""


def _start(out: Path, log_dir: Path, sleep: float = 0.0, **env) -> subprocess.Popen:
    return start_study_process([sys.executable, "-c", textwrap.dedent(RUN), str(out), str(log_dir), str(sleep)], **env)


def _finish(processes) -> None:
    finish_processes(processes, timeout=240)


def _train_calls(log_dir: Path) -> list[str]:
    path = log_dir / "train-calls.txt"
    return path.read_text().split() if path.exists() else []


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, stand_in_stack):
    out = tmp_path_factory.mktemp("one")
    study.run(config_from_preset(study.PRESETS, "tiny", OVERRIDES), out, hooks=stand_in_stack().hooks(), progress=False)
    return (out / "results.json").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_give_the_results_of_one_process(one_process, tmp_path):
    out, port = tmp_path / "out", str(_free_port())
    ranks = [
        _start(
            out,
            tmp_path,
            0.2,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        for r in range(2)
    ]
    _finish(ranks)
    assert (out / "results.json").read_bytes() == one_process
    calls = _train_calls(tmp_path)
    assert len(calls) == NUM_MODELS and len(set(calls)) == 2  # each model once, both ranks worked


@pytest.mark.slow
def test_two_shards_then_a_plain_run_give_the_results_of_one_process(one_process, tmp_path):
    out = tmp_path / "out"
    _finish([_start(out, tmp_path, 0.05, DIFFCORE_SHARD=f"{i}/2") for i in range(2)])
    assert not (out / "results.json").exists()  # shards leave the results to the finishing run
    assert len(_train_calls(tmp_path)) == NUM_MODELS
    _finish([_start(out, tmp_path)])
    assert (out / "results.json").read_bytes() == one_process
    assert len(_train_calls(tmp_path)) == NUM_MODELS  # the finishing run trained nothing


@pytest.mark.slow
def test_a_killed_shard_is_taken_over_by_the_rerun(one_process, tmp_path):
    out = tmp_path / "out"
    shard = _start(out, tmp_path, 1.0, DIFFCORE_SHARD="0/2")
    deadline = time.monotonic() + 120
    while len(_train_calls(tmp_path)) < 2 and time.monotonic() < deadline:  # inside its 2nd model
        time.sleep(0.1)
    shard.send_signal(signal.SIGKILL)
    shard.communicate(timeout=60)
    _finish([_start(out, tmp_path)])  # a plain run: takes the dead shard's claim, finishes the rest
    assert (out / "results.json").read_bytes() == one_process
