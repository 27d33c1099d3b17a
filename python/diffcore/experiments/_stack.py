"""The real hooks of the studies: what they take from the sampler, trainer, models, data and ops.

Studies call the stack only through a hooks object (:mod:`diffcore.experiments.hooks`, which
assembles these functions; tests inject closed-form stand-ins). Each hook adapts one call to the
shape the studies need (CPU float32 samples, a study's model spec as a training request); nothing
here falls back to anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffcore import _env
from diffcore.experiments import base
from diffcore.ops import knn  # noqa: F401  (the studies' k-NN)
from diffcore.train import ddp
from diffcore.train.loss import EDMLoss

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``diffcore.train``'s device resolution, on this process's GPU under torchrun (LOCAL_RANK)."""
    return ddp.resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))


def one_thread_on_cpu(device) -> _env.torch_threads:
    """The intra-op threads a study trains and samples with: one on the CPU, whatever
    ``torch_threads``, the launcher (torchrun sets ``OMP_NUM_THREADS=1``) or the machine. Torch's
    CPU convolutions (oneDNN: the weight gradients, strided 1x1 convolutions) and long sums add
    per-thread partial results, so their float32 rounding, and thus a model's weights and samples,
    would change with the thread count. Studies run models in parallel across processes
    (``train_workers``) and stacked ensembles instead. Other devices: unchanged."""
    return _env.torch_threads(1 if torch.device(device).type == "cpu" else 0)


def sample(
    denoiser,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    steps: int = 18,
    solver: str = "heun",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    device="cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Deterministic samples ``[len(seeds), *shape]`` (float32, CPU), sample i from seed i only
    (one intra-op thread on the CPU: :func:`one_thread_on_cpu`)."""
    from diffcore import sampler

    with torch.no_grad(), one_thread_on_cpu(device):
        out = sampler.sample(
            denoiser,
            seeds=list(seeds),
            shape=tuple(shape),
            steps=steps,
            solver=solver,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            device=device,
            batch_size=batch_size,
            progress=_env.progress_enabled(progress),
        )
    return out.float().cpu()


DATASETS_WITH_A_FOLDER = ("cifar10", "image_folder")  # read from a local folder: need data_root


def data_spec(dataset: str, root: str = "") -> dict:
    """The ``diffcore.data`` spec of a study's ``dataset`` and ``data_root`` (ConfigError naming
    ``data_root`` for a dataset read from a local folder without one)."""
    if dataset in DATASETS_WITH_A_FOLDER and not root:
        from diffcore.experiments.base import ConfigError

        raise ConfigError(f"data_root: dataset {dataset!r} is read from a local folder; set it (--set data_root=PATH)")
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


# ----------------------------------------------------------------------------- models and training

# The training recipe a study's model spec may carry (absent keys: EDM preconditioning and loss,
# no augmentation). "vp": EDM's VP preconditioning with its loss; augment_p > 0: EDM's non-leaky
# augmentation (diffcore.train.augment) with its 9 augment labels passed to the UNet.
PRECONDITIONINGS = ("edm", "vp")


# EDM's training noise levels, ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1): the loss's defaults.
EDM_SIGMA_LOGNORMAL = (EDMLoss().P_mean, EDMLoss().P_std)


def recipe_spec(
    precond: str,
    augment_p: float,
    sigma_lognormal: tuple[float, float] = EDM_SIGMA_LOGNORMAL,
    target: tuple[str, float] = ("clean", 0.0),
    log_uniform: tuple[float, float, float] = (0.0, 0.002, 80.0),
) -> dict:
    """The recipe fields of a model spec, only those that differ from EDM without augmentation
    (so the specs, and the finished units, of studies that use neither stay as they were).
    ``sigma_lognormal``: ``(P_mean, P_std)`` of the training noise levels (EDM preconditioning only).
    ``target``: the EDM loss's ``(target, target_sigma_min)`` (``diffcore.train.loss.EDMLoss``).
    ``log_uniform``: ``(fraction, sigma_lo, sigma_hi)``, the share of training noise levels drawn
    log-uniform over ``[sigma_lo, sigma_hi]`` (EDMLoss's ``log_uniform_fraction``; 0: none)."""
    if precond not in PRECONDITIONINGS:
        raise ValueError(f"precond: expected one of {', '.join(PRECONDITIONINGS)}, got {precond!r}")
    if not 0 <= augment_p <= 1:
        raise ValueError(f"augment_p: expected a probability in [0, 1], got {augment_p}")
    sigma_lognormal = tuple(float(v) for v in sigma_lognormal)
    if len(sigma_lognormal) != 2 or not sigma_lognormal[1] > 0:
        raise ValueError(f"sigma_lognormal: expected (P_mean, P_std > 0), got {sigma_lognormal}")
    custom_sigmas = sigma_lognormal != EDM_SIGMA_LOGNORMAL
    if custom_sigmas and precond != "edm":
        raise ValueError(
            f"sigma_lognormal: only EDM preconditioning draws ln sigma ~ N(P_mean, P_std^2); "
            f"precond {precond!r} has its own noise levels"
        )
    return {
        **({"precond": precond} if precond != "edm" else {}),
        **({"augment_p": augment_p} if augment_p > 0 else {}),
        **({"sigma_lognormal": list(sigma_lognormal)} if custom_sigmas else {}),
        **_target_spec(precond, augment_p, *target),
        **_log_uniform_spec(precond, *log_uniform),
    }


def _log_uniform_spec(precond: str, fraction: float, lo: float, hi: float) -> dict:
    """``{"sigma_log_uniform": [fraction, lo, hi]}`` when a share of the noise levels is log-uniform."""
    if not fraction:
        return {}
    EDMLoss(log_uniform_fraction=fraction, log_uniform_range=(lo, hi))
    if precond != "edm":
        raise ValueError(f"log_uniform: only EDM preconditioning takes a log-uniform share, got precond {precond!r}")
    return {"sigma_log_uniform": [float(fraction), float(lo), float(hi)]}


def _target_spec(precond: str, augment_p: float, target: str, sigma_min: float) -> dict:
    """``{"target": ..., "target_sigma_min": ...}`` for a non-default EDM loss target (checked by EDMLoss)."""
    if target == "clean" and not sigma_min:
        return {}
    EDMLoss(target=target, target_sigma_min=sigma_min)
    if precond != "edm" or augment_p > 0:
        raise ValueError(
            f"target: the {target!r} target needs EDM preconditioning without augmentation, "
            f"got precond {precond!r}, augment_p {augment_p}"
        )
    return {"target": target, "target_sigma_min": float(sigma_min)}


def model_unit_spec(config: Any, width: int, n: int, seed: int) -> dict:
    """The spec of the model unit (width, n, seed) of a study that trains UNets on nested subsets
    (reproducibility, hidden-gaussian): ``config`` is the study's config or its fields as
    results.json holds them. Recipe fields the config lacks take EDM's defaults
    (:func:`recipe_spec`), so a reproducibility run's models are found by the same spec."""
    c = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    sigma_lognormal = (c["sigma_p_mean"], c["sigma_p_std"]) if "sigma_p_mean" in c else EDM_SIGMA_LOGNORMAL
    target = (c["train_target"], c["target_sigma_min"]) if "train_target" in c else ("clean", 0.0)
    log_uniform = (
        (c["sigma_log_uniform"], c["sigma_min"], c["sigma_max"]) if c.get("sigma_log_uniform") else (0.0, 0.002, 80.0)
    )
    return {
        "dataset": c["dataset"],
        "n": n,
        "subset_seed": c["subset_seed"],
        "data_root": c["data_root"],
        "model_preset": c["model_preset"],
        "width": width,
        "seed": seed,
        "train_steps": c["train_steps"],
        "batch_size": c["batch_size"],
        "learning_rate": c["learning_rate"],
        "lr_warmup_images": c["lr_warmup_images"],
        **base.data_digest(c["data_root"]),
        **recipe_spec(c.get("precond", "edm"), c.get("augment_p", 0.0), sigma_lognormal, target, log_uniform),
    }


@dataclass
class ModelOfSubset:
    """A model of a study that trains on nested subsets: its unit name (``label``), width, N and seed."""

    label: str
    width: int
    n: int
    seed: int


def model_unit_name(width: int, n: int, seed: int) -> str:
    """The unit name of model (width, n, seed): ``units/models/w{width}-n{n}-s{seed}``."""
    return f"w{width}-n{n}-s{seed}"


def model_spec(spec: dict) -> dict:
    """The ``diffcore.train`` model spec of a study's model spec (UNet preset, width, recipe)."""
    model = {"name": "ddpmpp", "preset": spec["model_preset"], "model_channels": spec["width"]}
    if spec.get("precond", "edm") != "edm":
        model["precond"] = spec["precond"]
    if spec.get("augment_p", 0) > 0:
        from diffcore.train.augment import AugmentPipe

        model["augment_dim"] = AugmentPipe().label_dim
    return model


def training_request(
    spec: dict,
    work_dir,
    device="cpu",
    progress: bool = True,
    *,
    data: dict | None = None,
    model: dict | None = None,
    **options,
):
    """The validated ``diffcore.train.TrainConfig`` of a study's model spec, the one way every study
    asks ``diffcore.train`` for a model; raises before anything is trained.

    ``spec``: train_steps, batch_size, learning_rate, lr_warmup_images, seed, the recipe keys of
    :func:`recipe_spec`, and (unless ``data`` / ``model`` are given) dataset, data_root, n,
    subset_seed (a nested subset; or ``indices``, the n positions of a subset that is not nested)
    and model_preset, width (a DDPM++ UNet, :func:`model_spec`).
    ``data`` / ``model``: the trainer's data and model specs where the study trains on something
    else (a whole labelled dataset, an image folder) or another model (class-conditional,
    multistage). ``options``: further ``TrainConfig`` fields (checkpoint_every, log_every,
    class_conditional, label_dropout, ema_halflife_images, augment, ...)."""
    from diffcore import train

    if data is None and "indices" in spec:  # a subset that is not nested (one half of a split)
        if len(spec["indices"]) != spec["n"]:
            raise ValueError(f"spec: {len(spec['indices'])} indices for n = {spec['n']}")
        data = {**data_spec(spec["dataset"], spec.get("data_root", "")), "indices": list(spec["indices"])}
    if data is None:
        data = {
            **data_spec(spec["dataset"], spec.get("data_root", "")),
            "subset": spec["n"],
            "subset_seed": spec["subset_seed"],
        }
    fields = dict(
        data=data,
        model=model_spec(spec) if model is None else model,
        steps=spec["train_steps"],
        batch_size=spec["batch_size"],
        lr=spec["learning_rate"],
        lr_warmup_images=spec["lr_warmup_images"],
        seed=spec["seed"],
        loss=spec.get("precond", "edm"),
        loss_options=_loss_options(spec),
        augment="edm" if spec.get("augment_p", 0) > 0 else "none",
        augment_p=spec.get("augment_p", 0.12),
        device=str(device),
        out_dir=str(work_dir),
        progress=_env.progress_enabled(progress),
    )
    if spec.get("keep_steps"):  # checkpoints kept at these steps (train_model copies them out)
        fields["keep_steps"] = tuple(int(step) for step in spec["keep_steps"])
    return train.TrainConfig(**{**fields, **options})


def _loss_options(spec: dict) -> dict:
    """The EDM loss's ``P_mean``, ``P_std`` when the spec sets ``sigma_lognormal``, and its ``target``,
    ``target_sigma_min`` when the spec sets them (else the loss's defaults)."""
    options = {key: spec[key] for key in ("target", "target_sigma_min") if key in spec}
    if "sigma_lognormal" in spec:
        options["P_mean"], options["P_std"] = spec["sigma_lognormal"]
    if "sigma_log_uniform" in spec:
        fraction, lo, hi = spec["sigma_log_uniform"]
        options["log_uniform_fraction"], options["log_uniform_range"] = fraction, [lo, hi]
    return options


def train_model(
    images: torch.Tensor, spec: dict, out_dir: Path, work_dir: Path, *, device="cpu", progress: bool = True
) -> dict:
    """Train the model a study's ``spec`` describes with diffcore.train; checkpoints live in
    ``work_dir`` (a killed run resumes from them), the final one is copied to ``out_dir/checkpoint``.
    ``images`` are the N training images (the trainer reloads the same nested subset). A spec with
    ``keep_steps`` also keeps the checkpoints at those steps, copied to
    ``out_dir/steps/step_<t>/checkpoint`` (:func:`load_model` of ``out_dir/steps/step_<t>``). One
    intra-op thread on the CPU (:func:`one_thread_on_cpu`)."""
    from diffcore import train

    if images.shape[0] != spec["n"]:
        raise ValueError(f"images: expected the {spec['n']} training images, got {images.shape[0]}")
    with one_thread_on_cpu(device):
        result = train.train_from_config(training_request(spec, work_dir, device, progress), resume="auto")
    if result.checkpoint is None:
        raise RuntimeError(f"diffcore.train wrote no checkpoint for {spec}")
    shutil.copytree(result.checkpoint, Path(out_dir) / "checkpoint")
    for step in spec.get("keep_steps", ()):  # loadable as load_model(out_dir / "steps" / step_name(step))
        shutil.copytree(
            Path(work_dir) / "checkpoints" / step_name(step), Path(out_dir) / "steps" / step_name(step) / "checkpoint"
        )
    return {"final_loss": result.final_loss, "step": result.step, "images_seen": result.images_seen}


def step_name(step: int) -> str:
    """The trainer's folder name of the checkpoint at ``step`` (``step_000000100``)."""
    return f"step_{int(step):09d}"


def train_ensemble(
    images: Sequence[torch.Tensor],
    specs: Sequence[dict],
    work_dirs: Sequence[Path],
    *,
    device="cpu",
    progress: bool = True,
) -> list[dict]:
    """Train the models of ``specs`` (one architecture and recipe; they may differ in n and seed) as
    one :mod:`diffcore.train.ensemble` in their ``work_dirs``, up to their final step; :func:`train_model`
    with the same spec and work_dir then finds the final checkpoint and only copies it. ``images``:
    each model's training images. Returns per model ``final_loss``, ``ensemble_size`` and
    ``ensemble_train_seconds`` (the whole ensemble's wall time)."""
    from diffcore.train import ensemble

    for index, (train_images, spec) in enumerate(zip(images, specs)):
        if train_images.shape[0] != spec["n"]:
            raise ValueError(f"images[{index}]: expected the {spec['n']} training images, got {train_images.shape[0]}")
    configs = [training_request(spec, work_dir, device, progress) for spec, work_dir in zip(specs, work_dirs)]
    start = time.perf_counter()
    with one_thread_on_cpu(device):
        results = ensemble.train_ensemble(configs, resume="auto")
    seconds = time.perf_counter() - start
    log.info("trained an ensemble of %d models in %.1f s", len(configs), seconds)
    return [
        {"final_loss": r.final_loss, "ensemble_size": len(configs), "ensemble_train_seconds": seconds} for r in results
    ]


def load_model(model_dir: Path, device="cpu"):
    """The EMA model of a finished model unit as a denoiser ``D(x, sigma)``."""
    from diffcore import train

    return train.load_trained_model(Path(model_dir) / "checkpoint", which="ema").to(device).eval()


REPRODUCIBILITY = "reproducibility"

# The checks of the fields every config of a ReproducibilityModelsStudy has (its FIELD_CHECKS take
# them with ``**``; models_from is checked by base.VOCABULARY_CHECKS): which reproducibility run,
# and which of its models (an empty tuple: all of them, unlike the vocabulary's widths and sizes).
REPRODUCIBILITY_MODELS_CHECKS: dict[str, base.Check] = {
    "reproducibility_preset": base.text,
    "widths": base.tuple_of(base.positive, min_len=0),  # (): every width of the run
    "sizes": base.tuple_of(base.integer(2), min_len=0),  # (): every N of the run
}


def check_reproducibility_preset(config: Any) -> None:
    """Without ``models_from``, the config's ``reproducibility_preset`` must name a preset of the
    reproducibility study (reached through the registry); ConfigError naming it otherwise."""
    from diffcore.experiments import experiment

    if not config.models_from:
        base.one_of(*experiment(REPRODUCIBILITY).PRESETS)("reproducibility_preset", config.reproducibility_preset)


def reproducibility_run(
    models_from: str | None,
    preset: str,
    widths: Sequence[int],
    sizes: Sequence[int],
    folder: Path,
    *,
    hooks,
    device: str,
    progress: bool,
) -> tuple[dict, Path, float | None]:
    """The reproducibility study's results and run folder, for a study that measures its models:
    read from ``models_from`` (a finished reproducibility run; ConfigError naming ``models_from``
    otherwise), or that study run in ``folder`` from ``preset`` with ``widths`` / ``sizes`` (empty:
    the preset's) and the preset's first training seed. Returns (results, folder, seconds spent
    running it here, None when read). The study is reached through the registry: no study imports
    another."""
    from diffcore._files import load_json
    from diffcore.experiments import experiment

    if models_from:
        root = Path(models_from)
        results_path = root / "results.json"
        if not results_path.is_file():
            raise base.ConfigError(f"models_from: {root} holds no results.json of a finished reproducibility run")
        results = load_json(results_path, what="models_from: results", follow=False)
        if results.get("experiment") != REPRODUCIBILITY:
            raise base.ConfigError(
                f"models_from: {results_path} is a {results.get('experiment')!r} run, not a reproducibility run"
            )
        return results, root, None
    reproducibility = experiment(REPRODUCIBILITY)
    config = reproducibility.PRESETS[preset]()
    config = dataclasses.replace(
        config, widths=widths or config.widths, sizes=sizes or config.sizes, train_seeds=config.train_seeds[:1]
    )
    start = time.perf_counter()
    results = reproducibility.run(config, folder, hooks=hooks, device=device, progress=progress)
    return results, folder, time.perf_counter() - start


@dataclass
class ModelOfReproducibilityRun(ModelOfSubset):
    """A finished model unit of a reproducibility run (``path``: its folder, holding checkpoint/),
    with that run's GL and memorized ratio of the model."""

    path: Path
    gl: float | None
    memorized_ratio: float | None


def reproducibility_models(
    results: dict, root: Path, widths: Sequence[int], sizes: Sequence[int]
) -> list[ModelOfReproducibilityRun]:
    """The models of a reproducibility run (``results`` and its folder ``root``) that ``widths`` and
    ``sizes`` select (empty: all), sorted by (width, n, seed). ConfigError naming ``models_from``
    for a model unit missing from ``root``, naming ``widths, sizes`` when none is selected."""
    found = []
    for row in results["models"]:
        if (widths and row["width"] not in widths) or (sizes and row["n"] not in sizes):
            continue
        label = model_unit_name(row["width"], row["n"], row["seed"])
        path = Path(root) / "units" / "models" / label
        if not (path / "MANIFEST.json").is_file():
            raise base.ConfigError(f"models_from: model unit {path} is missing")
        found.append(
            ModelOfReproducibilityRun(
                label, row["width"], row["n"], row["seed"], path, row["gl"], row["memorized_ratio"]
            )
        )
    if not found:
        raise base.ConfigError(f"widths, sizes: no model of {root} matches widths={widths}, sizes={sizes}")
    return sorted(found, key=lambda m: (m.width, m.n, m.seed))


class ReproducibilityModelsStudy:
    """The common body of a study that measures the reproducibility study's models (locality,
    representation): its config ``c`` (fields ``models_from``, ``reproducibility_preset``,
    ``widths``, ``sizes``), workspace ``ws``, ``hooks`` (the real stack when None), device,
    progress and the seconds of each phase (``seconds``)."""

    def __init__(self, config, out, hooks, device: str, progress: bool):
        from diffcore.experiments import hooks as study_hooks

        self.c = config
        self.ws = base.Workspace(out)
        self.hooks = hooks or study_hooks.default_hooks()
        self.default_stack = hooks is None
        self.device = device
        self.progress = progress
        self.seconds: dict[str, float] = {}

    def reproducibility_run(self) -> tuple[dict, Path]:
        """The reproducibility results and folder: ``models_from``, or that study run here
        (:func:`reproducibility_run`; its time is ``seconds["reproducibility"]``)."""
        c = self.c
        results, root, seconds = reproducibility_run(
            c.models_from,
            c.reproducibility_preset,
            c.widths,
            c.sizes,
            self.ws.root / "reproducibility",
            hooks=None if self.default_stack else self.hooks,
            device=self.device,
            progress=self.progress,
        )
        if seconds is not None:
            self.seconds["reproducibility"] = seconds
        return results, root

    def models(self, results: dict, root: Path) -> list[ModelOfReproducibilityRun]:
        """The selected models of the reproducibility run (:func:`reproducibility_models`)."""
        return reproducibility_models(results, root, self.c.widths, self.c.sizes)

    def results(self, name: str, root: Path, fields: dict) -> dict:
        """results.json's content, as strict JSON reads it back: the study ``name``, its config,
        the reproducibility run's folder ``root``, the study's own ``fields`` and :attr:`seconds`."""
        return json.loads(
            base.json_dumps(
                {
                    "experiment": name,
                    "config": dataclasses.asdict(self.c),
                    "models_from": str(root),
                    **fields,
                    "seconds": self.seconds,
                }
            )
        )
