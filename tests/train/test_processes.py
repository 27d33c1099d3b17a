"""Training in subprocesses: SIGKILL mid-run then resume (bitwise), and a 2-process gloo DDP run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import HERE, subprocess_env

from diffcore import _env
from diffcore.train import CheckpointError, load_checkpoint, train_from_config
from diffcore.train.checkpoint import list_checkpoints


def _train_command(config_file):
    return [sys.executable, str(HERE / "train_main.py"), "--config", str(config_file), "--no-progress"]


def _write(config, path):
    path.write_text(config.to_json())
    return path


def _assert_same_weights(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for group in ("model", "ema", "optimizer"):
        for key, value in ca.tensors[group].items():
            assert torch.equal(value, cb.tensors[group][key]), f"{group}.{key} differs"


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_config, tmp_path):
    model = dict(tiny_config.model, sleep_s=0.01)  # ~10 ms a step: slow enough to be killed mid-way
    config = tiny_config.replace(model=model, steps=200, batch_size=4, checkpoint_every=20, log_every=20)
    reference = tmp_path / "reference"
    killed = tmp_path / "killed"
    env = subprocess_env()
    uninterrupted = subprocess.Popen(  # runs alongside the one that gets killed
        _train_command(_write(config.replace(out_dir=str(reference)), tmp_path / "ref.json")),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    command = _train_command(_write(config.replace(out_dir=str(killed)), tmp_path / "killed.json"))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [s for s, _ in list_checkpoints(killed / "checkpoints") if s >= 40]:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    steps_at_kill = [s for s, _ in list_checkpoints(killed / "checkpoints")]
    assert steps_at_kill and 40 <= steps_at_kill[-1] < 200, steps_at_kill

    resumed = subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=120)
    assert f"resumed from {killed / 'checkpoints'}" in resumed.stderr
    _, reference_log = uninterrupted.communicate(timeout=120)
    assert uninterrupted.returncode == 0, reference_log[-3000:]
    _assert_same_weights(reference / "checkpoints" / "step_000000200", killed / "checkpoints" / "step_000000200")
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(20, 201, 20))  # no duplicated or lost log lines across the kill


@pytest.mark.slow
def test_two_process_gloo_run_resumes_and_agrees_across_ranks_and_with_one_process(tiny_config, tmp_path):
    config = tiny_config.replace(steps=12, batch_size=8, checkpoint_every=6, log_every=4, out_dir=str(tmp_path / "ddp"))
    config_file = _write(config, tmp_path / "ddp.json")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_worker.py"),
        str(config_file),
    ]
    for stop in (["7"], []):  # 7 steps, then a second launch resumes to 12 (per-rank RNG restored)
        done = subprocess.run(command + stop, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["resumed_from_step"] for r in reports] == [7, 7]
    assert [r["world_size"] for r in reports] == [2, 2] and reports[0]["backend"] == "gloo"
    assert reports[0]["my_seeds"] == [100, 102, 104, 106] and reports[1]["my_seeds"] == [101, 103, 105]
    for report in reports:
        assert report["step"] == 12
        assert [g["square"] for g in report["gathered"]] == [s * s for s in range(100, 107)]
        assert {g["rank"] for g in report["gathered"]} == {0, 1}
    rank0, rank1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step_000000012").documents["state"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    with pytest.raises(CheckpointError, match="written by 2 ranks, this run has 1"):
        train_from_config(config.replace(steps=14))  # one process cannot continue a 2-rank run

    with _env.torch_threads(1):
        single = train_from_config(config.replace(out_dir=str(tmp_path / "single")))
    for key, value in single.model.state_dict().items():  # same global batches and noise
        assert torch.allclose(value, rank0[key], rtol=1e-4, atol=1e-6), key
