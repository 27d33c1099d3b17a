"""In-process training runs: exact resume, metrics, config checks, options, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffcore import _env
from diffcore.data import load_dataset
from diffcore.train import (
    CheckpointError,
    EDMLoss,
    TrainConfig,
    add_train_arguments,
    build_model,
    load_checkpoint,
    load_trained_model,
    main_train,
    train_from_config,
)
from diffcore.train.checkpoint import list_checkpoints
from diffcore.train.cli import config_from_args


@pytest.fixture(autouse=True)
def one_thread():
    with _env.torch_threads(1):
        yield


def _assert_same_checkpoint(a, b):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    for group in ("model", "ema", "optimizer", "rng"):
        assert ca.tensors[group].keys() == cb.tensors[group].keys()
        for key in ca.tensors[group]:
            assert torch.equal(ca.tensors[group][key], cb.tensors[group][key]), f"{group}.{key} differs"


def test_resumed_run_matches_uninterrupted_bitwise(tiny_config, tmp_path):
    full = train_from_config(tiny_config.replace(out_dir=str(tmp_path / "full")))
    assert full.step == 40 and full.resumed_from_step is None
    split_dir = str(tmp_path / "split")
    first = train_from_config(tiny_config.replace(out_dir=split_dir, steps=25))
    assert first.step == 25
    second = train_from_config(tiny_config.replace(out_dir=split_dir))
    assert second.resumed_from_step == 25 and second.step == 40
    _assert_same_checkpoint(full.checkpoint, second.checkpoint)
    for p, q in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    lines = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in lines)
    assert [s for s, _ in list_checkpoints(tmp_path / "split" / "checkpoints")] == [25, 30, 40]  # keep 3
    # a finished run is found and reused
    again = train_from_config(tiny_config.replace(out_dir=split_dir))
    assert again.step == 40 and again.resumed_from_step == 40


def test_training_reduces_the_loss_on_molrg(tmp_path):
    config = TrainConfig(
        data={"name": "molrg", "K": 2, "n": 16, "d": 2, "num": 256, "seed": 0},
        model={"name": "tiny_denoiser", "dim": 16, "width": 64},
        steps=300,
        batch_size=32,
        lr=3e-3,
        lr_warmup_images=320,
        ema_halflife_images=500,
        seed=0,
        device="cpu",
        out_dir=str(tmp_path / "run"),
        checkpoint_every=300,
        log_every=50,
        progress=False,
    )
    result = train_from_config(config)
    data = load_dataset(config.data).all()
    loss, generator = EDMLoss(), torch.Generator().manual_seed(123)
    sigma = loss.sample_sigma(len(data), generator, "cpu")
    noise = torch.randn(data.shape, generator=generator)

    def held_out_loss(model):
        with torch.no_grad():
            return loss(model, data, sigma, noise).mean().item()

    torch.manual_seed(0)
    untrained = build_model(config.model)
    assert held_out_loss(result.model) < 0.7 * held_out_loss(untrained)
    assert held_out_loss(result.ema_model) < 0.7 * held_out_loss(untrained)


def test_config_mismatch_and_damaged_checkpoint_raise(tiny_config, tmp_path):
    run = train_from_config(tiny_config.replace(steps=20))
    with pytest.raises(CheckpointError, match="config does not match.*lr: checkpoint 0.002 vs now 0.001"):
        train_from_config(tiny_config.replace(lr=1e-3))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_from_config(tiny_config, resume="never")
    latest = run.checkpoint
    payload = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(payload[:-7])
    with pytest.raises(CheckpointError, match="truncated"):
        train_from_config(tiny_config)  # never silently starts over
    shutil.rmtree(latest)
    resumed = train_from_config(tiny_config, resume=str(run.checkpoint.parent / "step_000000010"))
    assert resumed.resumed_from_step == 10 and resumed.step == 40


@pytest.mark.parametrize(
    "options",
    [
        {"loss": "ddpm"},
        {"precision": "bf16"},
        {"class_conditional": True, "model": {"name": "tiny_denoiser", "num_classes": 10}},
        {"augment": "xflip", "grad_clip": 0.0, "ema_rampup_ratio": None},
    ],
)
def test_training_options_run(tiny_config, options):
    result = train_from_config(tiny_config.replace(steps=6, log_every=3, **options))
    assert result.step == 6 and result.final_loss is not None and result.final_loss == result.final_loss


def test_invalid_options(tiny_config):
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        train_from_config(tiny_config.replace(precision="fp16"))
    with pytest.raises(ValueError, match="loss must be one of"):
        tiny_config.replace(loss="l1")
    with pytest.raises(ValueError, match="unknown training config fields: colour"):
        TrainConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="larger than the dataset"):
        train_from_config(tiny_config.replace(data={"name": "digits", "subset": 5000}))


def test_cli_and_load_trained_model(tiny_config, tmp_path):
    import argparse

    config_file = tmp_path / "config.json"
    config_file.write_text(tiny_config.to_json())
    out = tmp_path / "cli_run"
    assert (
        main_train(
            ["--config", str(config_file), "--out-dir", str(out), "--steps", "8", "--subset", "32", "--no-progress"]
        )
        == 0
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 8 and saved["data"]["subset"] == 32 and saved["progress"] is False
    model = load_trained_model(out)
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.tensor([1.0, 2.0])).shape == x.shape
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", '{"name": "ddpmpp", "model_channels": 64}', "--precision", "bf16"])
    config = config_from_args(args)
    assert config.model == {"name": "ddpmpp", "model_channels": 64} and config.precision == "bf16"


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_config, tmp_path):
    compiled = train_from_config(tiny_config.replace(steps=3, compile=True, out_dir=str(tmp_path / "c")))
    eager = train_from_config(tiny_config.replace(steps=3, out_dir=str(tmp_path / "e")))
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_keep_steps_are_written_and_never_pruned(tiny_config, tmp_path):
    """``keep_steps`` adds checkpoints off the ``checkpoint_every`` grid and protects them from
    pruning; the weights at a kept step equal those of a run stopped there."""
    config = tiny_config.replace(out_dir=str(tmp_path / "kept"), keep_steps=(3, 7, 25), keep_checkpoints=1)
    train_from_config(config)
    steps = [s for s, _ in list_checkpoints(tmp_path / "kept" / "checkpoints")]
    assert steps == [3, 7, 25, 40]  # the kept steps and the newest one (10, 20, 30 pruned)
    stopped = train_from_config(tiny_config.replace(out_dir=str(tmp_path / "stopped"), steps=7))
    kept = load_checkpoint(tmp_path / "kept" / "checkpoints" / "step_000000007")
    for key, value in stopped.ema_model.state_dict().items():
        assert torch.equal(kept.tensors["ema"][key], value), key
    # keep_steps may change on resume (it does not change the weights); bad values raise
    train_from_config(config.replace(keep_steps=(3,)))
    for bad in ((0,), (5, 5), (2.5,)):
        with pytest.raises(ValueError, match="keep_steps"):
            tiny_config.replace(keep_steps=bad)
