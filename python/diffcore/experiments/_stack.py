"""The ONE place where experiments meet the rest of the stack (ops, sampler, models, train, data).

Every experiment and the CLI reach the sampler, the trainer, the models, the datasets and the ops
only through the functions below, so the contracts they assume live here and nowhere else. Written
against the APIs of the branches knn, emp, sampler, train and unet as read at 00:45 UTC:

- ``diffcore.ops.knn(queries, train, k=2) -> (distances [B, k], indices [B, k] int64)``
- ``diffcore.ops.empirical_denoise(x, train, sigma) -> x0_hat`` (train on x's device)
- ``diffcore.sampler.sample(denoiser, *, seeds, shape, steps, solver, sigma_min, sigma_max, device,
  batch_size, progress)``, ``diffcore.sampler.noise_from_seeds(seeds, shape, device, dtype)``
- ``diffcore.data.load_dataset(spec).all()`` (float32 in [-1, 1]), ``diffcore.data.subset_indices``
  (nested subsets; the trainer selects its images with the same function)
- ``diffcore.train.TrainConfig``, ``train_from_config`` (resumable checkpoints under out_dir),
  ``load_trained_model(checkpoint_dir, which="ema")``, ``main_train(argv)``
- model spec ``{"name": "ddpmpp", "preset": <diffcore.models preset>, "model_channels": width}``
  (the "ddpmpp" factory of diffcore.train's model registry)

Nothing here falls back to anything: a missing piece raises.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from diffcore import _env

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- ops

def knn(queries: torch.Tensor, train: torch.Tensor, k: int = 2):
    """Exact l2 k-NN: ``(distances [B, k], indices [B, k])``."""
    from diffcore.ops import knn as knn_op

    return knn_op(queries, train, k=k)


def empirical_denoise(x: torch.Tensor, train: torch.Tensor, sigma) -> torch.Tensor:
    from diffcore.ops import empirical_denoise as empirical_denoise_op

    return empirical_denoise_op(x, train, sigma)


def empirical_denoiser(train: torch.Tensor):
    """``D(x, sigma)`` of the empirical optimal denoiser of ``train [N, ...]`` (copied to each
    device it is called on once, not per call)."""
    on_device: dict[torch.device, torch.Tensor] = {}

    def denoise(x, sigma):
        if x.device not in on_device:
            on_device[x.device] = train.to(x.device)
        return empirical_denoise(x, on_device[x.device], sigma)
    return denoise


# ----------------------------------------------------------------------------- sampler

def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], device, dtype) -> torch.Tensor:
    from diffcore import sampler

    return sampler.noise_from_seeds(seeds, shape, device=device, dtype=dtype)


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


# ----------------------------------------------------------------------------- data

def data_spec(dataset: str, root: str = "") -> dict:
    spec = {"name": dataset}
    if root:
        spec["root"] = root
    return spec


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


# ----------------------------------------------------------------------------- models and training

# The training recipe a study's model spec may carry (absent keys: EDM preconditioning and loss,
# no augmentation). "vp": EDM's VP preconditioning with its loss; augment_p > 0: EDM's non-leaky
# augmentation (diffcore.train.augment) with its 9 augment labels passed to the UNet.
PRECONDITIONINGS = ("edm", "vp")


def recipe_spec(precond: str, augment_p: float) -> dict:
    """The recipe fields of a model spec, only those that differ from EDM without augmentation
    (so the specs, and the finished units, of studies that use neither stay as they were)."""
    if precond not in PRECONDITIONINGS:
        raise ValueError(f"precond: expected one of {', '.join(PRECONDITIONINGS)}, got {precond!r}")
    if not 0 <= augment_p <= 1:
        raise ValueError(f"augment_p: expected a probability in [0, 1], got {augment_p}")
    return {**({"precond": precond} if precond != "edm" else {}),
            **({"augment_p": augment_p} if augment_p > 0 else {})}


def model_spec(spec: dict) -> dict:
    model = {"name": "ddpmpp", "preset": spec["model_preset"], "model_channels": spec["width"]}
    if spec.get("precond", "edm") != "edm":
        model["precond"] = spec["precond"]
    if spec.get("augment_p", 0) > 0:
        from diffcore.train.augment import AugmentPipe

        model["augment_dim"] = AugmentPipe().label_dim
    return model


def train_model(images: torch.Tensor, spec: dict, out_dir: Path, work_dir: Path, *, device="cpu",
                progress: bool = True) -> dict:
    """Train the model ``spec`` describes (the study's model spec: dataset, n, subset_seed, width,
    model_preset, seed, train_steps, batch_size, learning_rate, lr_warmup_images) with diffcore.train; checkpoints
    live in ``work_dir`` (a killed run resumes from them), the final checkpoint is copied to
    ``out_dir/checkpoint``. ``images`` are the N training images (the trainer reloads the same
    nested subset from the data spec; the sizes are checked)."""
    import shutil

    from diffcore import train

    data = {**data_spec(spec["dataset"], spec.get("data_root", "")), "subset": spec["n"],
            "subset_seed": spec["subset_seed"]}
    config = train.TrainConfig(data=data, model=model_spec(spec), steps=spec["train_steps"],
                               batch_size=spec["batch_size"], lr=spec["learning_rate"],
                               lr_warmup_images=spec["lr_warmup_images"], seed=spec["seed"],
                               loss=spec.get("precond", "edm"), augment="edm" if spec.get("augment_p", 0) > 0 else "none",
                               augment_p=spec.get("augment_p", 0.12),
                               device=str(device), out_dir=str(work_dir), progress=_env.progress_enabled(progress))
    result = train.train_from_config(config, resume="auto")
    if result.checkpoint is None:
        raise RuntimeError(f"diffcore.train wrote no checkpoint for {spec}")
    shutil.copytree(result.checkpoint, Path(out_dir) / "checkpoint")
    if images.shape[0] != spec["n"]:
        raise ValueError(f"images: expected the {spec['n']} training images, got {images.shape[0]}")
    return {"final_loss": result.final_loss, "step": result.step, "images_seen": result.images_seen}


def load_model(model_dir: Path, device="cpu"):
    """The EMA model of a finished model unit as a denoiser ``D(x, sigma)``."""
    from diffcore import train

    return train.load_trained_model(Path(model_dir) / "checkpoint", which="ema").to(device).eval()


def train_cli_main(argv: list[str]) -> int:
    """The ``diffcore train`` command: delegated to diffcore.train's argument parser."""
    from diffcore import train

    return int(train.main_train(argv) or 0)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
