"""The reproducibility study with the REAL stack (trainer, DDPM++ UNet, sampler, empirical denoiser,
k-NN), shrunk to seconds of CPU: one light UNet of width 16 trained on 8 digits memorizes them,
the same training on all 1797 digits does not reproduce training images. The two models train
in two worker processes (train_workers=2), or as one ensemble of two (train_ensemble=2, the
quick preset's way of training the models of one width).

This checks the direction of the effect end to end, not its size: 300 steps are far too few for
the N = 1797 model to make good digits (its samples are blurry), so "generalizes" here only means
"does not copy training images". The quick preset (docs/experiments.md) is the real measurement.
"""

from __future__ import annotations

import json

import pytest

from diffcore.experiments import reproducibility as study
from diffcore.experiments.base import MANIFEST, config_from_preset
from tests.helpers import finish_processes, start_study_process

OVERRIDES = [
    "model_preset=ddpmpp-digits-light",
    "widths=16",
    "sizes=8,1797",
    "train_seeds=0",
    "train_steps=300",
    "batch_size=32",
    "num_samples=32",
    "sampler_steps=12",
    "grid_samples=8",
    "torch_threads=1",
    "train_workers=2",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [["train_workers=2"], ["train_workers=1", "train_ensemble=2"]], ids=["two-workers", "ensemble"]
)
def test_real_stack_small_n_memorizes_large_n_does_not(tmp_path, layout):
    config = config_from_preset(study.PRESETS, "tiny", OVERRIDES + layout)
    results = study.run(config, tmp_path, device="cpu", progress=False)
    rows = {row["n"]: row for row in results["models"]}
    small, large = rows[8], rows[1797]
    assert small["gl"] <= 0.2 and small["memorized_ratio"] >= 0.7, small
    assert large["gl"] >= 0.5 and large["memorized_ratio"] <= 0.3, large
    assert small["rp_empirical"] > large["rp_empirical"], (small, large)
    assert {e["n"]: e["gl"] for e in results["empirical"]} == {8: 0.0, 1797: 0.0}
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["units"]["models"]["units"] == 2 and timings["torch_threads"] == 1
    made_by_workers = 2 if config.train_workers == 2 else 0  # train_workers=1: made in this process
    assert timings["units"]["models"]["reused"] == made_by_workers and timings["details"]["train_wall_seconds"] > 0
    metas = [
        json.loads((tmp_path / "units" / "models" / f"w16-n{n}-s0" / MANIFEST).read_text())["meta"] for n in (8, 1797)
    ]
    if config.train_ensemble == 2:
        assert [m["ensemble_size"] for m in metas] == [2, 2] and all(m["final_loss"] > 0 for m in metas)
        assert timings["units"]["models"]["seconds"] >= metas[0]["ensemble_train_seconds"] * 0.99
    else:
        assert all("ensemble_size" not in m for m in metas)
    assert (tmp_path / "figure1.png").is_file() and len(list((tmp_path / "grids").iterdir())) == 4


# The tiny preset cut to seconds: two seeds of one width at two N (so the results hold GL, RP
# against the empirical denoiser and RP between seeds), and torch_threads=0, which leaves the
# thread count to the launcher (torchrun sets OMP_NUM_THREADS=1).
LAUNCH_OVERRIDES = [
    "widths=4",
    "sizes=8,96",
    "train_seeds=0,1",
    "train_steps=12",
    "num_samples=8",
    "sampler_steps=4",
    "grid_samples=0",
    "torch_threads=0",
]


def _run_with_threads(out, threads: int) -> bytes:
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        study.run(config_from_preset(study.PRESETS, "tiny", LAUNCH_OVERRIDES), out, device="cpu", progress=False)
    finally:
        torch.set_num_threads(before)
    return (out / "results.json").read_bytes()


@pytest.fixture(scope="module")
def two_thread_run(tmp_path_factory) -> bytes:
    return _run_with_threads(tmp_path_factory.mktemp("two-threads"), 2)


@pytest.mark.slow
def test_results_do_not_depend_on_the_thread_count(tmp_path, two_thread_run):
    """One and two intra-op threads give byte-identical results.json (issue 32): models train with
    one thread whatever the launcher, and similarities reduce in float64 with exact means."""
    one = _run_with_threads(tmp_path / "one", 1)
    assert json.loads(one)["pairs"] and json.loads(one)["models"][0]["nn_similarity_mean"] > 0
    assert one == two_thread_run


def _cli(out, **env):
    import sys

    sets = [arg for item in LAUNCH_OVERRIDES for arg in ("--set", item)]
    return start_study_process(
        [
            sys.executable,
            "-m",
            "diffcore",
            "run",
            "reproducibility",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            *sets,
        ],
        **env,
    )


def _wait(processes) -> None:
    finish_processes(processes, timeout=600)


@pytest.mark.slow
def test_shards_and_gloo_ranks_of_one_thread_give_the_results_of_one_two_thread_process(tmp_path, two_thread_run):
    """``--shard`` processes (then the aggregating run) and two gloo ranks as torchrun starts them
    (OMP_NUM_THREADS=1 each) write the results.json of one process with two threads, byte for byte."""
    import socket

    sharded = tmp_path / "sharded"
    _wait([_cli(sharded, DIFFCORE_SHARD=f"{i}/2") for i in range(2)])
    _wait([_cli(sharded)])
    assert (sharded / "results.json").read_bytes() == two_thread_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ranks = tmp_path / "ranks"
    _wait(
        [
            _cli(ranks, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in range(2)
        ]
    )
    assert (ranks / "results.json").read_bytes() == two_thread_run
