"""The ONE place where experiments meet the rest of the stack (ops, sampler, models, train, data).

Every experiment and the CLI reach the sampler, the trainer, the models, the datasets and the ops
only through the functions below, so the contracts they assume live here and nowhere else. The
contracts assumed (from the other branches of the project):

- ``diffcore.ops.knn(queries, train, k=2) -> (distances [B, k] float32 l2, indices [B, k] int64)``
- ``diffcore.ops.empirical_denoise(x, train, sigma) -> x0_hat``
- ``diffcore.sampler.karras_sigmas(n, sigma_min, sigma_max, rho)`` (with a trailing 0),
  ``diffcore.sampler.noise_from_seeds(seeds, shape, device, dtype)`` (unit Gaussian, per seed),
  ``diffcore.sampler.sample_<solver>(denoiser, x, sigmas, progress=...)``
- ``diffcore.data.load_digits() -> (images [1797, 1, 8, 8] in [-1, 1], labels)``,
  ``diffcore.data.subset(dataset, n, seed)`` (nested: the first n of one seeded permutation),
  ``diffcore.data.load_cifar10(root)``
- ``diffcore.train.train(...)`` with resumable checkpoints, ``diffcore.train.load_denoiser(path)``,
  ``diffcore.train.main(argv)`` (the ``diffcore train`` command)

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
    from diffcore import ops

    return ops.knn(queries, train, k=k)


def empirical_denoise(x: torch.Tensor, train: torch.Tensor, sigma) -> torch.Tensor:
    from diffcore import ops

    return ops.empirical_denoise(x, train, sigma)


def empirical_denoiser(train: torch.Tensor):
    """``D(x, sigma)`` of the empirical optimal denoiser of ``train [N, ...]``."""
    def denoise(x, sigma):
        return empirical_denoise(x, train.to(x.device), sigma)
    return denoise


# ----------------------------------------------------------------------------- sampler

def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    from diffcore import sampler

    return sampler.karras_sigmas(steps, sigma_min, sigma_max, rho)


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], device, dtype) -> torch.Tensor:
    from diffcore import sampler

    return sampler.noise_from_seeds(seeds, shape, device=device, dtype=dtype)


def solver_function(solver: str):
    from diffcore import sampler

    name = f"sample_{solver}"
    if not hasattr(sampler, name):
        raise ValueError(f"solver: diffcore.sampler has no {name}")
    return getattr(sampler, name)


def sample(denoiser, seeds: Sequence[int], shape: Sequence[int], *, steps: int = 18, solver: str = "heun",
           sigma_min: float = 0.002, sigma_max: float = 80.0, device="cpu", dtype=torch.float32,
           batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Deterministic samples ``[len(seeds), *shape]`` (float32, CPU), sample i from seed i only."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max).to(device)
    solve = solver_function(solver)
    seeds = list(seeds)
    out = []
    starts = range(0, len(seeds), batch_size)
    if _env.progress_enabled(progress) and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch", leave=False)
    for start in starts:
        z = noise_from_seeds(seeds[start:start + batch_size], shape, device, dtype)
        with torch.no_grad():
            out.append(solve(denoiser, z * sigmas[0], sigmas).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- data

def load_dataset(name: str, root: str = "") -> torch.Tensor:
    """The image pool of a dataset, ``[P, C, H, W]`` float32 in [-1, 1]."""
    from diffcore import data

    if name == "digits":
        return data.load_digits()[0]
    if name == "cifar10":
        if not root:
            raise ValueError("data_root: cifar10 needs the folder of the local CIFAR-10 copy (--set data_root=...)")
        images = data.load_cifar10(root)
        return images[0] if isinstance(images, tuple) else images
    raise ValueError(f"dataset: expected 'digits' or 'cifar10', got {name!r}")


def subset(images: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested subset of size ``n``: ``(images [n, ...], indices [n])``."""
    from diffcore import data

    picked = data.subset(images, n, seed)
    if isinstance(picked, tuple):
        return picked[0], torch.as_tensor(picked[1])
    raise TypeError("diffcore.data.subset: expected (images, indices)")


# ----------------------------------------------------------------------------- models and training

def train_model(images: torch.Tensor, spec: dict, out_dir: Path, work_dir: Path, *, device="cpu",
                progress: bool = True) -> dict:
    """Train a denoiser on ``images`` as described by ``spec`` (width, steps, seed, batch size,
    learning rate); checkpoints go to ``work_dir`` (resumable), the final model to ``out_dir``.
    Returns metadata (e.g. the final loss)."""
    from diffcore import train

    result = train.train(images=images, model_channels=spec["width"], steps=spec["train_steps"],
                         seed=spec["seed"], batch_size=spec["batch_size"], lr=spec["learning_rate"],
                         checkpoint_dir=str(work_dir), out=str(Path(out_dir) / "model.safetensors"),
                         device=device, progress=progress)
    return dict(result) if isinstance(result, dict) else {}


def load_model(model_dir: Path, device="cpu"):
    """The trained model in ``model_dir`` as a denoiser ``D(x, sigma)``."""
    from diffcore import train

    return train.load_denoiser(str(Path(model_dir) / "model.safetensors"), device=device)


def train_cli_main(argv: list[str]) -> int:
    """The ``diffcore train`` command: delegated to diffcore.train's argument parser."""
    from diffcore import train

    return int(train.main(argv) or 0)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
