"""Helpers shared by the tests (import ``from tests.helpers import ...``; conftest.py holds only
pytest hooks and fixtures)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from diffcore import _backend


def cpu_backends(implemented=("reference", "cpu", "triton")):
    """Backends a test can run on CPU tensors here (Triton through the interpreter, which
    tests/conftest.py turns on before triton is imported)."""
    return [b for b in implemented if _backend.why_unusable(b, torch.device("cpu")) is None]


# A small UNet (diffcore.models.UNet fields): width 8 on 8x8 one-channel images, one block per level,
# attention at the 8x8 level, no dropout. The tests' tiny UNet (tests/models) and its variants.
TINY_UNET_FIELDS = dict(
    img_resolution=8,
    in_channels=1,
    model_channels=8,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(8,),
    dropout=0.0,
)


def tiny_diffusers_unet(sample_size: int = 8, attention: bool = False):
    """A randomly initialised diffusers ``UNet2DModel`` (weights drawn after ``torch.manual_seed(0)``):
    3-channel ``sample_size`` x ``sample_size`` images, widths 8 and 16, one block per level,
    attention at the second level when ``attention``. Needs diffusers (skip the test without it)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


# The variables torchrun and --shard set: a study process sees only those its test gives it.
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DIFFCORE_SHARD")


def start_study_process(argv, **env) -> subprocess.Popen:
    """``argv`` started as a launcher starts a study: one OpenMP thread, no progress bar, none of
    the LAUNCH_VARIABLES but those in ``env``; stdout dropped, stderr kept for :func:`finish_processes`."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFCORE_PROGRESS": "0", **env}
    for var in LAUNCH_VARIABLES:
        if var not in env:
            environ.pop(var, None)
    return subprocess.Popen(argv, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish_processes(processes, timeout: float) -> None:
    """Wait for every process (at most ``timeout`` seconds each; one still running then is killed);
    fails with the end of the stderr of each that exited non-zero or was killed: all of them, since
    a rank that fails because another crashed says little about the crash."""
    failures = []
    for index, process in enumerate(processes):
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
            failures.append(f"process {index}: still running after {timeout:g} s, killed\n{err[-3000:]}")
            continue
        if process.returncode != 0:
            failures.append(f"process {index}: exit {process.returncode}\n{err[-3000:]}")
    assert not failures, "\n\n".join(failures)


def assert_refused_before_writing(study, override: str, out) -> None:
    """The study's tiny preset with ``override`` (``field=value``) is refused by a ConfigError naming
    ``field`` before anything is written: no config.json in the output folder ``out``."""
    from diffcore.experiments.base import ConfigError

    field = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=field):
        study.run_preset("tiny", out, [override], progress=False)
    assert not (out / "config.json").exists()


def assert_outputs(out, names, results: dict | None = None) -> None:
    """Every file of ``names`` in the run folder ``out`` is there and not empty; with ``results``,
    ``out/results.json`` holds exactly them."""
    for name in names:
        assert (out / name).stat().st_size > 0, name
    if results is not None:
        assert json.loads((out / "results.json").read_text()) == results
