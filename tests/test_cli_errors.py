"""Bad settings end in one line naming the setting, never a traceback (issue 32: tracebacks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from diffcore import cli


def run_cli(args, tmp_path, **env):
    """``python -m diffcore ARGS`` in a subprocess: (exit code, stderr)."""
    full_env = {**os.environ, "DIFFCORE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(
        [sys.executable, "-m", "diffcore", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "device, message",
    [
        ("banana", "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'banana'"),
        ("cuda", "device: 'cuda' requested but CUDA is not available"),
    ],
)
def test_a_bad_device_is_one_line(tmp_path, device, message):
    code, err = run_cli(["run", "demo", "--device", device, "--out", str(tmp_path / "out")], tmp_path)
    assert code == 2 and "Traceback" not in err and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_forced_cuda_backend_without_cuda_is_one_line(tmp_path):
    code, err = run_cli(["run", "demo", "--out", str(tmp_path / "out")], tmp_path, DIFFCORE_BACKEND="cuda")
    assert code == 2 and "Traceback" not in err and "DIFFCORE_BACKEND=cuda" in err


def test_world_size_without_rank_is_one_line(tmp_path, monkeypatch):
    from diffcore.experiments import base
    from diffcore.train import ddp

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(base.ConfigError, match="WORLD_SIZE=2 is set but RANK is not"):
        base.participation()
    with pytest.raises(ValueError, match="WORLD_SIZE=2 is set but RANK is not"):
        ddp.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(base.ConfigError, match="WORLD_SIZE: expected an integer"):
        base.participation()


def test_training_that_diverges_names_the_learning_rate(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--out-dir",
            str(tmp_path / "run"),
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--lr",
            "1e12",
            "--log-every",
            "1",
            "--no-progress",
            "--model",
            '{"name": "ddpmpp", "preset": "ddpmpp-digits-light", "model_channels": 4}',
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "training diverged" in err and "lr=1000000000000.0" in err


def test_a_dead_worker_is_one_line(capsys, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    def job():
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(cli, "_run_experiment", lambda name, parsed: job())
    assert cli.main(["run", "demo", "--out", "unused"]) == 2
    assert "a worker process died" in capsys.readouterr().err


def test_vector_training_that_diverges_names_its_settings():
    from diffcore.experiments import _vector

    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))

    class Denoiser(torch.nn.Module):  # the EDM loss calls model(x, sigma, labels)
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, sigma, *labels):
            return self.net(x)

    with pytest.raises(FloatingPointError, match=r"training diverged: .*P_mean=1000000000000.0"):
        _vector.train_denoiser(Denoiser(), data, steps=4, batch_size=8, P_mean=1e12, log_every=2)
