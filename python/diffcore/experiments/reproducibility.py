"""Reproducibility and generalization against training-set size (docs/papers.md section 1).

For each width, each nested subset size N and each training seed: train a model (or reuse the
finished one), sample the same seeds with the deterministic sampler, and measure

- GL: the fraction of samples whose most similar training image is below the similarity threshold,
  with the memorization ratio (|x - NN1| / |x - NN2| < 1/3, Gu et al.) beside it;
- RP between every pair of models at the same N (two seeds of one width; different widths);
- RP between each model and the empirical optimal denoiser of its N images, sampled from the
  same seeds.

Outputs (under ``out``): ``results.json``, ``models.csv``, ``pairs.csv``, ``figure1.png`` (RP and
GL against N, one curve per width), ``grids/*.png`` (each sample above its nearest training
image), ``timings.json`` (training / sampling / metrics seconds; not part of the results). Every
model, sample set and metric is a resumable unit (see :mod:`diffcore.experiments.base`): kill the
run at any point and run it again to continue; it ends with the same ``results.json``.

Train, sample, data and k-NN come from :class:`StudyHooks`; the default hooks are those of
:mod:`diffcore.experiments.hooks`, and tests inject closed-form stand-ins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcore import _env, metrics
from diffcore._progress import Progress
from diffcore.experiments import _stack, base, hooks as study_hooks, plotting, recipes
from diffcore.experiments.hooks import StudyHooks
from diffcore.metrics import intervals

log = logging.getLogger(__name__)

NAME = "reproducibility"


@dataclass(frozen=True)
class ReproducibilityConfig:
    """What the study computes. Everything here defines the results; runtime options (device,
    progress bars) are arguments of :func:`run` instead, so a run can resume on another device."""

    dataset: str = "digits"  # digits (embedded) | cifar10 (local folder)
    data_root: str = ""  # folder of the local CIFAR-10 copy
    model_preset: str = "ddpmpp-digits"  # diffcore.models UNet preset (architecture)
    widths: tuple[int, ...] = (16, 32)  # base channels of the UNet (model_channels)
    sizes: tuple[int, ...] = (16, 64, 256, 1024)  # nested subset sizes N
    train_seeds: tuple[int, ...] = (0, 1)  # one model per seed; 2+ seeds give same-width RP
    subset_seed: int = 0  # seed of the nested subsets' permutation
    train_steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_warmup_images: int = 1000  # linear learning-rate ramp (EDM uses 10M for CIFAR-10)
    precond: str = "edm"  # edm | vp (EDM's VP preconditioning and loss)
    augment_p: float = 0.0  # EDM's non-leaky augmentation probability (0: off)
    # share of training noise levels drawn log-uniform over [sigma_min, sigma_max], the sampled
    # range (EDMLoss's log_uniform_fraction; precond=edm). 0, every preset: EDM's lognormal alone,
    # as EDM and the paper train; it puts ~1% of draws above sigma 5 (docs/experiments.md)
    sigma_log_uniform: float = 0.0
    sample_seed_start: int = 100000  # samples use seeds start .. start + num_samples - 1
    num_samples: int = 256
    sampler_steps: int = 18  # Heun 18 steps = 35 evaluations (EDM)
    solver: str = "heun"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    similarity: str = "cosine"  # cosine | l2 | sscd:PATH | raw:PATH (descriptor file)
    threshold: float | None = None  # None: 0.6 for descriptors, calibrated in pixel space
    calibration_quantile: float = 0.95
    memorization_ratio: float = 1.0 / 3.0  # Gu et al.
    grid_samples: int = 16  # samples shown per grid
    # nested: every N a prefix of one permutation (the paper's Figure 1); disjoint: per N, two
    # models on the first N images of two non-overlapping halves of the pool (strong
    # generalization, Kadkhodaie et al.; disjoint_halves), near-duplicates across them removed
    subsets: str = "nested"
    duplicate_rms: float = 0.1  # near-duplicates: RMS pixel difference below this (images in [-1, 1])
    # intra-op CPU threads per process for data and measures (0: torch's default); models train
    # and sample with one thread on the CPU (results do not depend on the thread count)
    torch_threads: int = 0
    train_workers: int = 1  # models trained at once, one process each (runtime only)
    train_ensemble: int = 1  # models of one width and seed per stacked ensemble (runtime only)

    def result_fields(self) -> dict:
        """The fields that define the results (``config.json`` binds an output folder to these);
        :data:`RUNTIME_FIELDS` may change between a run and its resume. With nested subsets (the
        default) ``subsets`` and ``duplicate_rms`` are left out, and ``sigma_log_uniform`` when 0,
        so a folder made before they existed resumes."""
        skip = RUNTIME_FIELDS | (NESTED_ONLY_SKIPPED if self.subsets == "nested" else frozenset())
        if not self.sigma_log_uniform:
            skip |= {"sigma_log_uniform"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def seeds(self) -> list[int]:
        return list(range(self.sample_seed_start, self.sample_seed_start + self.num_samples))

    def validate(self, pool_size: int | None = None) -> None:
        """Raise ConfigError naming the first field out of its range (``pool_size``: the number of
        images of the dataset, once loaded, bounds ``sizes``)."""
        base.check_fields(self, FIELD_CHECKS)
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        base.check_sigmas(self.sigma_min, self.sigma_max)
        if self.sigma_log_uniform and self.precond != "edm":
            raise base.ConfigError(
                "sigma_log_uniform: only precond=edm takes a log-uniform share of noise levels, "
                f"got precond={self.precond}"
            )
        if pool_size is not None and max(self.sizes) > pool_size:
            raise base.ConfigError(f"sizes: N = {max(self.sizes)} exceeds the {pool_size} images of {self.dataset}")
        if pool_size is not None and self.subsets == "disjoint" and max(self.sizes) > pool_size // 2:
            raise base.ConfigError(
                f"sizes: with subsets=disjoint each N comes from one half of the {pool_size} images of "
                f"{self.dataset}, so N <= {pool_size // 2}; got {max(self.sizes)}"
            )


FIELD_CHECKS: dict[str, base.Check] = {
    "calibration_quantile": base.number(0, 1),
    "memorization_ratio": base.number(0, 1, lo_open=True),  # |x - NN1| / |x - NN2| <= 1
    "train_workers": base.positive,
    "train_ensemble": base.positive,
    "subsets": base.one_of("nested", "disjoint"),
    "duplicate_rms": base.number(0),
}


# How many models train at once changes the wall time, not the results (each model's training is
# deterministic on its own), so it is not bound to the output folder. Training models as one
# stacked ensemble (diffcore.train.ensemble) reassociates the sums of their forward and backward
# passes: it changes a model's weights at the level of float rounding, not beyond.
RUNTIME_FIELDS = frozenset({"train_workers", "train_ensemble"})
NESTED_ONLY_SKIPPED = frozenset({"subsets", "duplicate_rms"})  # fields of subsets=disjoint only


def _quick() -> ReproducibilityConfig:
    """Embedded digits, the light 8x8 UNet (ddpmpp-digits-light: one block per level, no dropout)
    at widths 8 and 16, N = 16 .. 1797 (all digits), 1000 steps at batch 32 for every model, two
    worker processes of one thread each that train and sample, the five models of a width trained
    as one stacked ensemble (docs/experiments.md, "The quick recipe", has the measurements behind
    each choice and the old recipe beside it).

    Issue 19 chose it by measurement: a training step costs ~c x width x batch on the CPU (8x8
    tensors, convolution-bound), so widths 8/16 at batch 32 cost ~4x less per step than the old
    16/32 at batch 64, and 1000 steps still memorize N = 16 at both widths (GL 0.06 / 0.00) while
    N >= 128 generalize; the widths part at N = 64 (GL 0.97 / 0.66), where RP across widths dips
    (0.56 -> 0.23 -> 0.59). bf16 autocast buys nothing at these widths on a native-bf16 CPU and
    costs ~10x on an AVX2-only one, so the preset trains in fp32 everywhere.
    ``--set train_seeds=0,1`` adds the same-width RP pairs at twice the training time."""
    return ReproducibilityConfig(
        **recipes.DIGITS_QUICK_TRAINING,
        widths=(8, 16),
        sizes=(16, 64, 128, 256, 1797),
        train_seeds=(0,),
        num_samples=256,
        sampler_steps=18,
        torch_threads=1,
        train_workers=2,
        train_ensemble=5,
    )


def _seeds() -> ReproducibilityConfig:
    """The quick preset with three training seeds per (width, N): same-width RP between
    seeds beside RP across widths, and seeds-t intervals across the seeds on every curve. The
    models of one width and seed train as one stacked ensemble, as in the quick preset, so the
    training costs three times the quick preset's (not timed on a quiet machine yet)."""
    return dataclasses.replace(_quick(), train_seeds=(0, 1, 2))


def _paper() -> ReproducibilityConfig:
    """The reproducibility paper's setting as its public code trains it (docs/papers.md section 1;
    docs/experiments.md has the table, ours beside theirs): EDM's DDPM++ (``--arch=ddpmpp``,
    dropout 0.13) at widths 64/128/256 on nested CIFAR-10 subsets N = 2^6 .. 2^14, VP
    preconditioning and loss (``--precond vp``), batch 128, lr 1e-3 with EDM's 10 Mimg warm-up,
    EMA half-life 0.5 Mimg, 50 Mimg of training (``--duration 50``: 390 625 steps), EDM's
    augmentation at p = 0.12 with augment labels; 10k samples per model from seeds
    100000-109999 (Heun, 18 steps). Set data_root, and ``similarity=sscd:PATH`` (the SSCD file you
    have) for the paper's measure at threshold 0.6. Add a second seed with --set train_seeds=0,1."""
    return ReproducibilityConfig(
        **recipes.EDM_CIFAR10_TRAINING,
        widths=(64, 128, 256),
        sizes=tuple(2**k for k in range(6, 15)),
        train_seeds=(0,),
        batch_size=128,
        precond="vp",
        augment_p=0.12,
        num_samples=10_000,
        sample_seed_start=100000,
        sampler_steps=18,
        grid_samples=32,
    )


def _tiny() -> ReproducibilityConfig:
    """Seconds, for tests (with stand-in hooks) and smoke runs."""
    return ReproducibilityConfig(
        widths=(4, 8),
        sizes=(8, 512),
        train_seeds=(0, 1),
        train_steps=20,
        batch_size=16,
        num_samples=24,
        sampler_steps=8,
        grid_samples=8,
    )


def _disjoint() -> ReproducibilityConfig:
    """Strong generalization (Kadkhodaie et al., ICLR 2024), fixed before looking: the
    quick preset's recipe (light UNet, 1000 steps at batch 32, lr 1e-3, EDM's noise levels) at its
    wider width 16, per N two models on the first N images of two non-overlapping halves of the
    digits (:func:`disjoint_halves`; near-duplicates, RMS pixel difference below 0.1, removed), N =
    16, 64, 128, 256 and 898 (half of the digits); the five models of a half train as one ensemble,
    one worker per half. Measures the similarity of the two models' samples from the same noise
    against each sample's similarity to its nearest training image (:func:`strong_generalization`)."""
    return dataclasses.replace(_quick(), widths=(16,), sizes=(16, 64, 128, 256, 898), subsets="disjoint")


PRESETS: dict[str, Callable[[], ReproducibilityConfig]] = {
    "quick": _quick,
    "seeds": _seeds,
    "disjoint": _disjoint,
    "paper": _paper,
    "tiny": _tiny,
}
CONFIG_CLASS = ReproducibilityConfig


# ----------------------------------------------------------------------------- units

# The spec of model unit (width, n, seed) of a run with a config (or its result fields as
# results.json holds them): what other studies train or reuse to get the same model.
model_spec = _stack.model_unit_spec
_model_name = _stack.model_unit_name
HALVES = ("a", "b")


def _member_name(width: int, n: int, seed: int, half: str | None) -> str:
    """``w{width}-n{n}-s{seed}``, with ``-a`` / ``-b`` for a model of one half (subsets=disjoint)."""
    name = _model_name(width, n, seed)
    return name if half is None else f"{name}-{half}"


def disjoint_halves(pool: torch.Tensor, seed: int, duplicate_rms: float, chunk: int = 1024) -> dict:
    """Two non-overlapping halves of ``pool`` [P, ...] for subsets=disjoint: ``{"a": indices [H],
    "b": indices [H], "pool": P, "removed": R, "half_size": H}``.

    The rule, fixed before any model was trained: images in the order of the nested subsets'
    permutation (``diffcore.data.subset_indices(P, P, seed)``); an image is dropped when an image
    earlier in that order lies within ``duplicate_rms`` of it in RMS pixel difference
    (``|x - y|_2 / sqrt(D)``, images in [-1, 1]), so no image of one half has a near-duplicate in
    the other (nor in its own); the first H = floor((P - R) / 2) kept images are half a, the next
    H half b. The training set of size N of a half is its first N images (nested within the half)."""
    from diffcore import data

    total = pool.shape[0]
    order = data.subset_indices(total, total, seed)
    flat = pool[order].reshape(total, -1).double()
    limit = duplicate_rms * math.sqrt(flat.shape[1])
    keep = torch.ones(total, dtype=torch.bool)
    for start in range(0, total, chunk):
        close = torch.cdist(flat[start : start + chunk], flat) < limit  # [chunk, P]
        earlier = torch.arange(total)[None, :] < torch.arange(start, min(start + chunk, total))[:, None]
        keep[start : start + chunk] = ~(close & earlier).any(1)
    kept = order[keep]
    half = kept.numel() // 2
    return {
        "a": kept[:half],
        "b": kept[half : 2 * half],
        "pool": total,
        "removed": total - kept.numel(),
        "half_size": half,
    }


def _save_tensor(path: Path, tensor: torch.Tensor) -> None:
    torch.save(tensor.detach().cpu().contiguous().clone(), path)


def _load_tensor(path: Path) -> torch.Tensor:
    return torch.load(path, map_location="cpu", weights_only=True)


class _Study:
    """One run of the study: config, workspace, hooks and the units made so far."""

    def __init__(
        self,
        config: ReproducibilityConfig,
        out: str | Path,
        hooks: StudyHooks,
        device: str,
        progress: bool,
        default_stack: bool = False,
        part: base.Participation | None = None,
    ):
        self.config = config
        self.part = part or base.Participation()  # this process's part of a sharded or distributed run
        self.default_stack = default_stack  # hooks of _stack: worker processes can rebuild them
        self.train_wall_seconds: float | None = None  # set when models were trained in workers
        self.ws = base.Workspace(out)
        self.hooks = hooks
        self.device = device
        self.progress = progress
        self.similarity = metrics.get_similarity(config.similarity, device=device)

    # specs -------------------------------------------------------------------
    def data_spec(self, n: int) -> dict:
        c = self.config
        return {"dataset": c.dataset, "n": n, "subset_seed": c.subset_seed, **base.data_digest(c.data_root)}

    def model_spec(self, width: int, n: int, seed: int) -> dict:
        return model_spec(self.config, width, n, seed)

    # disjoint halves (subsets=disjoint): a model is (width, n, seed, half), half "a" or "b" --------
    def halves(self, pool: torch.Tensor) -> dict:
        """:func:`disjoint_halves` of the pool (computed once)."""
        if getattr(self, "_halves", None) is None:
            self._halves = disjoint_halves(pool, self.config.subset_seed, self.config.duplicate_rms)
        return self._halves

    def member_spec(self, width: int, n: int, seed: int, half: str | None, pool: torch.Tensor) -> dict:
        """The model spec of (width, n, seed) on the nested subset (``half`` None) or on the first n
        images of one half (the trainer selects them by ``indices``)."""
        spec = self.model_spec(width, n, seed)
        if half is None:
            return spec
        indices = self.halves(pool)[half][:n]
        return {**spec, "half": half, "duplicate_rms": self.config.duplicate_rms, "indices": indices.tolist()}

    def train_images(self, pool: torch.Tensor, n: int, half: str | None) -> torch.Tensor:
        if half is None:
            return self.hooks.subset(pool, n, self.config.subset_seed)[0]
        return pool[self.halves(pool)[half][:n].to(pool.device)]

    def sampling_spec(self) -> dict:
        c = self.config
        return {
            "seed_start": c.sample_seed_start,
            "num_samples": c.num_samples,
            "steps": c.sampler_steps,
            "solver": c.solver,
            "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max,
        }

    # steps -------------------------------------------------------------------
    def threshold(self, pool: torch.Tensor) -> tuple[float, str]:
        c = self.config
        if c.threshold is not None:
            return float(c.threshold), "config"
        if self.similarity.default_threshold is not None:
            return float(self.similarity.default_threshold), "descriptor default (paper)"
        spec = {
            "dataset": c.dataset,
            "similarity": self.similarity.describe(),
            "quantile": c.calibration_quantile,
            "max_queries": 2048,
            "seed": 0,
        }

        def produce(tmp: Path, work: Path) -> dict:
            value = metrics.calibrate_threshold(
                pool, self.similarity, quantile=c.calibration_quantile, max_queries=2048, seed=0, knn=self.hooks.knn
            )
            base.atomic_write_json(tmp / "threshold.json", {"threshold": value})
            return {"threshold": value}

        unit = self.run_unit("calibration", "threshold", spec, produce, wait=True)
        value = json.loads(unit.file("threshold.json").read_text())["threshold"]
        return float(value), f"calibrated: quantile {c.calibration_quantile} of nearest-other similarity on the pool"

    def run_unit(self, kind: str, name: str, spec: dict, produce, wait: bool) -> base.Unit | None:
        """The workspace's unit (``wait=False``: None when another process is making it)."""
        return (self.ws.run_unit if wait else self.ws.try_run_unit)(kind, name, spec, produce)

    def empirical_spec(self, n: int) -> dict:
        return {**self.data_spec(n), "model": "empirical", **self.sampling_spec()}

    def sample_unit(
        self,
        name: str,
        spec: dict,
        make_denoiser: Callable[[], Any],
        shape,
        wait: bool = True,
        progress: bool | None = None,
    ) -> torch.Tensor | None:
        def produce(tmp: Path, work: Path) -> dict:
            c = self.config
            samples = self.hooks.sample(
                make_denoiser(),
                c.seeds(),
                shape,
                **base.sampler_settings(c),
                device=self.device,
                progress=self.progress if progress is None else progress,
            )
            _save_tensor(tmp / "samples.pt", samples.float())
            return {"shape": list(samples.shape)}

        unit = self.run_unit("samples", name, spec, produce, wait)
        return None if unit is None else _load_tensor(unit.file("samples.pt"))

    def results_head(self, threshold: float, threshold_source: str) -> dict:
        """What every results.json of the study starts with: the study, its config, the similarity,
        the threshold and where it came from."""
        return {
            "experiment": NAME,
            "config": self.config.result_fields(),
            "similarity": self.similarity.describe(),
            "threshold": threshold,
            "threshold_source": threshold_source,
        }

    def empirical_samples(self, n: int, train_images: torch.Tensor, shape, **options) -> torch.Tensor | None:
        """:meth:`sample_unit` of the empirical denoiser of the N training images ``train_images``
        (unit ``empirical-n{N}``; ``options``: its ``wait`` and ``progress``)."""
        return self.sample_unit(
            f"empirical-n{n}",
            self.empirical_spec(n),
            lambda: self.hooks.empirical_denoiser(train_images.to(self.device)),
            shape,
            **options,
        )

    def model_sample_spec(self, model: base.Unit) -> dict:
        """The spec of the samples of the finished model unit ``model``: its spec and the sampling's."""
        return {**model.spec, **self.sampling_spec()}

    def model_samples(self, name: str, model: base.Unit, shape, **options) -> torch.Tensor | None:
        """:meth:`sample_unit` ``name`` of the finished model unit ``model`` (:meth:`model_sample_spec`;
        ``options``: its ``wait`` and ``progress``)."""
        return self.sample_unit(
            name,
            self.model_sample_spec(model),
            lambda: self.hooks.load(model.path, device=self.device),
            shape,
            **options,
        )

    def model_unit(
        self,
        width: int,
        n: int,
        seed: int,
        train_images: torch.Tensor,
        wait: bool = True,
        progress: bool | None = None,
        ensemble_meta: dict | None = None,
        half: str | None = None,
        pool: torch.Tensor | None = None,
    ) -> base.Unit | None:
        """The model unit (width, n, seed) (``half``: of that half of ``pool``, subsets=disjoint);
        ``ensemble_meta``: what :meth:`train_ensemble` returned for this model (it was trained in
        its work folder already), recorded in the unit's meta."""
        spec = self.member_spec(width, n, seed, half, pool)

        def produce(tmp: Path, work: Path) -> dict:
            meta = self.hooks.train(
                train_images,
                spec,
                tmp,
                work,
                device=self.device,
                progress=self.progress if progress is None else progress,
            )
            return {**meta, **{k: v for k, v in (ensemble_meta or {}).items() if v is not None}}

        return self.run_unit("models", _member_name(width, n, seed, half), spec, produce, wait)

    def models_costliest_first(self) -> list[tuple[int, int, int]]:
        """(width, n, seed) of every model, widest and largest N first."""
        c = self.config
        return [
            (w, n, s)
            for w in sorted(c.widths, reverse=True)
            for n in sorted(c.sizes, reverse=True)
            for s in c.train_seeds
        ]

    def produce_share(self, pool: torch.Tensor, shape) -> None:
        """One process of a sharded run: every model, then every sample set, that no other process
        is making (each unit claimed while it is made; a killed process's claims are free again)."""
        c = self.config
        for width, n, seed in self.models_costliest_first():
            self.model_unit(width, n, seed, self.hooks.subset(pool, n, c.subset_seed)[0], wait=False)
        for n in sorted(c.sizes):
            train_images, _ = self.hooks.subset(pool, n, c.subset_seed)
            self.empirical_samples(n, train_images, shape, wait=False)
            for width, seed in itertools.product(c.widths, c.train_seeds):
                name = _model_name(width, n, seed)
                model = self.ws.finished("models", name, self.model_spec(width, n, seed))
                if model is not None:  # else another process is still training it
                    self.model_samples(name, model, shape, wait=False)

    def metrics_unit(
        self,
        name: str,
        spec: dict,
        samples: torch.Tensor,
        train_images: torch.Tensor,
        reference_samples: torch.Tensor | None,
        threshold: float,
    ) -> dict:
        c = self.config
        full_spec = {
            **spec,
            "similarity": self.similarity.describe(),
            "threshold": threshold,
            "memorization_ratio": c.memorization_ratio,
        }

        def produce(tmp: Path, work: Path) -> dict:
            x, train = samples.to(self.device), train_images.to(self.device)  # k-NN on the run's device
            gl = metrics.gl_score(x, train, self.similarity, threshold, knn=self.hooks.knn)
            mem = metrics.memorization_ratio(x, train, c.memorization_ratio, knn=self.hooks.knn)
            summary = {
                "gl": gl.score,
                "nn_similarity_mean": metrics.exact_mean(gl.nn_similarity),
                "memorized_ratio": mem.fraction,
                "ratio_median": float(mem.ratio.median()),
            }
            per_sample = {
                "nn_index": gl.nn_index,
                "nn_similarity": gl.nn_similarity,
                "ratio": mem.ratio,
                "ratio_nn_index": mem.nn_index,
            }
            if reference_samples is not None:
                rp = metrics.rp_score(x, reference_samples.to(self.device), self.similarity, threshold)
                summary["rp_empirical"] = rp.score
                per_sample["rp_empirical_similarity"] = rp.similarity
            base.atomic_write_json(tmp / "metrics.json", summary)
            torch.save({k: v.cpu().contiguous().clone() for k, v in per_sample.items()}, tmp / "per_sample.pt")
            return summary

        unit = self.run_unit("metrics", name, full_spec, produce, wait=True)
        summary = json.loads(unit.file("metrics.json").read_text())
        summary["per_sample"] = torch.load(unit.file("per_sample.pt"), map_location="cpu", weights_only=True)
        return summary

    # the whole study ----------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        pool = self.hooks.load_dataset(c.dataset, c.data_root)
        c.validate(pool.shape[0])
        self.similarity.embed(pool[:4])  # a descriptor that gives no [B, F] rows fails now, not after training
        self.ws.bind_config(c.result_fields())
        shape = tuple(pool.shape[1:])
        threshold, threshold_source = self.threshold(pool)
        log.info("similarity %s, threshold %.4f (%s)", self.similarity.name, threshold, threshold_source)
        if c.subsets == "disjoint":
            if not self.part.alone:
                raise base.ConfigError("subsets: disjoint runs in one process (train_workers parallelizes it)")
            return self.run_disjoint(pool, shape, threshold, threshold_source)
        if not self.part.alone:
            self.produce_share(pool, shape)
            self.part.barrier()
            if not self.part.aggregates:
                log.info("%s: this process's share is done", self.part.describe())
                return {}
        elif self.default_stack:
            self.make_units_in_workers(pool)
        models, empirical, pairs = [], [], []
        grids_dir = self.ws.root / "grids"
        bar = Progress(len(c.sizes) * (1 + len(c.widths) * len(c.train_seeds)), NAME, "models", enabled=self.progress)
        for n in sorted(c.sizes):
            train_images, _ = self.hooks.subset(pool, n, c.subset_seed)
            emp_name = f"empirical-n{n}"
            emp_spec = self.empirical_spec(n)
            emp_samples = self.empirical_samples(n, train_images, shape)
            emp_metrics = self.metrics_unit(emp_name, emp_spec, emp_samples, train_images, None, threshold)
            empirical.append({"n": n, "gl": emp_metrics["gl"], "memorized_ratio": emp_metrics["memorized_ratio"]})
            bar.update(1)
            self.grid(
                grids_dir / f"{emp_name}.png", emp_samples, train_images, emp_metrics, f"empirical denoiser, N={n}"
            )
            at_n = []
            for width, seed in itertools.product(c.widths, c.train_seeds):
                name = _model_name(width, n, seed)
                model = self.model_unit(width, n, seed, train_images)
                sample_spec = self.model_sample_spec(model)
                samples = self.model_samples(name, model, shape)
                result = self.metrics_unit(name, sample_spec, samples, train_images, emp_samples, threshold)
                self.grid(grids_dir / f"{name}.png", samples, train_images, result, f"UNet-{width}, N={n}, seed {seed}")
                row = {
                    "width": width,
                    "n": n,
                    "seed": seed,
                    "gl": result["gl"],
                    "memorized_ratio": result["memorized_ratio"],
                    "rp_empirical": result["rp_empirical"],
                    "nn_similarity_mean": result["nn_similarity_mean"],
                    "ratio_median": result["ratio_median"],
                    **_fraction_columns(result, samples.shape[0]),
                }
                models.append(row)
                at_n.append((row, samples))
                bar.update(1)
                bar.note(
                    f"{name}: GL {row['gl']:.2f}, memorized {row['memorized_ratio']:.2f}, "
                    f"RP vs empirical {row['rp_empirical']:.2f}"
                )
            for (ra, sa), (rb, sb) in itertools.combinations(at_n, 2):
                rp = metrics.rp_score(sa, sb, self.similarity, threshold)
                pairs.append(
                    {
                        "n": n,
                        "kind": "seeds" if ra["width"] == rb["width"] else "widths",
                        "width_a": ra["width"],
                        "seed_a": ra["seed"],
                        "width_b": rb["width"],
                        "seed_b": rb["seed"],
                        **_pair_columns(rp.similarity, threshold),
                    }
                )
        bar.close()
        results = {
            **self.results_head(threshold, threshold_source),
            "models": models,
            "empirical": empirical,
            "pairs": pairs,
            "threshold_grid": threshold_grid(threshold),
        }
        results.update(summarize(results))
        results["figure_properties"] = figure_properties(results)
        results = json.loads(base.json_dumps(results))  # exactly what results.json holds
        self.write_outputs(results)
        return results

    def halves_of_run(self) -> tuple:
        """The training sets per (width, N, seed): the nested subset (None), or halves a and b."""
        return HALVES if self.config.subsets == "disjoint" else (None,)

    def run_disjoint(self, pool: torch.Tensor, shape: tuple, threshold: float, threshold_source: str) -> dict:
        """subsets=disjoint: per (width, seed, N) the models of halves a and b, their samples from
        the same seeds, each sample's nearest training image in its own half and in the other, and
        the similarity of the two models' samples (:func:`strong_generalization`)."""
        c = self.config
        halves = self.halves(pool)
        if max(c.sizes) > halves["half_size"]:
            raise base.ConfigError(
                f"sizes: N = {max(c.sizes)} exceeds the {halves['half_size']} images of a half (the "
                f"{halves['pool']} images less {halves['removed']} near-duplicates at duplicate_rms = "
                f"{c.duplicate_rms}, halved)"
            )
        if self.default_stack:
            self.make_units_in_workers(pool)
        models, points = [], []
        grids_dir = self.ws.root / "grids"
        for width, seed in itertools.product(c.widths, c.train_seeds):
            for n in sorted(c.sizes):
                samples, own, other = {}, {}, {}
                for half in HALVES:
                    name = _member_name(width, n, seed, half)
                    images = self.train_images(pool, n, half)
                    model = self.model_unit(width, n, seed, images, half=half, pool=pool)
                    sample_spec = self.model_sample_spec(model)
                    samples[half] = self.model_samples(name, model, shape)
                    result = self.metrics_unit(name, sample_spec, samples[half], images, None, threshold)
                    own[half] = result["per_sample"]["nn_similarity"].double()
                    other_images = self.train_images(pool, n, "b" if half == "a" else "a")
                    other[half] = (
                        metrics.gl_score(
                            samples[half].to(self.device),
                            other_images.to(self.device),
                            self.similarity,
                            threshold,
                            knn=self.hooks.knn,
                        )
                        .nn_similarity.double()
                        .cpu()
                    )
                    models.append(
                        {
                            "width": width,
                            "n": n,
                            "seed": seed,
                            "half": half,
                            "gl": result["gl"],
                            "memorized_ratio": result["memorized_ratio"],
                            "nn_similarity_mean": result["nn_similarity_mean"],
                            "ratio_median": result["ratio_median"],
                            **{
                                f"{key}_{end}": value
                                for key in ("gl", "memorized_ratio")
                                for end, value in zip(
                                    ("low", "high"),
                                    (lambda i: (i.low, i.high))(
                                        intervals.wilson_interval(_successes(result[key], c.num_samples), c.num_samples)
                                    ),
                                )
                            },
                        }
                    )
                cross = self.similarity.pairwise(samples["a"], samples["b"]).double().cpu()
                shifted = self.similarity.pairwise(samples["a"], samples["b"].roll(1, 0)).double().cpu()
                points.append(
                    {"width": width, "seed": seed, "n": n, **strong_generalization(cross, own, other, shifted)}
                )
                k = min(c.grid_samples, samples["a"].shape[0])
                if k:
                    plotting.samples_with_neighbors(
                        samples["a"][:k],
                        samples["b"][:k],
                        grids_dir / f"disjoint-w{width}-n{n}-s{seed}.png",
                        similarities=cross[:k],
                        title=f"UNet-{width}, N={n}: half a's samples above half b's (same seeds)",
                    )
        results = {
            **self.results_head(threshold, threshold_source),
            "halves": {k: v for k, v in halves.items() if k not in HALVES},
            "models": models,
            "strong_generalization": points,
        }
        results["figure_properties"] = disjoint_properties(results)
        results = json.loads(base.json_dumps(results))
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(root / "models.csv", results["models"])
        base.atomic_write_csv(
            root / "strong_generalization.csv",
            [{k: v for k, v in p.items() if k != "histograms"} for p in results["strong_generalization"]],
        )
        plot_strong_generalization(results, root / "strong_generalization.png")
        return results

    def worker_tasks(self, pool: torch.Tensor | None = None) -> list[tuple]:
        """The unfinished units the workers make: ``("model", w, (n,), s)`` trains a model and samples
        it, ``("ensemble", w, (n, ...), s)`` trains up to ``train_ensemble`` models of one width and
        seed as one ensemble and samples each (a fifth element: the half, subsets=disjoint),
        ``("empirical", n)`` samples the empirical denoiser.
        Costliest first (widest model, then larger N), so the last tasks to start are the cheap ones."""
        c = self.config
        # (width, seed, half) -> N of the models to make
        pending: dict[tuple[int, int, str | None], list[int]] = {}
        for w, n, s in self.models_costliest_first():
            for half in self.halves_of_run():
                spec = self.member_spec(w, n, s, half, pool)
                name = _member_name(w, n, s, half)
                if self.ws.finished("samples", name, {**spec, **self.sampling_spec()}) is None:
                    pending.setdefault((w, s, half), []).append(n)
        per_ensemble = c.train_ensemble if self.hooks.train_ensemble is not None else 1
        tasks: list[tuple] = []
        for (w, s, half), sizes in pending.items():
            for i in range(0, len(sizes), per_ensemble):
                chunk = tuple(sizes[i : i + per_ensemble])
                kind = "model" if len(chunk) == 1 else "ensemble"
                tasks.append((kind, w, chunk, s) if half is None else (kind, w, chunk, s, half))
        if c.subsets == "disjoint":
            return tasks  # no empirical denoiser: the disjoint measures compare the two models
        for n in sorted(c.sizes, reverse=True):
            if self.ws.finished("samples", f"empirical-n{n}", self.empirical_spec(n)) is None:
                tasks.append(("empirical", n))
        return tasks

    def run_task(self, task: tuple, pool: torch.Tensor, shape: tuple, progress: bool) -> None:
        """Make the units of one worker task (see :meth:`worker_tasks`)."""
        if task[0] == "empirical":
            n = task[1]
            train_images, _ = self.hooks.subset(pool, n, self.config.subset_seed)
            self.empirical_samples(n, train_images, shape, progress=progress)
            return
        kind, width, sizes, seed = task[:4]
        half = task[4] if len(task) > 4 else None
        ensemble_meta = self.train_ensemble(width, sizes, seed, pool, progress, half) if len(sizes) > 1 else {}
        for n in sizes:
            model = self.model_unit(
                width,
                n,
                seed,
                self.train_images(pool, n, half),
                progress=progress,
                ensemble_meta=ensemble_meta.get(n),
                half=half,
                pool=pool,
            )
            self.model_samples(_member_name(width, n, seed, half), model, shape, progress=progress)

    def train_ensemble(
        self,
        width: int,
        sizes: tuple[int, ...],
        seed: int,
        pool: torch.Tensor,
        progress: bool,
        half: str | None = None,
    ) -> dict[int, dict]:
        """Train the unfinished models (width, n, seed), n in ``sizes``, as one ensemble in their
        units' work folders, holding the units' claims meanwhile; :meth:`model_unit` then finds
        each at its final step and finishes it. Returns n -> the member's metadata."""
        from diffcore import _folder

        todo = [
            n
            for n in sizes
            if self.ws.finished(
                "models", _member_name(width, n, seed, half), self.member_spec(width, n, seed, half, pool)
            )
            is None
        ]
        if len(todo) < 2:
            return {}  # nothing to stack: model_unit trains a lone model itself
        names = [_member_name(width, n, seed, half) for n in todo]
        with contextlib.ExitStack() as claims:
            for name in names:
                claims.enter_context(_folder.unit_claim(self.ws.claim_path("models", name), True))
            metas = self.hooks.train_ensemble(
                [self.train_images(pool, n, half) for n in todo],
                [self.member_spec(width, n, seed, half, pool) for n in todo],
                [self.ws.work_path("models", name) for name in names],
                device=self.device,
                progress=progress,
            )
        return dict(zip(todo, metas))

    def make_units_in_workers(self, pool: torch.Tensor) -> None:
        """Train and sample every unfinished model, and sample every empirical denoiser, with
        ``train_workers`` processes (spawned; ``torch_threads`` threads each; ``train_workers = 1``
        runs the tasks in this process). The main loop then finds them finished and only measures.
        Progress counts training steps over the whole study, polled from the trainers' logs."""
        c = self.config
        tasks = self.worker_tasks(pool)
        if not tasks:
            return
        names = [
            _member_name(w, n, s, h)
            for w in c.widths
            for n in c.sizes
            for s in c.train_seeds
            for h in self.halves_of_run()
        ]
        log.info(
            "%d tasks (training and sampling %d models, %d empirical sample sets), %d at a time%s",
            len(tasks),
            sum(len(t[2]) for t in tasks if t[0] != "empirical"),
            sum(t[0] == "empirical" for t in tasks),
            c.train_workers,
            f", models of one width in ensembles of up to {c.train_ensemble}"
            if any(t[0] == "ensemble" for t in tasks)
            else "",
        )
        start = time.perf_counter()
        with _TrainingProgress(self.ws, names, c.train_steps, self.progress) as progress:
            if c.train_workers == 1:
                for task in tasks:
                    self.run_task(task, pool, tuple(pool.shape[1:]), progress=False)
                    progress.task_done(task)
            else:
                self._run_tasks_in_processes(tasks, progress)
        self.train_wall_seconds = time.perf_counter() - start

    def _run_tasks_in_processes(self, tasks: list[tuple], progress: _TrainingProgress) -> None:
        import concurrent.futures

        from diffcore import _folder

        c = self.config
        executor = _folder.worker_pool(min(c.train_workers, len(tasks)), self.ws.root)  # die with this process
        try:
            futures = {
                executor.submit(_task_in_worker, c, str(self.ws.root), task, self.device): task for task in tasks
            }
            for future in concurrent.futures.as_completed(futures):
                future.result()  # a failed task raises here
                progress.task_done(futures[future])
        except BaseException:
            # do not run the queued tasks first: drop them (finished units and the running
            # models' checkpoints stay, so the next run resumes)
            executor.shutdown(wait=True, cancel_futures=True)
            raise
        executor.shutdown(wait=True)

    def grid(self, path: Path, samples, train_images, result: dict, title: str) -> None:
        k = min(self.config.grid_samples, samples.shape[0])
        if k == 0:
            return
        per = result["per_sample"]
        plotting.samples_with_neighbors(
            samples[:k], train_images[per["nn_index"][:k]], path, similarities=per["nn_similarity"][:k], title=title
        )

    def write_outputs(self, results: dict) -> None:
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(root / "models.csv", results["models"])
        base.atomic_write_csv(
            root / "pairs.csv",
            results["pairs"],
            columns=[
                "n",
                "kind",
                "width_a",
                "seed_a",
                "width_b",
                "seed_b",
                "rp",
                "rp_low",
                "rp_high",
                "similarity_mean",
                "similarity_mean_low",
                "similarity_mean_high",
            ],
        )
        plotting.figure1(
            {str(w): _nan_curve(curve) for w, curve in results["curves"].items()},
            root / "figure1.png",
            cross_width=_nan_curve(results["cross_width"]),
            threshold=results["threshold"],
            similarity=results["similarity"]["name"],
            title=f"Reproducibility and generalization against N: {self.config.dataset}, {self.config.model_preset}",
        )

    def timing_details(self) -> dict:
        """What timings.json adds for this study: the wall time of the parallel training phase
        (``train_wall_seconds``; the units' seconds add up the concurrent processes), the workers
        and the ensembles."""
        return {
            "train_wall_seconds": self.train_wall_seconds,
            "train_workers": self.config.train_workers,
            "train_ensemble": self.config.train_ensemble,
        }


def _task_in_worker(config: ReproducibilityConfig, out: str, task: tuple, device: str) -> None:
    """One task of :meth:`_Study.make_units_in_workers`, in a worker process."""
    with _env.torch_threads(config.torch_threads):
        study = _Study(config, out, study_hooks.default_hooks(), device, progress=False, default_stack=True)
        pool = study.hooks.load_dataset(config.dataset, config.data_root)
        study.run_task(task, pool, tuple(pool.shape[1:]), progress=False)


class _TrainingProgress:
    """Training steps of all the study's models, polled once a second from the finished model
    units and the running trainers' ``metrics.jsonl`` (written every ``log_every`` steps), so it
    counts the same whether models train in this process or in workers."""

    def __init__(self, ws: base.Workspace, names: list[str], steps: int, enabled: bool, poll: float = 1.0):
        self.ws, self.names, self.steps, self.poll = ws, names, int(steps), poll
        self.bar = Progress(len(names) * self.steps, "training", "steps", enabled=enabled, initial=self._done_steps())
        self._stop = None

    def _done_steps(self) -> int:
        total = 0
        for name in self.names:
            if (self.ws.unit_path("models", name) / base.MANIFEST).is_file():
                total += self.steps
                continue
            metrics_file = self.ws.root / "work" / "models" / name / "metrics.jsonl"
            if metrics_file.is_file():
                lines = metrics_file.read_text().splitlines()
                try:
                    total += int(json.loads(lines[-1])["step"]) if lines else 0
                except (ValueError, KeyError):  # a line being written
                    continue
        return total

    def task_done(self, task: tuple) -> None:
        self.bar.set(self._done_steps())
        if task[0] == "empirical":
            self.bar.note(f"sampled the empirical denoiser of N = {task[1]}")
            return
        kind, width, sizes, seed = task[:4]
        half = task[4] if len(task) > 4 else None
        self.bar.note(
            ("trained (as one ensemble) and sampled " if kind == "ensemble" else "trained and sampled ")
            + ", ".join(_member_name(width, n, seed, half) for n in sizes)
        )

    def __enter__(self) -> _TrainingProgress:
        import threading

        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(self.poll):
                self.bar.set(self._done_steps())

        self._thread = threading.Thread(target=poll, name="training-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        self.bar.set(self._done_steps())
        self.bar.close()
        return False


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _nan_curve(curve: dict) -> dict:
    return {
        k: [float("nan") if v is None else v for v in vs] if isinstance(vs, list) else vs for k, vs in curve.items()
    }


# RP over a grid of thresholds around the one used: the gap to a perfect match, 1 - threshold,
# scaled by these factors (so every threshold stays below 1 whatever the calibration gave).
THRESHOLD_GAP_FACTORS = (2.0, 1.5, 1.25, 1.0, 0.8, 2.0 / 3.0, 0.5)
MEMORIZES_GL, MEMORIZES_RATIO, GENERALIZES_GL, DIP_MARGIN = 0.1, 0.9, 0.95, 0.1


def threshold_grid(threshold: float) -> list[float]:
    """Thresholds ``1 - (1 - threshold) f`` for f in :data:`THRESHOLD_GAP_FACTORS` (f = 1: the one used)."""
    return [1.0 - (1.0 - threshold) * f for f in THRESHOLD_GAP_FACTORS]


def _successes(fraction: float, n: int) -> int:
    return int(round(fraction * n))


def _fraction_columns(result: dict, num: int) -> dict:
    """A model's GL, memorized fraction and RP against the empirical denoiser as Wilson intervals
    over its ``num`` samples (``*_low``, ``*_high`` beside the values)."""
    out = {}
    for key in ("gl", "memorized_ratio", "rp_empirical"):
        interval = intervals.wilson_interval(_successes(result[key], num), num)
        out.update({f"{key}_low": interval.low, f"{key}_high": interval.high})
    return out


def _pair_columns(similarity: torch.Tensor, threshold: float) -> dict:
    """RP of one pair of models (Wilson over the seeds), its mean similarity (bootstrap over the
    seeds) and RP at every threshold of :func:`threshold_grid` (``rp_grid``)."""
    sims = similarity.double().cpu().numpy()
    num = sims.shape[0]
    rp = intervals.wilson_interval(int((sims > threshold).sum()), num)
    mean = intervals.bootstrap_sums(sims, lambda s: s[:, 0] / num)
    return {
        **intervals.flat("rp", rp),
        **intervals.flat("similarity_mean", mean),
        "rp_grid": [float((sims > t).mean()) for t in threshold_grid(threshold)],
    }


def _interval_lists(key: str, values: list[intervals.Interval | None]) -> dict:
    """Curve columns ``key``, ``key_low``, ``key_high`` (None where a point has no value)."""
    return {
        key: [None if v is None else v.value for v in values],
        f"{key}_low": [None if v is None else v.low for v in values],
        f"{key}_high": [None if v is None else v.high for v in values],
        f"{key}_method": next((v.method for v in values if v is not None), None),
    }


def _fraction_at(fractions: list[float], num: int) -> intervals.Interval | None:
    """The interval of a curve point from its runs' fractions of ``num`` (None when it has no run)."""
    fractions = [f for f in fractions if f is not None and not math.isnan(f)]
    if not fractions:
        return None
    return intervals.fraction_interval([_successes(f, num) for f in fractions], num)


def _interval(point: dict, key: str) -> intervals.Interval:
    return intervals.Interval(
        point[key], point[f"{key}_low"], point[f"{key}_high"], method=point.get(f"{key}_method") or "exact"
    )


def _points(curve: dict, key: str) -> list[dict]:
    """The curve's points as dicts with ``key``, ``key_low``, ``key_high`` (for :func:`_interval`)."""
    return [
        {key: v, f"{key}_low": lo, f"{key}_high": hi, f"{key}_method": curve.get(f"{key}_method")}
        for v, lo, hi in zip(curve[key], curve[f"{key}_low"], curve[f"{key}_high"])
    ]


HISTOGRAM_BINS = 40


def strong_generalization(
    cross: torch.Tensor, own: dict[str, torch.Tensor], other: dict[str, torch.Tensor], shifted: torch.Tensor
) -> dict:
    """One N of subsets=disjoint, from per-seed similarities [B] (row i: seed i): ``cross`` between
    the two models' samples (same noise), ``own[h]`` of half h's sample to its nearest image of its
    own training set, ``other[h]`` to its nearest image of the other half's training set, and
    ``shifted`` between half a's sample of seed i and half b's of seed i - 1 (different noise: the
    baseline similarity of two unrelated samples of the two models).

    Medians with 95% bootstrap intervals over the seeds (rows resampled together, so differences
    are paired): ``cross``, ``own`` (both halves' samples pooled), ``other``, ``shifted``;
    ``margin`` = median(cross) - median(own) (> 0: the two models' samples are closer to each
    other than to their training sets) and ``margin_shifted`` = median(cross) - median(shifted)
    (> 0: the same noise, not the models' common style, makes them alike); ``histograms`` of cross
    and own on :data:`HISTOGRAM_BINS` bins over their range."""
    rows = np.stack(
        [cross.numpy(), own["a"].numpy(), own["b"].numpy(), other["a"].numpy(), other["b"].numpy(), shifted.numpy()], 1
    )
    median = lambda v: float(np.median(v))  # noqa: E731
    statistics = {
        "cross": lambda r: median(r[:, 0]),
        "own": lambda r: median(r[:, 1:3]),
        "other": lambda r: median(r[:, 3:5]),
        "shifted": lambda r: median(r[:, 5]),
        "margin": lambda r: median(r[:, 0]) - median(r[:, 1:3]),
        "margin_shifted": lambda r: median(r[:, 0]) - median(r[:, 5]),
    }
    out: dict = {}
    for name, statistic in statistics.items():
        out.update(intervals.flat(name, intervals.bootstrap_interval(rows, statistic)))
    lo, hi = float(rows[:, :3].min()), float(rows[:, :3].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, HISTOGRAM_BINS + 1)
    out["histograms"] = {
        "edges": edges.tolist(),
        "cross": np.histogram(rows[:, 0], edges)[0].tolist(),
        "own": np.histogram(rows[:, 1:3].reshape(-1), edges)[0].tolist(),
    }
    return out


def disjoint_properties(results: dict) -> dict[str, dict]:
    """The strong-generalization claims of subsets=disjoint, decided on the 95% bootstrap intervals
    of :func:`strong_generalization`, for every (width, seed), fixed before looking:

    - ``closer_to_each_other_at_largest_n``: at the largest N the margin median(cross) -
      median(own) lies clearly above 0 (the two models, trained on disjoint halves, give samples
      closer to each other than to their own training images);
    - ``closer_to_training_at_smallest_n``: at the smallest N the margin lies clearly below 0;
    - ``same_noise_matters_at_largest_n`` (the control): at the largest N median(cross) lies
      clearly above median(shifted), the two models' samples from different noise.

    Each record lists the deciding intervals per ``w{width}-s{seed}`` and the N at which the
    margin first lies clearly above 0 (``first_n_closer_to_each_other``)."""
    points = results["strong_generalization"]
    runs = sorted({(p["width"], p["seed"]) for p in points})
    ends: dict[str, dict] = {}
    first_n = {}
    for width, seed in runs:
        curve = sorted((p for p in points if (p["width"], p["seed"]) == (width, seed)), key=lambda p: p["n"])
        key = f"w{width}-s{seed}"
        ends[key] = {"smallest": curve[0], "largest": curve[-1]}
        first_n[key] = next((p["n"] for p in curve if p["margin_low"] > 0), None)

    seeds = results["config"]["num_samples"]  # the bootstrap's units

    def margin(p: dict, name: str = "margin") -> intervals.Interval:
        return intervals.Interval(p[name], p[f"{name}_low"], p[f"{name}_high"], method="bootstrap", n=seeds)

    return {
        "closer_to_each_other_at_largest_n": intervals.claim(
            all(e["largest"]["margin_low"] > 0 for e in ends.values()),
            n={k: e["largest"]["n"] for k, e in ends.items()},
            margin={k: margin(e["largest"]).as_dict() for k, e in ends.items()},
            first_n_closer_to_each_other=first_n,
        ),
        "closer_to_training_at_smallest_n": intervals.claim(
            all(e["smallest"]["margin_high"] < 0 for e in ends.values()),
            n={k: e["smallest"]["n"] for k, e in ends.items()},
            margin={k: margin(e["smallest"]).as_dict() for k, e in ends.items()},
        ),
        "same_noise_matters_at_largest_n": intervals.claim(
            all(e["largest"]["margin_shifted_low"] > 0 for e in ends.values()),
            n={k: e["largest"]["n"] for k, e in ends.items()},
            margin_shifted={k: margin(e["largest"], "margin_shifted").as_dict() for k, e in ends.items()},
        ),
    }


def plot_strong_generalization(results: dict, path: Path) -> Path:
    """Top: the medians (cross, own, other, shifted) against N with their 95% intervals, one
    line style per (width, seed); bottom: per N the histograms of cross and own (first width and
    seed). The title states the setting, not a conclusion."""
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    points = results["strong_generalization"]
    runs = sorted({(p["width"], p["seed"]) for p in points})
    sizes = sorted({p["n"] for p in points})
    fig = plt.figure(figsize=(max(8.0, 2.4 * len(sizes)), 6.4))
    grid = fig.add_gridspec(2, len(sizes), height_ratios=(1.3, 1.0))
    top = fig.add_subplot(grid[0, :])
    series = (
        ("cross", "the two models' samples, same noise", "C0", "-"),
        ("own", "sample vs nearest own training image", "C3", "-"),
        ("other", "sample vs nearest image of the other half", "C2", "--"),
        ("shifted", "the two models' samples, different noise", "0.5", ":"),
    )
    for index, (width, seed) in enumerate(runs):
        curve = sorted((p for p in points if (p["width"], p["seed"]) == (width, seed)), key=lambda p: p["n"])
        ns = [p["n"] for p in curve]
        for key, label, color, style in series:
            values = [p[key] for p in curve]
            err = [
                [v - p[f"{key}_low"] for v, p in zip(values, curve)],
                [p[f"{key}_high"] - v for v, p in zip(values, curve)],
            ]
            top.errorbar(
                ns,
                values,
                yerr=err,
                color=color,
                linestyle=style,
                marker="os^v"[index % 4],
                capsize=3,
                label=f"{label} (w{width}, s{seed})" if len(runs) > 1 else label,
            )
    top.set_xscale("log", base=2)
    top.set_xlabel("N (images per half)")
    top.set_ylabel(f"median {results['similarity']['name']} similarity")
    top.grid(alpha=0.3)
    top.legend(fontsize=7)
    top.set_title(
        f"two models per N trained on disjoint halves of {results['config']['dataset']} "
        f"(bars: 95% bootstrap over {results['config']['num_samples']} seeds)",
        fontsize=9,
    )
    first = [p for p in points if (p["width"], p["seed"]) == runs[0]]
    for col, n in enumerate(sizes):
        ax = fig.add_subplot(grid[1, col])
        p = next((q for q in first if q["n"] == n), None)
        if p is None:
            continue
        hist = p["histograms"]
        edges = np.asarray(hist["edges"])
        centres, width = 0.5 * (edges[1:] + edges[:-1]), edges[1] - edges[0]
        own = np.asarray(hist["own"], dtype=float) / max(1, sum(hist["own"]))
        cross = np.asarray(hist["cross"], dtype=float) / max(1, sum(hist["cross"]))
        ax.bar(centres, own, width=width, color="C3", alpha=0.5, label="own training")
        ax.bar(centres, cross, width=width, color="C0", alpha=0.5, label="other model")
        ax.set_title(f"N = {n}", fontsize=8)
        ax.tick_params(labelsize=6)
        if col == 0:
            ax.set_ylabel("share of samples", fontsize=7)
            ax.legend(fontsize=6)
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def figure_properties(results: dict) -> dict[str, dict]:
    """The properties of the seed's Figure 1 that ``results`` (of ``results.json``) must show,
    each decided on 95% intervals and recorded as ``{"holds": bool, ...the intervals behind it}``
    (:func:`diffcore.metrics.intervals.claim`). The bounds were fixed before intervals existed:

    - ``memorizes_at_smallest_n``: at every width, at the smallest N, GL's interval lies below 0.1
      and the memorized fraction's above 0.9;
    - ``generalizes_at_largest_n``: at every width GL's interval at the largest N lies above 0.95;
    - ``rp_dips_at_transition``: the interval of RP between the widths at its interior minimum
      lies below the intervals at the smallest and the largest N (:func:`intervals.dips`);
    - ``wider_memorizes_longer``: the largest N at which a model clearly memorizes (GL's interval
      below 0.5) is at least as large for every wider width as for every narrower one;
    - ``wider_less_generalized_somewhere``: at some N the wider model's GL interval lies below the
      narrower's (two widths; the strict form of the previous one).
    """
    curves = {int(w): c for w, c in results["curves"].items()}
    widths = sorted(curves)
    first = {
        w: (_interval(_points(c, "gl")[0], "gl"), _interval(_points(c, "memorized_ratio")[0], "memorized_ratio"))
        for w, c in curves.items()
    }
    last = {w: _interval(_points(c, "gl")[-1], "gl") for w, c in curves.items()}
    out = {
        "memorizes_at_smallest_n": intervals.claim(
            all(gl.high < MEMORIZES_GL and mem.low > MEMORIZES_RATIO for gl, mem in first.values()),
            bounds={"gl_below": MEMORIZES_GL, "memorized_above": MEMORIZES_RATIO},
            **{f"gl_w{w}": gl for w, (gl, _) in first.items()},
            **{f"memorized_w{w}": mem for w, (_, mem) in first.items()},
        ),
        "generalizes_at_largest_n": intervals.claim(
            all(gl.low > GENERALIZES_GL for gl in last.values()),
            bound=GENERALIZES_GL,
            **{f"gl_w{w}": gl for w, gl in last.items()},
        ),
    }
    cross = results["cross_width"]
    points = [_interval(p, "rp") for p in _points(cross, "rp")] if len(cross["n"]) >= 3 else []
    if points:
        dip = intervals.dips(points)
        out["rp_dips_at_transition"] = {**dip, "n_at": cross["n"][dip["at"]]}
    else:
        out["rp_dips_at_transition"] = intervals.claim(False, reason="RP across widths needs two widths and 3+ N")

    def reach(curve: dict) -> int:
        return max([n for n, p in zip(curve["n"], _points(curve, "gl")) if p["gl_high"] < 0.5], default=0)

    reaches = [reach(curves[w]) for w in widths]
    out["wider_memorizes_longer"] = intervals.claim(
        all(a <= b for a, b in zip(reaches, reaches[1:])), widths=widths, last_n_clearly_memorized=reaches
    )
    apart = []
    if len(widths) >= 2:
        narrow, wide = curves[widths[0]], curves[widths[-1]]
        for n, pn, pw in zip(narrow["n"], _points(narrow, "gl"), _points(wide, "gl")):
            if intervals.clearly_below(_interval(pw, "gl"), _interval(pn, "gl")):
                apart.append(n)
    out["wider_less_generalized_somewhere"] = intervals.claim(bool(apart), widths=widths, at_n=apart)
    return out


def summarize(results: dict) -> dict:
    """Curves per width against N (over training seeds) and RP across widths, each point with its
    95% interval (``*_low``, ``*_high``: Wilson over the samples for one seed, seeds-t for 3+), the
    mean similarity across widths, and RP across widths at every threshold of ``threshold_grid``
    with whether its dip holds there (``rp_dip_by_threshold``)."""
    num = results["config"]["num_samples"]
    curves = {}
    sizes = sorted({m["n"] for m in results["models"]})
    for width in sorted({m["width"] for m in results["models"]}):
        rows = [m for m in results["models"] if m["width"] == width]
        curve: dict[str, Any] = {"n": sizes}
        for key in ("gl", "memorized_ratio", "rp_empirical"):
            curve.update(
                _interval_lists(key, [_fraction_at([m[key] for m in rows if m["n"] == n], num) for n in sizes])
            )
        curve.update(
            _interval_lists(
                "rp_seeds",
                [
                    _fraction_at(
                        [
                            p["rp"]
                            for p in results["pairs"]
                            if p["n"] == n and p["kind"] == "seeds" and p["width_a"] == width
                        ],
                        num,
                    )
                    for n in sizes
                ],
            )
        )
        curves[str(width)] = curve
    cross_pairs = {n: [p for p in results["pairs"] if p["n"] == n and p["kind"] == "widths"] for n in sizes}
    cross_n = [n for n in sizes if cross_pairs[n]]
    cross = {
        "n": cross_n,
        **_interval_lists("rp", [_fraction_at([p["rp"] for p in cross_pairs[n]], num) for n in cross_n]),
        "similarity_mean": [_mean([p["similarity_mean"] for p in cross_pairs[n]]) for n in cross_n],
    }
    grid = results.get("threshold_grid", [])
    by_threshold = []
    for index, t in enumerate(grid):
        curve = [_fraction_at([p["rp_grid"][index] for p in cross_pairs[n]], num) for n in cross_n]
        entry = {"threshold": t, "rp": [c.value for c in curve]}
        if len(curve) >= 3:
            entry["dip"] = intervals.dips(curve)
        by_threshold.append(entry)
    cross["rp_by_threshold"] = by_threshold
    return {"curves": curves, "cross_width": cross}


def _make(r: base.RunRequest) -> _Study:
    """One run. Under torchrun (or with ``DIFFCORE_SHARD=I/N``, the CLI's ``--shard``) every process
    makes the models and sample sets no other process is making; then rank 0 (or a later plain run)
    writes the results, and the other processes return ``{}``."""
    return _Study(
        r.config,
        r.out,
        r.hooks or study_hooks.default_hooks(),
        r.device,
        r.progress,
        default_stack=r.hooks is None,
        part=r.part,
    )


def summary(results: dict, out: Path) -> list[str]:
    """The lines ``diffcore run reproducibility`` prints: a row per model, then the figure."""
    if results.get("config", {}).get("subsets") == "disjoint":
        lines = [f"{'width':>6} {'N':>6} {'seed':>4} {'cross':>6} {'own':>6} {'margin [95%]':>24}"]
        lines += [
            f"{p['width']:>6} {p['n']:>6} {p['seed']:>4} {p['cross']:6.3f} {p['own']:6.3f} "
            f"{p['margin']:+7.3f} [{p['margin_low']:+.3f}, {p['margin_high']:+.3f}]"
            for p in results["strong_generalization"]
        ]
        return lines + [f"figure: {out / 'strong_generalization.png'}", f"results: {out / 'results.json'}"]
    lines = [f"{'width':>6} {'N':>6} {'seed':>4} {'GL':>6} {'mem':>6} {'RP_emp':>6}"]
    lines += [
        f"{row['width']:>6} {row['n']:>6} {row['seed']:>4} {row['gl']:6.3f} "
        f"{row['memorized_ratio']:6.3f} {row['rp_empirical']:6.3f}"
        for row in results["models"]
    ]
    return lines + [f"figure: {out / 'figure1.png'}", f"results: {out / 'results.json'}"]


STUDY = base.Study(
    NAME, ReproducibilityConfig, spreads=True, one_process=True, summary=summary, presets=PRESETS, make=_make
)
run, run_preset = STUDY.run, STUDY.run_preset
