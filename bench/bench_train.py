"""Training throughput (images/s): diffcore's Trainer vs a plain PyTorch loop of the same model,
and an ensemble of K = 5 members in one stacked step vs 5 sequential Trainers (end of file).

The model comes from ``diffcore.train.build_model(MODEL_SPEC)``: UNet-64 at 32x32
(``{"name": "ddpmpp", "preset": "ddpmpp-cifar", "model_channels": 64}``, the issue's target) when
``diffcore.models.denoiser_preset`` exists, else a small conv denoiser defined here. On the CPU the
UNet is timed on tiny batches (one fwd+bwd of 8 images takes tens of seconds on 2 cores).
The peer runs with DIFFCORE_BACKEND=reference so that the model's attention uses plain torch ops.
Both loops do the same work per step: EDM loss on a batch of uint8 images, Adam, EMA update.
The peer is fp32 eager PyTorch; diffcore runs fp32 eager on the CPU and bf16 + torch.compile on
a GPU (on the CPU its ratio measures the trainer's own overhead, so ~1.0 is the expectation).

Run: python -m pytest bench/bench_train.py --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch
from benchutil import QUICK, record_ratio, run_timed
from torch import nn

from diffcore.train import TrainConfig, Trainer, build_model, register_model
from diffcore.train.ddp import DistributedContext, resolve_device

DEVICE = resolve_device("auto")
ON_GPU = DEVICE.type == "cuda"


def _unet_available() -> bool:
    try:
        from diffcore.models import denoiser_preset  # noqa: F401
    except ImportError:
        return False
    return True


USE_UNET = _unet_available()
CHANNELS = 3
if USE_UNET:  # the target: UNet-64 (DDPM++ at base width 64) at 32x32
    RESOLUTION = 16 if QUICK else 32
    BATCH = 4 if (QUICK or not ON_GPU) else 128
    STEPS = 1 if (QUICK or not ON_GPU) else 20
    ROUNDS = 2 if not ON_GPU else 3
else:  # until the UNet is merged: a small conv denoiser (defined below)
    RESOLUTION = 16 if QUICK else 32
    BATCH = 8 if QUICK else 64
    STEPS = 2 if QUICK else (20 if ON_GPU else 5)
    ROUNDS = 3


class BenchConvDenoiser(nn.Module):
    """EDM-preconditioned (Karras et al. 2022, Table 1) stack of 3x3 convolutions, [B, C, H, W]."""

    def __init__(self, channels=3, width=64, depth=4, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.noise = nn.Linear(1, width)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        sd2 = self.sigma_data**2
        c_in, c_skip = 1 / (s**2 + sd2).sqrt(), sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        h = self.inp(c_in * x) + self.noise((s.log() / 4).reshape(-1, 1))[:, :, None, None]
        for conv in self.body:
            h = h + conv(torch.nn.functional.silu(h))
        return c_skip * x + c_out * self.out(torch.nn.functional.silu(h)).to(x.dtype)


register_model("bench_convnet", BenchConvDenoiser, overwrite=True)
if USE_UNET:
    MODEL_SPEC = (
        {"name": "ddpmpp", "preset": "ddpmpp-16", "model_channels": 16}
        if QUICK
        else {"name": "ddpmpp", "preset": "ddpmpp-cifar", "model_channels": 64}
    )
else:
    MODEL_SPEC = {"name": "bench_convnet", "channels": CHANNELS, "width": 16 if QUICK else (64 if ON_GPU else 32)}
DATA_SPEC = {"name": "random_images", "shape": [CHANNELS, RESOLUTION, RESOLUTION], "num": 4 * BATCH, "seed": 0}


def _train_config(out_dir, data: dict, model: dict, batch_size: int, precision: str, **fields) -> TrainConfig:
    """A benchmark's training run on DEVICE: unbounded steps (the benchmark stops stepping), lr 1e-4
    without warm-up, EMA half-life 10k images, no progress bar; ``fields``: further TrainConfig fields."""
    return TrainConfig(
        data=data,
        model=model,
        steps=10**9,
        batch_size=batch_size,
        lr=1e-4,
        lr_warmup_images=0,
        ema_halflife_images=10_000,
        precision=precision,
        device=str(DEVICE),
        out_dir=str(out_dir),
        progress=False,
        **fields,
    )


def _config(tmp_path, precision="fp32", compile_model=False) -> TrainConfig:
    return _train_config(tmp_path / "run", DATA_SPEC, MODEL_SPEC, BATCH, precision, compile=compile_model)


def _plain_loop(config: TrainConfig):
    """What a user would write: eager fp32 EDM loss, Adam, EMA; returns ``steps(n)``."""
    torch.manual_seed(0)
    model = build_model(config.model).to(DEVICE)
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    images = torch.randint(0, 256, (4 * BATCH, CHANNELS, RESOLUTION, RESOLUTION), dtype=torch.uint8, device=DEVICE)
    beta = 0.5 ** (BATCH / config.ema_halflife_images)

    def steps(n):
        for _ in range(n):
            index = torch.randint(0, images.shape[0], (BATCH,), device=DEVICE)
            x0 = images[index].float() / 127.5 - 1
            sigma = (torch.randn(BATCH, device=DEVICE) * 1.2 - 1.2).exp()
            noisy = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)
            weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
            loss = (weight * ((model(noisy, sigma) - x0) ** 2).flatten(1).mean(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema, model.parameters()):
                    p_ema.lerp_(p, 1 - beta)

    return steps


def _trainer_loop(config: TrainConfig):
    trainer = Trainer(config, DistributedContext(device=DEVICE), resume="never")

    def steps(n):
        for _ in range(n):
            trainer.step_once()

    return steps


CASES = [("fp32_eager", "fp32", False)] + ([("bf16_compile", "bf16", True)] if ON_GPU else [])


@pytest.mark.parametrize("case, precision, compile_model", CASES)
def test_train_throughput_peer_plain_loop(benchmark, monkeypatch, tmp_path, case, precision, compile_model):
    monkeypatch.setenv("DIFFCORE_BACKEND", "reference")  # the peer uses no diffcore kernel (plain torch ops)
    steps = _plain_loop(_config(tmp_path))
    steps(1)  # warm-up
    run_timed(benchmark, lambda: steps(STEPS), device=DEVICE, rounds=ROUNDS, warmup_rounds=1 if ON_GPU else 0)
    record_ratio(benchmark, "train", case, "peer")
    benchmark.extra_info["images_per_s"] = STEPS * BATCH / benchmark.stats.stats.min
    benchmark.extra_info["model"] = MODEL_SPEC


@pytest.mark.parametrize("case, precision, compile_model", CASES)
def test_train_throughput_diffcore_trainer(benchmark, monkeypatch, tmp_path, case, precision, compile_model):
    steps = _trainer_loop(_config(tmp_path, precision, compile_model))
    steps(3 if compile_model else 1)  # warm-up (and compilation)
    run_timed(benchmark, lambda: steps(STEPS), device=DEVICE, rounds=ROUNDS, warmup_rounds=1 if ON_GPU else 0)
    with monkeypatch.context() as patch:
        patch.setenv("DIFFCORE_BACKEND", "reference")  # the peer uses no diffcore kernel (plain torch ops)
        peer_steps = _plain_loop(_config(tmp_path / "peer"))
        peer_steps(1)  # warm-up
        record_ratio(
            benchmark,
            "train",
            case,
            "diffcore",
            peer=lambda: peer_steps(STEPS),
            device=DEVICE,
            peer_rounds=ROUNDS,
            peer_warmup_rounds=1 if ON_GPU else 0,
        )
    benchmark.extra_info["images_per_s"] = STEPS * BATCH / benchmark.stats.stats.min
    benchmark.extra_info["model"] = MODEL_SPEC


# ----------------------------------------------------------------------------- ensembles
# An ensemble of K = 5 members (diffcore.train.ensemble: one stacked vmap step) against the same
# 5 models stepped one after another by 5 Trainers (the peer). ``images_per_s_per_member`` is the
# images each member sees per second; the ratio is the ensemble's speed-up. CPU: the light 8x8
# digits UNet of width 32 (the quick study's architecture), the same at the quick preset's
# widths 8 and 16 and batch 32 (its models train as ensembles of 5 because of these two cases), and
# a 32x32 DDPM++ UNet of width 32; GPU: 32x32 widths 64 and 128 in bf16 autocast.
ENSEMBLE_K = 5
if ON_GPU:
    ENSEMBLE_CASES = [
        (f"cifar32_w{w}", {"name": "ddpmpp", "preset": "ddpmpp-cifar", "model_channels": w}, [3, 32, 32], 128, "bf16")
        for w in (64, 128)
    ]
else:
    ENSEMBLE_CASES = [
        (
            "digits_w32",
            {"name": "ddpmpp", "preset": "ddpmpp-digits-light", "model_channels": 8 if QUICK else 32},
            [1, 8, 8],
            16 if QUICK else 64,
            "fp32",
        ),
        (
            "cifar32_w32",
            {
                "name": "ddpmpp",
                "preset": "ddpmpp-16" if QUICK else "ddpmpp-cifar",
                "model_channels": 8 if QUICK else 32,
            },
            [3, 16, 16] if QUICK else [3, 32, 32],
            2 if QUICK else 8,
            "fp32",
        ),
    ]
    if not QUICK:
        ENSEMBLE_CASES += [
            (
                f"digits_quick_w{w}",
                {"name": "ddpmpp", "preset": "ddpmpp-digits-light", "model_channels": w},
                [1, 8, 8],
                32,
                "fp32",
            )
            for w in (8, 16)
        ]
ENSEMBLE_STEPS = 1 if QUICK else (10 if ON_GPU else 2)


def _member_configs(tmp_path, model, shape, batch, precision):
    data = {"name": "random_images", "shape": shape, "num": 4 * batch, "seed": 0}
    return [_train_config(tmp_path / f"member{k}", data, model, batch, precision, seed=k) for k in range(ENSEMBLE_K)]


def _time_steps(benchmark, step, batch, model, case, role, peer_step=None):
    step()  # warm-up
    run_timed(
        benchmark,
        lambda: [step() for _ in range(ENSEMBLE_STEPS)],
        device=DEVICE,
        rounds=ROUNDS,
        warmup_rounds=1 if ON_GPU else 0,
    )
    if peer_step is not None:
        peer_step()  # warm-up
    record_ratio(
        benchmark,
        "train_ensemble",
        case,
        role,
        peer=None if peer_step is None else (lambda: [peer_step() for _ in range(ENSEMBLE_STEPS)]),
        device=DEVICE,
        peer_rounds=ROUNDS,
        peer_warmup_rounds=1 if ON_GPU else 0,
    )
    benchmark.extra_info["images_per_s_per_member"] = ENSEMBLE_STEPS * batch / benchmark.stats.stats.min
    benchmark.extra_info["members"] = ENSEMBLE_K
    benchmark.extra_info["model"] = model


@pytest.mark.parametrize("case, model, shape, batch, precision", ENSEMBLE_CASES)
def test_ensemble_peer_sequential(benchmark, tmp_path, case, model, shape, batch, precision):
    _time_steps(benchmark, _sequential_steps(tmp_path, model, shape, batch, precision), batch, model, case, "peer")


def _sequential_steps(tmp_path, model, shape, batch, precision):
    """The peer: one step of each of K single-model Trainers, one after another."""
    trainers = [
        Trainer(c, DistributedContext(device=DEVICE), resume="never")
        for c in _member_configs(tmp_path, model, shape, batch, precision)
    ]
    return lambda: [t.step_once() for t in trainers]


@pytest.mark.parametrize("case, model, shape, batch, precision", ENSEMBLE_CASES)
def test_ensemble_diffcore_stacked(benchmark, tmp_path, case, model, shape, batch, precision):
    from diffcore.train.ensemble import EnsembleTrainer

    ensemble = EnsembleTrainer(_member_configs(tmp_path, model, shape, batch, precision), resume="never")
    _time_steps(
        benchmark,
        ensemble.step_once,
        batch,
        model,
        case,
        "diffcore",
        peer_step=_sequential_steps(tmp_path / "peer", model, shape, batch, precision),
    )
