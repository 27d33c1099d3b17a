"""The default hooks of the studies: what they take from the sampler, trainer, models, data and ops.

Studies call the stack only through a hooks object (tests inject closed-form stand-ins); this
module builds the real one. Each hook adapts one call to the shape the studies need (CPU float32
samples, a study's model spec as a training request); nothing here falls back to anything.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from diffcore import _env
from diffcore.ops import knn  # noqa: F401  (the studies' k-NN)
from diffcore.train import ddp

log = logging.getLogger(__name__)


def default_hooks():
    """The studies' ``StudyHooks`` on the real stack."""
    from diffcore import sampler
    from diffcore.denoisers import EmpiricalDenoiser
    from diffcore.experiments.reproducibility import StudyHooks

    return StudyHooks(load_dataset=load_dataset, subset=subset, train=train_model, load=load_model,
                      sample=sample, empirical_denoiser=EmpiricalDenoiser, knn=knn,
                      noise_from_seeds=sampler.noise_from_seeds)


def resolve_device(device: str = "auto") -> torch.device:
    """``diffcore.train``'s device resolution, on this process's GPU under torchrun (LOCAL_RANK)."""
    return ddp.resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))


def sample(denoiser, seeds: Sequence[int], shape: Sequence[int], *, steps: int = 18, solver: str = "heun",
           sigma_min: float = 0.002, sigma_max: float = 80.0, device="cpu", batch_size: int = 256,
           progress: bool = True) -> torch.Tensor:
    """Deterministic samples ``[len(seeds), *shape]`` (float32, CPU), sample i from seed i only."""
    from diffcore import sampler

    with torch.no_grad():
        out = sampler.sample(denoiser, seeds=list(seeds), shape=tuple(shape), steps=steps, solver=solver,
                             sigma_min=sigma_min, sigma_max=sigma_max, device=device, batch_size=batch_size,
                             progress=_env.progress_enabled(progress))
    return out.float().cpu()


def data_spec(dataset: str, root: str = "") -> dict:
    return {"name": dataset, **({"root": root} if root else {})}


def load_dataset(name: str, root: str = "") -> torch.Tensor:
    """The image pool of a dataset, ``[P, C, H, W]`` float32 in [-1, 1]."""
    from diffcore import data

    return data.load_dataset(data_spec(name, root)).all()


def subset(images: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested subset of size ``n``: ``(images [n, ...], indices [n])``, the same images the
    trainer selects for ``{"subset": n, "subset_seed": seed}``."""
    from diffcore import data

    indices = data.subset_indices(images.shape[0], n, seed)
    return images[indices.to(images.device)], indices


def training_request(spec: dict, work_dir, device="cpu", progress: bool = True):
    """The validated ``diffcore.train.TrainConfig`` of a study's model spec (dataset, data_root, n,
    subset_seed, width, model_preset, seed, train_steps, batch_size, learning_rate,
    lr_warmup_images); raises before anything is trained."""
    from diffcore import train

    data = {**data_spec(spec["dataset"], spec.get("data_root", "")), "subset": spec["n"],
            "subset_seed": spec["subset_seed"]}
    model = {"name": "ddpmpp", "preset": spec["model_preset"], "model_channels": spec["width"]}
    return train.TrainConfig(data=data, model=model, steps=spec["train_steps"], batch_size=spec["batch_size"],
                             lr=spec["learning_rate"], lr_warmup_images=spec["lr_warmup_images"],
                             seed=spec["seed"], device=str(device), out_dir=str(work_dir),
                             progress=_env.progress_enabled(progress))


def train_model(images: torch.Tensor, spec: dict, out_dir: Path, work_dir: Path, *, device="cpu",
                progress: bool = True) -> dict:
    """Train the model a study's ``spec`` describes with diffcore.train; checkpoints live in
    ``work_dir`` (a killed run resumes from them), the final one is copied to ``out_dir/checkpoint``.
    ``images`` are the N training images (the trainer reloads the same nested subset)."""
    from diffcore import train

    if images.shape[0] != spec["n"]:
        raise ValueError(f"images: expected the {spec['n']} training images, got {images.shape[0]}")
    result = train.train_from_config(training_request(spec, work_dir, device, progress), resume="auto")
    if result.checkpoint is None:
        raise RuntimeError(f"diffcore.train wrote no checkpoint for {spec}")
    shutil.copytree(result.checkpoint, Path(out_dir) / "checkpoint")
    return {"final_loss": result.final_loss, "step": result.step, "images_seen": result.images_seen}


def load_model(model_dir: Path, device="cpu"):
    """The EMA model of a finished model unit as a denoiser ``D(x, sigma)``."""
    from diffcore import train

    return train.load_trained_model(Path(model_dir) / "checkpoint", which="ema").to(device).eval()
