"""When training starts to memorize (``diffcore run dynamics``; docs/papers.md section 12).

Two results about training time, measured on small data:

- Bonnaire, Urfin, Biroli, Mezard (NeurIPS 2025, arXiv 2505.17638): the time at which samples
  become good, tau_gen, does not depend on the training-set size n; the time at which the model
  starts to memorize, tau_mem, grows linearly with n (Favero, Sclocchi, Wyart 2025 report the same).
- Wu, Marion, Biau, Boyer (COLT 2025, arXiv 2502.03435): large learning rates keep the learned
  score away from the sharp empirical optimum, so they delay or prevent memorization.

What the study does:

- For each width, one stacked ensemble (``diffcore.train.ensemble``) of models on nested subsets
  of n images (``sizes``) and ``train_seeds``, checkpointed at log-spaced steps
  (:func:`log_spaced_steps`; the trainer's ``keep_steps``); the EMA weights of every checkpoint
  are kept in a resumable unit.
- At every checkpoint and model (one resumable unit per checkpoint of an ensemble): samples from
  the shared seeds ``sample_seed_start ...`` (Heun); the memorized fraction (a sample is memorized
  when ``d1 / d2 < threshold``, d1 and d2 the pixel-L2 distances to its two nearest training images,
  exact k-NN; Wilson interval); the Frechet distance of the samples' digits features to the whole
  dataset's; the denoising loss ``mean |D(y + sigma z) - y|^2`` per pixel on training images and on
  held-out images (the pool outside the largest subset) at ``loss_sigmas``; and the relative distance
  ``|D(x) - D*(x)| / |D*(x)|`` of the model to the empirical denoiser D* of its n images at
  ``empirical_sigma`` on noisy held-out images (0 for a model that reproduces D*).
- tau_mem, tau_gen per model (:func:`tau_mem`, :func:`tau_gen`, interpolated in log time) with
  bootstrap intervals over the sample seeds; per width a log-log fit of tau against n
  (:func:`loglog_fit`) with its slope's interval (across training seeds when 3+ are trained, else
  bootstrap over the sample seeds, shared by all models).
- The learning-rate sweep: one ensemble per rate (width ``lr_sweep_width``, n ``lr_sweep_n``, the
  same seeds) with ``lr_sweep_optimizer`` (``sgd``: plain gradient descent, Wu et al.'s setting;
  ``adam``: the size sweep's optimizer), the memorized fraction and Frechet distance at the budget,
  and tau_mem, per rate.

Claims (``results["claims"]``, each ``{"holds": ...}`` decided on intervals):

- ``tau_mem_linear_in_n`` (per width): the slope's whole interval lies within 0.25 of 1
  (:data:`SLOPE_TOLERANCE`, an equivalence test);
- ``tau_gen_independent_of_n`` (per width): the slope's whole interval lies within 0.25 of 0;
- ``large_lr_prevents_memorization``: the memorized fraction at the largest rate lies clearly
  below (Wilson intervals) the largest one over the rates, which is at a smaller rate, and the
  largest rate's Frechet distance is within ``gen_factor`` of the best (its samples are good: a
  diverged or untrained model would also not memorize).

Outputs: ``results.json``, ``checkpoints.csv`` (one row per model and checkpoint), ``models.csv``,
``dynamics.png``, ``tau.png``, ``lr.png``, ``losses.png``, ``timings.json`` (the shared schema; wall and CPU seconds,
load averages).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcore.experiments import _stack, base, recipes
from diffcore.metrics import intervals

log = logging.getLogger(__name__)

NAME = "dynamics"
# One intra-op thread on the CPU, as the other digits studies: the light UNets are small and two
# threads contend on the shared 2-core machine.
_CPU_THREADS = 1


@dataclass(frozen=True)
class DynamicsConfig:
    dataset: str = "digits"
    data_root: str = ""
    model_preset: str = "ddpmpp-digits-light"
    inception_weights: str = ""  # "": the shipped digits network; else FID's Inception file
    widths: tuple[int, ...] = (8, 16)
    sizes: tuple[int, ...] = (16, 32, 64, 128, 256)  # nested subsets
    train_seeds: tuple[int, ...] = (1,)  # the budget pilot ran seed 0
    subset_seed: int = 0
    train_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_warmup_images: int = 1000
    sigma_p_mean: float = -0.5  # training noise levels ln sigma ~ N(mean, std^2)
    sigma_p_std: float = 1.8
    num_checkpoints: int = 8  # log-spaced from first_checkpoint to train_steps
    first_checkpoint: int = 20
    num_samples: int = 128
    sample_seed_start: int = 100000
    sampler_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    threshold: float = 1.0 / 3.0  # d1 / d2 below it: memorized (Gu et al.)
    loss_sigmas: tuple[float, ...] = (0.05, 0.2, 1.0, 5.0)
    loss_probes: int = 128
    probe_seed: int = 7
    empirical_sigma: float = 0.2
    mem_level: float = 0.2  # tau_mem: memorized fraction reaches it
    gen_factor: float = 1.5  # tau_gen: FD within this factor of its minimum
    tau_resamples: int = 200
    lr_sweep_rates: tuple[float, ...] = (0.003, 0.02, 0.1)  # increasing
    lr_sweep_optimizer: str = "sgd"  # "sgd": plain gradient descent (Wu et al.'s setting); "adam"
    lr_sweep_width: int = 8
    lr_sweep_n: int = 16

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of its range."""
        base.check_fields(self, FIELD_CHECKS)
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        base.check_sigmas(self.sigma_min, self.sigma_max)
        if self.first_checkpoint >= self.train_steps:
            raise base.ConfigError(
                f"first_checkpoint: expected fewer than train_steps = {self.train_steps}, got {self.first_checkpoint}"
            )
        if self.num_checkpoints > self.train_steps - self.first_checkpoint + 1:
            raise base.ConfigError(
                f"num_checkpoints: at most {self.train_steps - self.first_checkpoint + 1} "
                f"distinct steps between first_checkpoint and train_steps, got {self.num_checkpoints}"
            )
        if self.dataset == "digits" and self.inception_weights:
            raise base.ConfigError("inception_weights: the digits use the shipped digits network (leave it empty)")
        if self.lr_sweep_rates and self.lr_sweep_n not in self.sizes:
            raise base.ConfigError(f"lr_sweep_n: expected one of sizes {self.sizes}, got {self.lr_sweep_n}")
        if self.lr_sweep_rates and self.lr_sweep_width not in self.widths:
            raise base.ConfigError(f"lr_sweep_width: expected one of widths {self.widths}, got {self.lr_sweep_width}")
        if list(self.lr_sweep_rates) != sorted(self.lr_sweep_rates):
            raise base.ConfigError(f"lr_sweep_rates: expected increasing rates, got {self.lr_sweep_rates}")


FIELD_CHECKS: dict[str, base.Check] = {
    "train_steps": base.integer(2),  # first_checkpoint >= 1 comes before the last step
    "num_checkpoints": base.integer(3),
    "first_checkpoint": base.positive,
    "num_samples": base.integer(2),  # a Frechet distance needs two samples
    "threshold": base.number(0, 1, lo_open=True),  # here the ratio d1 / d2 (Gu et al.), not a similarity
    "loss_sigmas": base.tuple_of(base.sigma),
    "loss_probes": base.positive,
    "empirical_sigma": base.sigma,
    "mem_level": base.number(0, 1, lo_open=True),
    "gen_factor": base.number(1, lo_open=True),
    "tau_resamples": base.integer(100),
    "lr_sweep_rates": base.tuple_of(base.positive_number, min_len=0),
    "lr_sweep_optimizer": base.one_of("adam", "sgd"),
    "lr_sweep_width": base.positive,
    "lr_sweep_n": base.integer(2),
}


def _quick() -> DynamicsConfig:
    """About 10 minutes of one core of a quiet 2-core CPU on the AVX2 paths (from the measured
    costs; docs/studies.md, "Budget of the quick preset"): the light digits UNet (the main job's
    quick architecture) at widths 8 and 16, n = 16 ... 256 nested, training seed 1 (seed 0 ran the
    pilots), 1000 steps of batch 32 at lr 1e-3 (Adam, the main job's recipe), 8 log-spaced
    checkpoints from step 20, 128 samples per checkpoint (Heun 18) and 128 loss probes; the
    learning-rate sweep with plain SGD (Wu et al.'s gradient-descent setting) at width 8, n = 16
    over 0.003, 0.02, 0.1 (a factor 33 up to the largest rate of a half-decade grid that trained
    stably in a 200-step loss pilot on seed 0; 0.3 diverged). Training noise levels
    ln sigma ~ N(-0.5, 1.8^2) put the sampler's range [0.002, 80] within 3.2 standard deviations
    (EDM's N(-1.2, 1.2^2) hardly trains sigma > 5). The budget is too short for the tau_mem law
    (``long`` is the preset that can test it)."""
    return DynamicsConfig(**recipes.DIGITS_QUICK_TRAINING)


def _long() -> DynamicsConfig:
    """The quick preset with twenty times the training (20 000 steps, 14 log-spaced checkpoints)
    and 256 samples and loss probes: if tau_mem grows like n from the main job's tau_mem(16) of a
    few hundred steps, every n up to 256 can cross within the budget. About 2.5 hours of one core
    of a quiet 2-core CPU (docs/studies.md)."""
    return dataclasses.replace(_quick(), train_steps=20_000, num_checkpoints=14, num_samples=256, loss_probes=256)


def _tiny() -> DynamicsConfig:
    """Seconds (tests): width 4, n = 16, 32, 24 steps."""
    return DynamicsConfig(
        widths=(4,),
        sizes=(16, 32),
        train_steps=24,
        batch_size=8,
        lr_warmup_images=32,
        num_checkpoints=3,
        first_checkpoint=4,
        num_samples=16,
        sampler_steps=4,
        loss_sigmas=(0.2, 1.0),
        loss_probes=16,
        tau_resamples=100,
        lr_sweep_rates=(1e-3, 1e-2),
        lr_sweep_optimizer="adam",
        lr_sweep_width=4,
        lr_sweep_n=16,
    )


def _paper() -> DynamicsConfig:
    """CIFAR-10 (set data_root; the local folder of diffcore.data.cifar10) where the paper trained
    on 32x32 grayscale CelebA: the DDPM++ UNet at widths 32 (the public code's example: 32 base
    filters) and 64, n = 128 ... 2048 nested (around the public code's example n = 1024), 3 seeds,
    Adam at lr 1e-4 and batch 512 (the public code's example; min(n, 512) there, here fixed so that
    the members of a width form one ensemble),
    200 000 steps with 16 log-spaced checkpoints, 1024 samples per checkpoint. Departures: colour
    CIFAR-10 instead of grayscale CelebA, EDM's preconditioned loss and Heun sampler instead of DDPM
    with DDIM, EMA weights, the Frechet distance on 1024 samples with Inception-v3 features (set
    ``inception_weights`` to FID's weights file; nothing is downloaded)."""
    return DynamicsConfig(
        dataset="cifar10",
        model_preset="ddpmpp-cifar",
        widths=(32, 64),
        sizes=(128, 256, 512, 1024, 2048),
        train_seeds=(0, 1, 2),
        train_steps=200_000,
        batch_size=512,
        learning_rate=1e-4,
        lr_warmup_images=1_000_000,
        num_checkpoints=16,
        first_checkpoint=100,
        num_samples=1024,
        loss_probes=1024,
        lr_sweep_rates=(3e-5, 1e-4, 3e-4, 1e-3),
        lr_sweep_optimizer="adam",
        lr_sweep_width=32,
        lr_sweep_n=512,
    )


PRESETS: dict[str, Callable[[], DynamicsConfig]] = {"quick": _quick, "long": _long, "tiny": _tiny, "paper": _paper}
CONFIG_CLASS = DynamicsConfig


# ----------------------------------------------------------------------------- definitions


def log_spaced_steps(first: int, last: int, count: int) -> list[int]:
    """``count`` distinct integer steps from ``first`` to ``last`` (both included), evenly spaced in
    log time where the integers allow (early steps that round together move up by one)."""
    if not 0 < first < last:
        raise ValueError(f"first, last: expected 0 < first < last, got {first}, {last}")
    if not 2 <= count <= last - first + 1:
        raise ValueError(f"count: expected 2 .. {last - first + 1}, got {count}")
    raw = np.exp(np.linspace(math.log(first), math.log(last), count))
    steps, previous = [], first - 1
    for i, value in enumerate(raw):
        step = max(round(float(value)), previous + 1)
        step = min(step, last - (count - 1 - i))  # leave room for the remaining steps
        steps.append(step)
        previous = step
    return steps


def _log_interpolate(t0: float, v0: float, t1: float, v1: float, level: float) -> float:
    """The time between ``t0`` and ``t1`` where the straight line through ``(log t0, v0)`` and
    ``(log t1, v1)`` reaches ``level``."""
    if v1 == v0:
        return float(t1)
    frac = (level - v0) / (v1 - v0)
    return float(math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))))


@dataclass(frozen=True)
class Crossing:
    """A time read off a curve: ``tau`` (None when the curve never crosses) and ``status``:
    ``"crossed"`` (interpolated between two checkpoints), ``"at_first"`` (already crossed at the
    first checkpoint: tau <= that step) or ``"never"`` (not within the training budget)."""

    tau: float | None
    status: str


def first_crossing_up(steps: Sequence[float], values: Sequence[float], level: float) -> Crossing:
    """First time ``values`` reach ``level`` from below, interpolated linearly in log time."""
    for i, value in enumerate(values):
        if value >= level:
            if i == 0:
                return Crossing(float(steps[0]), "at_first")
            return Crossing(_log_interpolate(steps[i - 1], values[i - 1], steps[i], value, level), "crossed")
    return Crossing(None, "never")


def tau_mem(steps: Sequence[float], memorized_fraction: Sequence[float], level: float) -> Crossing:
    """tau_mem: the first training step at which the memorized fraction reaches ``level``,
    interpolated linearly in log time between the checkpoints around the crossing."""
    return first_crossing_up(steps, memorized_fraction, level)


def tau_gen(steps: Sequence[float], frechet: Sequence[float], factor: float) -> Crossing:
    """tau_gen: the first training step at which the Frechet distance comes within ``factor`` of
    its minimum over the checkpoints (``FD <= factor * min FD``), interpolated linearly in log time
    (on ``-FD``, so the crossing is upward)."""
    level = factor * min(frechet)
    return first_crossing_up(steps, [-v for v in frechet], -level)


def loglog_fit(n: Sequence[float], tau: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``log tau = slope log n + intercept``: ``(slope, intercept)``."""
    x, y = np.log(np.asarray(n, dtype=np.float64)), np.log(np.asarray(tau, dtype=np.float64))
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError(f"n: a log-log fit needs two distinct sizes, got {list(n)}")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def memorized_mask(samples: torch.Tensor, train: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(memorized [S] bool, ratio [S])``: ``d1 / d2 < threshold`` in pixel L2 over the two nearest
    training images (exact k-NN; :func:`diffcore.metrics.memorization_ratio`)."""
    from diffcore.metrics import memorization_ratio

    result = memorization_ratio(samples, train, threshold=threshold, knn=_stack.knn)
    return result.memorized, result.ratio


# ----------------------------------------------------------------------------- groups of models


@dataclass(frozen=True)
class Member:
    width: int
    n: int
    seed: int
    learning_rate: float
    optimizer: str = "adam"  # the trainer's optimizer: "adam" or "sgd"

    @property
    def label(self) -> str:
        suffix = "" if self.optimizer == "adam" else f"-{self.optimizer}"
        return f"w{self.width}-n{self.n}-s{self.seed}-lr{self.learning_rate:g}{suffix}"


@dataclass(frozen=True)
class Group:
    """One ensemble: members of one width and learning rate."""

    name: str
    sweep: str  # "size" (the n sweep) or "lr" (the learning-rate sweep)
    members: tuple[Member, ...]


def groups(c: DynamicsConfig) -> list[Group]:
    """The ensembles: one per width (every n and seed at ``learning_rate``, Adam), one per swept
    rate (``lr_sweep_optimizer``; with Adam, ``learning_rate`` reuses the size sweep's models)."""
    out = [
        Group(f"w{w}", "size", tuple(Member(w, n, s, c.learning_rate) for n in c.sizes for s in c.train_seeds))
        for w in c.widths
    ]
    sgd = c.lr_sweep_optimizer == "sgd"
    out += [
        Group(
            f"lr{rate:g}" + ("-sgd" if sgd else ""),
            "lr",
            tuple(Member(c.lr_sweep_width, c.lr_sweep_n, s, rate, c.lr_sweep_optimizer) for s in c.train_seeds),
        )
        for rate in c.lr_sweep_rates
        if sgd or rate != c.learning_rate
    ]  # with Adam, that rate's models are the size sweep's
    return out


# ----------------------------------------------------------------------------- the study


class _Study:
    def __init__(self, config: DynamicsConfig, out, device: str, progress: bool):
        self.c = config
        self.ws = base.Workspace(out)
        self.device = device
        self.progress = progress
        self.load_start = os.getloadavg()
        self.steps = log_spaced_steps(config.first_checkpoint, config.train_steps, config.num_checkpoints)

    # data ----------------------------------------------------------------------
    def load_data(self) -> None:
        from diffcore import data

        c = self.c
        self.pool = _stack.load_dataset(c.dataset, c.data_root).float()
        if max(c.sizes) >= self.pool.shape[0]:
            raise base.ConfigError(
                f"sizes: the largest subset must leave held-out images; the dataset has "
                f"{self.pool.shape[0]}, got {max(c.sizes)}"
            )
        order = data.subset_indices(self.pool.shape[0], self.pool.shape[0], c.subset_seed)
        self.heldout = self.pool[order[max(c.sizes) :]]

    def train_images(self, n: int) -> torch.Tensor:
        return _stack.subset(self.pool, n, self.c.subset_seed)[0].float()

    # training ------------------------------------------------------------------
    def member_spec(self, m: Member) -> dict:
        c = self.c
        return {
            "dataset": c.dataset,
            "n": m.n,
            "subset_seed": c.subset_seed,
            "data_root": c.data_root,
            "model_preset": c.model_preset,
            "width": m.width,
            "seed": m.seed,
            "train_steps": c.train_steps,
            "batch_size": c.batch_size,
            "learning_rate": m.learning_rate,
            **({} if m.optimizer == "adam" else {"optimizer": m.optimizer}),  # Adam units keep their keys
            "lr_warmup_images": c.lr_warmup_images,
            **base.data_digest(c.data_root),
            **_stack.recipe_spec("edm", 0.0, (c.sigma_p_mean, c.sigma_p_std)),
        }

    def train_group(self, group: Group) -> base.Unit:
        """The ensemble of ``group`` trained to ``train_steps``; the unit keeps each member's EMA
        weights at every checkpoint step (``<member>/step_<t>.safetensors``)."""
        from safetensors.torch import save_file

        from diffcore.train import ensemble, load_checkpoint

        specs = [self.member_spec(m) for m in group.members]
        spec = {"members": specs, "checkpoint_steps": self.steps}

        def produce(tmp: Path, work: Path):
            configs = self.train_configs(group, work)
            start = time.perf_counter()
            results = ensemble.train_ensemble(configs, resume="auto")
            for m, config in zip(group.members, configs):
                (tmp / m.label).mkdir()
                for step in self.steps:
                    ckpt = load_checkpoint(Path(config.out_dir) / "checkpoints" / f"step_{step:09d}")
                    save_file(ckpt.tensors["ema"], str(tmp / m.label / f"step_{step:09d}.safetensors"))
            return {"final_loss": [r.final_loss for r in results], "train_seconds": time.perf_counter() - start}

        return self.ws.run_unit("train", group.name, spec, produce)

    def train_configs(self, group: Group, work: Path) -> list:
        """The members' ``TrainConfig``s, checkpointed at the log-spaced steps, in ``work/<member>``."""
        return [
            _stack.training_request(self.member_spec(m), work / m.label, self.device, self.progress).replace(
                keep_steps=tuple(self.steps),
                checkpoint_every=self.c.train_steps,
                keep_checkpoints=1,
                optimizer=m.optimizer,
            )
            for m in group.members
        ]

    def load_member(self, unit: base.Unit, m: Member, step: int) -> torch.nn.Module:
        from safetensors.torch import load_file

        from diffcore.train import build_model

        model = build_model(_stack.model_spec(self.member_spec(m)))
        model.load_state_dict(load_file(str(unit.file(f"{m.label}/step_{step:09d}.safetensors"))))
        return model.to(self.device).eval()

    # measurements --------------------------------------------------------------
    def measure_checkpoint(self, group: Group, trained: base.Unit, step: int) -> base.Unit:
        """Every member of ``group`` at ``step``: samples, memorization, FD, losses, distance to D*."""
        from safetensors.torch import save_file

        c = self.c
        spec = {
            "train": trained.spec,
            "step": step,
            "num_samples": c.num_samples,
            "sample_seed_start": c.sample_seed_start,
            "sampler_steps": c.sampler_steps,
            "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max,
            "threshold": c.threshold,
            "loss_sigmas": list(c.loss_sigmas),
            "loss_probes": c.loss_probes,
            "probe_seed": c.probe_seed,
            "empirical_sigma": c.empirical_sigma,
        }

        def produce(tmp: Path, work: Path):
            meta = {}
            for m in group.members:
                model = self.load_member(trained, m, step)
                row, arrays = measure_member(
                    model,
                    self.train_images(m.n),
                    self.heldout,
                    self.features,
                    self.reference,
                    c,
                    self.device,
                    self.progress,
                )
                save_file(arrays, str(tmp / f"{m.label}.safetensors"))
                meta[m.label] = row
            return meta

        return self.ws.run_unit("measure", f"{group.name}-t{step:09d}", spec, produce)

    # the run -------------------------------------------------------------------
    def run(self) -> dict:
        from diffcore.metrics import feature_statistics

        c = self.c
        self.load_data()
        self.ws.bind_config(c)
        self.features = feature_network(c, self.device)
        self.reference = feature_statistics(self.pool, self.features)
        curves: dict[str, dict] = {}
        for group in groups(c):
            trained = self.train_group(group)
            measured = [self.measure_checkpoint(group, trained, step) for step in self.steps]
            for m in group.members:
                curves[f"{group.name}/{m.label}"] = self.member_curve(group, m, measured)
        results = json.loads(base.json_dumps(summarize(c, self.steps, curves, self.controls())))
        write_outputs(self.ws.root, results, curves)
        return results

    def member_curve(self, group: Group, m: Member, measured: list[base.Unit]) -> dict:
        from safetensors.torch import load_file

        arrays = [load_file(str(u.file(f"{m.label}.safetensors"))) for u in measured]
        return {
            "member": m,
            "group": group.name,
            "sweep": group.sweep,
            "steps": list(self.steps),
            "rows": [u.meta[m.label] for u in measured],
            "memorized": np.stack([a["memorized"].numpy().astype(bool) for a in arrays]),  # [C, S]
            "features": np.stack([a["features"].double().numpy() for a in arrays]),  # [C, S, F]
            "reference": self.reference,
        }

    def controls(self) -> dict:
        """Frechet distances a model could score without generating: its n training images (a
        perfect copier) and ``num_samples`` held-out images (a perfect generalizer)."""
        from diffcore.metrics import feature_statistics, frechet_distance

        c = self.c

        def fd(images):
            return frechet_distance(feature_statistics(images, self.features), self.reference)

        return {
            "fd_training_images": {str(n): fd(self.train_images(n)) for n in c.sizes},
            "fd_heldout_images": fd(self.heldout[: c.num_samples]),
            "heldout_count": min(c.num_samples, self.heldout.shape[0]),
        }

    def timing_details(self) -> dict:
        """What timings.json adds for this study: the load average at the start and the end (the
        run's wall time means little on a shared machine without it)."""
        return {"loadavg_start": list(self.load_start), "loadavg_end": list(os.getloadavg())}


def feature_network(c: DynamicsConfig, device: str):
    """The Frechet distance's features: the shipped digits network ``[B, 1, 8, 8] -> [B, 64]``, or
    FID's Inception-v3 from ``inception_weights`` ``[B, C, H, W] -> [B, 2048]`` (CPU in, CPU out)."""
    from diffcore.metrics import digits_features, inception_features

    if c.dataset == "digits":
        return digits_features()
    if not c.inception_weights:
        raise base.ConfigError(
            f"inception_weights: dataset {c.dataset!r} needs FID's Inception-v3 weights file "
            "(--set inception_weights=PATH; docs/studies.md, dynamics)"
        )
    network = inception_features(c.inception_weights, device)

    def extract(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([network(b.to(device)).float().cpu() for b in images.split(256)])

    extract.name = "inception-v3-pool3"  # type: ignore[attr-defined]
    return extract


def measure_member(
    model,
    train: torch.Tensor,
    heldout: torch.Tensor,
    features_of,
    reference,
    c: DynamicsConfig,
    device: str,
    progress: bool,
) -> tuple[dict, dict]:
    """One model at one checkpoint: ``(row, arrays)``. ``train [n, C, H, W]``: its training images;
    ``heldout [H, C, H, W]``: images no model trained on; ``features_of``: :func:`feature_network`;
    ``reference``: the dataset's feature statistics. ``arrays``: ``memorized [S]`` (uint8),
    ``ratio [S]``, ``features [S, F]``, ``samples [S, C, H, W]``."""
    from diffcore.denoisers import EmpiricalDenoiser
    from diffcore.metrics import frechet_distance

    seeds = list(range(c.sample_seed_start, c.sample_seed_start + c.num_samples))
    samples = _stack.sample(
        model,
        seeds,
        tuple(train.shape[1:]),
        steps=c.sampler_steps,
        solver="heun",
        sigma_min=c.sigma_min,
        sigma_max=c.sigma_max,
        device=device,
        progress=progress,
    )
    memorized, ratio = memorized_mask(samples, train, c.threshold)
    with torch.no_grad():
        features = features_of(samples).float()
    fd = frechet_distance(_stats(features, reference), reference)
    hits = int(memorized.sum())
    row = {
        "memorized": hits,
        "samples": len(seeds),
        "memorized_fraction": hits / len(seeds),
        "fd": fd,
        **denoising_losses(model, train, heldout, c, device),
    }
    empirical = EmpiricalDenoiser(train)
    row.update(distance_to_empirical(model, empirical, heldout, c, device))
    return row, {
        "memorized": memorized.to(torch.uint8),
        "ratio": ratio.float(),
        "features": features,
        "samples": samples.float(),
    }


def _stats(features: torch.Tensor, reference):
    """Feature statistics of ``features [S, F]`` labelled with the reference's extractor."""
    from diffcore.metrics import FeatureStatistics

    return FeatureStatistics.from_features(features.double(), extractor=reference.extractor)


def _probes(images: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images drawn from ``images`` with replacement and unit noise for them, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    picked = images[torch.randint(0, images.shape[0], (count,), generator=g)]
    return picked, torch.randn(picked.shape, generator=g)


def _denoise(model, x: torch.Tensor, sigma: float, device: str) -> torch.Tensor:
    with torch.no_grad():
        sig = torch.full((x.shape[0],), float(sigma), device=device)
        return model(x.to(device), sig).float().cpu()


def denoising_losses(model, train: torch.Tensor, heldout: torch.Tensor, c: DynamicsConfig, device: str) -> dict:
    """``loss_train_<sigma>``, ``loss_heldout_<sigma>``: ``mean |D(y + sigma z) - y|^2`` per pixel
    over ``loss_probes`` images (drawn with replacement, the same noise at every checkpoint)."""
    out = {}
    for name, images, seed in (("train", train, c.probe_seed), ("heldout", heldout, c.probe_seed + 1)):
        y, z = _probes(images, c.loss_probes, seed)
        for sigma in c.loss_sigmas:
            out[f"loss_{name}_{sigma:g}"] = float(
                (_denoise(model, y + sigma * z, sigma, device) - y).double().square().mean()
            )
    return out


def distance_to_empirical(model, empirical, heldout: torch.Tensor, c: DynamicsConfig, device: str) -> dict:
    """On noisy held-out images ``x = y + s z`` at ``s = empirical_sigma``: ``dist_empirical`` =
    ``|D(x) - D*(x)| / |D*(x)|`` (0: the model reproduces the empirical denoiser D* of its training
    images) and its control ``dist_clean_empirical`` = ``|y - D*(x)| / |D*(x)|``, what a model that
    returns the clean held-out image scores."""
    y, z = _probes(heldout, c.loss_probes, c.probe_seed + 2)
    x = y + c.empirical_sigma * z
    target = empirical(x, c.empirical_sigma).double()

    def rel(a):
        return float((a.double() - target).norm() / target.norm().clamp_min(1e-30))

    return {"dist_empirical": rel(_denoise(model, x, c.empirical_sigma, device)), "dist_clean_empirical": rel(y)}


# ----------------------------------------------------------------------------- summaries


class ReferenceGaussian:
    """The reference features' mean and covariance with the covariance's square root precomputed,
    for many Frechet distances against it (the bootstrap of tau_gen): ``distance(rows [S, F])``
    equals :func:`diffcore.metrics.frechet_distance` of those rows' statistics (unbiased covariance)
    against the reference, in float64."""

    def __init__(self, reference):
        from diffcore.metrics.frechet import sqrt_psd

        self.mean = reference.mean.double().numpy()
        self.cov = reference.covariance.double().numpy()
        self.root = sqrt_psd(reference.covariance).numpy()
        self.trace = float(np.trace(self.cov))

    def distance(self, rows: np.ndarray) -> float:
        """``|mu - mu_r|^2 + Tr S + Tr S_r - 2 Tr (S_r^(1/2) S S_r^(1/2))^(1/2)`` (FID's formula)."""
        rows = np.asarray(rows, dtype=np.float64)
        mean = rows.mean(axis=0)
        centered = rows - mean
        cov = centered.T @ centered / (rows.shape[0] - 1)
        middle = self.root @ cov @ self.root
        eig = np.linalg.eigvalsh((middle + middle.T) / 2)
        return float(
            np.sum((mean - self.mean) ** 2) + np.trace(cov) + self.trace - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum()
        )


def _fd_curve(features: np.ndarray, reference, index: np.ndarray | None = None) -> list[float]:
    """The Frechet distance at every checkpoint of ``features [C, S, F]`` (rows ``index`` when given)."""
    gaussian = reference if isinstance(reference, ReferenceGaussian) else ReferenceGaussian(reference)
    rows = features if index is None else features[:, index]
    return [gaussian.distance(r) for r in rows]


def member_taus(curve: dict, c: DynamicsConfig, index: np.ndarray | None = None) -> tuple[Crossing, Crossing]:
    """``(tau_mem, tau_gen)`` of one model's curves, on the samples ``index`` (all when None)."""
    memorized = curve["memorized"] if index is None else curve["memorized"][:, index]
    mem = tau_mem(curve["steps"], memorized.mean(axis=1).tolist(), c.mem_level)
    gen = tau_gen(curve["steps"], _fd_curve(curve["features"], curve["reference"], index), c.gen_factor)
    return mem, gen


def _resample_indices(c: DynamicsConfig, count: int) -> list[np.ndarray]:
    """``tau_resamples`` bootstrap resamples of the sample seeds (shared by every model)."""
    rng = np.random.default_rng(c.probe_seed)
    return [rng.integers(0, count, size=count) for _ in range(c.tau_resamples)]


def _censored_value(crossing: Crossing, last_step: int) -> float:
    """A crossing as a number for resampled statistics: a 'never' counts as the last step (a lower bound)."""
    return float(last_step) if crossing.tau is None else crossing.tau


def _interval_of_draws(value: float, draws: Sequence[float], n: int) -> intervals.Interval:
    low, high = np.quantile(np.asarray(draws, dtype=np.float64), [0.025, 0.975])
    return intervals.Interval(value, float(min(low, value)), float(max(high, value)), method="bootstrap", n=n)


def summarize(c: DynamicsConfig, steps: list[int], curves: dict, controls: dict) -> dict:
    """results.json's content from every model's curves (see the module docstring)."""
    count = c.num_samples
    resamples = _resample_indices(c, count)
    last = steps[-1]
    models, draws = [], {}
    gaussians: dict[int, ReferenceGaussian] = {}
    for label, curve in curves.items():
        m = curve["member"]
        curve = {
            **curve,
            "reference": gaussians.setdefault(id(curve["reference"]), ReferenceGaussian(curve["reference"])),
        }
        mem, gen = member_taus(curve, c)
        boot = [member_taus(curve, c, idx) for idx in resamples]
        draws[label] = boot
        row = {
            "model": label,
            "group": curve["group"],
            "sweep": curve["sweep"],
            "width": m.width,
            "n": m.n,
            "seed": m.seed,
            "learning_rate": m.learning_rate,
            "optimizer": m.optimizer,
            "tau_mem": mem.tau,
            "tau_mem_status": mem.status,
            "tau_gen": gen.tau,
            "tau_gen_status": gen.status,
        }
        if mem.tau is not None:
            row["tau_mem_interval"] = _interval_of_draws(
                mem.tau, [_censored_value(b[0], last) for b in boot], count
            ).as_dict()
        if gen.tau is not None:
            row["tau_gen_interval"] = _interval_of_draws(
                gen.tau, [_censored_value(b[1], last) for b in boot], count
            ).as_dict()
        final = curve["rows"][-1]
        row["final_memorized_fraction"] = intervals.wilson_interval(final["memorized"], final["samples"]).as_dict()
        row["final_fd"] = final["fd"]
        models.append(row)
    fits = {
        f"w{w}": {kind: fit_tau(c, models, draws, w, kind, last) for kind in ("tau_mem", "tau_gen")} for w in c.widths
    }
    lr = lr_sweep(c, curves, models)
    return {
        "experiment": NAME,
        "config": dataclasses.asdict(c),
        "checkpoint_steps": steps,
        "definitions": DEFINITIONS,
        "models": models,
        "fits": fits,
        "lr_sweep": lr,
        "controls": controls,
        "checkpoints": [
            {
                "model": label,
                "width": cv["member"].width,
                "n": cv["member"].n,
                "seed": cv["member"].seed,
                "learning_rate": cv["member"].learning_rate,
                "optimizer": cv["member"].optimizer,
                "sweep": cv["sweep"],
                "step": t,
                **r,
            }
            for label, cv in curves.items()
            for t, r in zip(cv["steps"], cv["rows"])
        ],
        "claims": claims(c, fits, lr),
    }


DEFINITIONS = {
    "memorized": "a sample with d1/d2 < threshold, d1, d2 the pixel-L2 distances to its two nearest "
    "training images (exact k-NN)",
    "tau_mem": "first training step at which the memorized fraction reaches mem_level, interpolated linearly "
    "in log(step) between the checkpoints around the crossing; 'never' when it does not within "
    "train_steps, 'at_first' when it already has at the first checkpoint",
    "tau_gen": "first training step at which the Frechet distance (digits features, samples vs the whole "
    "dataset) comes within gen_factor of its minimum over the checkpoints, interpolated linearly "
    "in log(step)",
    "fit": "least squares of log tau on log n per width over the models whose tau crossed; slope interval "
    "across training seeds (seeds-t) when 3+ seeds, else bootstrap over the shared sample seeds "
    "(a resample where a model never crosses counts its tau as train_steps)",
}


def fit_tau(c: DynamicsConfig, models: list[dict], draws: dict, width: int, kind: str, last: int) -> dict:
    """The log-log fit of ``kind`` (tau_mem or tau_gen) against n for one width (``DEFINITIONS["fit"]``)."""
    rows = [r for r in models if r["sweep"] == "size" and r["width"] == width]
    used = [r for r in rows if r[kind] is not None and r[f"{kind}_status"] == "crossed"]
    left_out = [{"model": r["model"], "status": r[f"{kind}_status"]} for r in rows if r not in used]
    record: dict = {"points": [{"n": r["n"], "seed": r["seed"], "tau": r[kind]} for r in used], "left_out": left_out}
    if len({r["n"] for r in used}) < 3:
        record["slope"] = None
        record["reason"] = f"fewer than 3 sizes with a crossing ({len({r['n'] for r in used})})"
        return record
    slope, intercept = loglog_fit([r["n"] for r in used], [r[kind] for r in used])
    record["intercept"] = intercept
    seeds = sorted({r["seed"] for r in used})
    per_seed = [
        loglog_fit([r["n"] for r in used if r["seed"] == s], [r[kind] for r in used if r["seed"] == s])[0]
        for s in seeds
        if len({r["n"] for r in used if r["seed"] == s}) >= 2
    ]
    if len(per_seed) >= 3:
        record["slope"] = intervals.seed_interval(per_seed).as_dict()
        record["slope_pooled"] = slope
        return record
    position = 0 if kind == "tau_mem" else 1
    boot = [
        loglog_fit([r["n"] for r in used], [_censored_value(draws[r["model"]][i][position], last) for r in used])[0]
        for i in range(c.tau_resamples)
    ]
    record["slope"] = _interval_of_draws(slope, boot, c.num_samples).as_dict()
    return record


def lr_sweep(c: DynamicsConfig, curves: dict, models: list[dict]) -> list[dict]:
    """Per swept rate: the memorized fraction at the budget (Wilson over seeds x samples), its
    Frechet distance (mean over seeds) and tau_mem per seed; with Adam at ``learning_rate`` the
    size sweep's models of width ``lr_sweep_width`` and size ``lr_sweep_n``."""
    out = []
    key = (c.lr_sweep_width, c.lr_sweep_n, c.lr_sweep_optimizer)

    def swept(m):
        return (m.width, m.n, m.optimizer) == key

    for rate in c.lr_sweep_rates:
        members = [cv for cv in curves.values() if swept(cv["member"]) and cv["member"].learning_rate == rate]
        rows = [r for r in models if (r["width"], r["n"], r["optimizer"]) == key and r["learning_rate"] == rate]
        hits = sum(cv["rows"][-1]["memorized"] for cv in members)
        total = sum(cv["rows"][-1]["samples"] for cv in members)
        out.append(
            {
                "learning_rate": rate,
                "optimizer": c.lr_sweep_optimizer,
                "final_memorized_fraction": intervals.wilson_interval(hits, total).as_dict(),
                "final_fd": float(np.mean([cv["rows"][-1]["fd"] for cv in members])),
                "models": [cv["member"].label for cv in members],
                "tau_mem": [r["tau_mem"] for r in rows],
                "tau_mem_status": [r["tau_mem_status"] for r in rows],
            }
        )
    return out


def _as_interval(d: dict) -> intervals.Interval:
    return intervals.Interval(d["value"], d["low"], d["high"], d["level"], d["method"], d["n"])


SLOPE_TOLERANCE = 0.25
"""A slope is "about" a value when its whole interval lies within this of it (an equivalence test:
over n = 16 ... 256, 0.25 is a factor 2 in tau); an interval wider than the band cannot pass."""


def _within(interval: intervals.Interval, target: float) -> bool:
    """Whether ``interval`` lies inside ``[target - SLOPE_TOLERANCE, target + SLOPE_TOLERANCE]``."""
    return target - SLOPE_TOLERANCE <= interval.low and interval.high <= target + SLOPE_TOLERANCE


def claims(c: DynamicsConfig, fits: dict, lr: list[dict]) -> dict:
    """Each claim decided on intervals (module docstring)."""
    out = {}
    for width, fit in fits.items():
        mem, gen = fit["tau_mem"].get("slope"), fit["tau_gen"].get("slope")
        out[f"tau_mem_linear_in_n_{width}"] = intervals.claim(
            mem is not None and _within(_as_interval(mem), 1.0),
            slope=mem,
            band=[1 - SLOPE_TOLERANCE, 1 + SLOPE_TOLERANCE],
            reason=fit["tau_mem"].get("reason"),
        )
        out[f"tau_gen_independent_of_n_{width}"] = intervals.claim(
            gen is not None and _within(_as_interval(gen), 0.0),
            slope=gen,
            band=[-SLOPE_TOLERANCE, SLOPE_TOLERANCE],
            reason=fit["tau_gen"].get("reason"),
        )
    if len(lr) >= 2:
        fractions = [_as_interval(r["final_memorized_fraction"]) for r in lr]
        peak = int(np.argmax([f.value for f in fractions]))
        best_fd = min(r["final_fd"] for r in lr)
        good = lr[-1]["final_fd"] <= c.gen_factor * best_fd
        out["large_lr_prevents_memorization"] = intervals.claim(
            peak < len(lr) - 1 and intervals.clearly_below(fractions[-1], fractions[peak]) and good,
            peak_learning_rate=lr[peak]["learning_rate"],
            peak_fraction=fractions[peak],
            largest_learning_rate=lr[-1]["learning_rate"],
            largest_fraction=fractions[-1],
            largest_fd=lr[-1]["final_fd"],
            best_fd=best_fd,
            largest_fd_within_gen_factor=bool(good),
        )
    return out


# ----------------------------------------------------------------------------- outputs


def write_outputs(root: Path, results: dict, curves: dict) -> None:
    base.atomic_write_json(root / "results.json", results)
    base.atomic_write_csv(root / "checkpoints.csv", results["checkpoints"])
    base.atomic_write_csv(
        root / "models.csv", [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in results["models"]]
    )
    plot_dynamics(results, root / "dynamics.png")
    plot_tau(results, root / "tau.png")
    if results["lr_sweep"]:
        plot_lr(results, root / "lr.png")
    plot_losses(results, root / "losses.png")


def _plt():
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    return plt


def _size_rows(results: dict, width: int, n: int) -> list[dict]:
    return [r for r in results["checkpoints"] if r["sweep"] == "size" and r["width"] == width and r["n"] == n]


def plot_dynamics(results: dict, path) -> Path:
    """Per width (rows): memorized fraction (Wilson bars) and Frechet distance against the step,
    one line per n (fractions pooled over seeds, FDs averaged), log time; mem_level and the FD
    controls drawn."""
    plt = _plt()
    c = results["config"]
    widths = c["widths"]
    fig, axes = plt.subplots(len(widths), 2, figsize=(10, 3.4 * len(widths)), squeeze=False)
    for row, width in enumerate(widths):
        ax_m, ax_f = axes[row]
        for i, n in enumerate(c["sizes"]):
            pts = _size_rows(results, width, n)
            steps = sorted({p["step"] for p in pts})
            hits = [sum(p["memorized"] for p in pts if p["step"] == t) for t in steps]
            total = [sum(p["samples"] for p in pts if p["step"] == t) for t in steps]
            w = [intervals.wilson_interval(h, m) for h, m in zip(hits, total)]
            ax_m.errorbar(
                steps,
                [x.value for x in w],
                yerr=[[x.value - x.low for x in w], [x.high - x.value for x in w]],
                marker=".",
                capsize=2,
                color=f"C{i}",
                label=f"n={n}",
            )
            fd = [float(np.mean([p["fd"] for p in pts if p["step"] == t])) for t in steps]
            ax_f.plot(steps, fd, marker=".", color=f"C{i}", label=f"n={n}")
            ax_f.axhline(results["controls"]["fd_training_images"][str(n)], color=f"C{i}", ls=":", lw=0.8)
        ax_m.axhline(c["mem_level"], color="k", ls="--", lw=0.8, label=f"mem_level {c['mem_level']}")
        ax_f.axhline(
            results["controls"]["fd_heldout_images"],
            color="k",
            ls="--",
            lw=0.8,
            label=f"{results['controls']['heldout_count']} held-out images",
        )
        for ax, label in ((ax_m, "memorized fraction (d1/d2 < 1/3)"), (ax_f, "Frechet distance (digits features)")):
            ax.set_xscale("log")
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
            ax.set_title(f"width {width}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        ax_f.set_yscale("log")
    fig.suptitle("dotted: FD of each n's own training images (a perfect copier)", fontsize=8)
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def plot_tau(results: dict, path) -> Path:
    """tau_mem and tau_gen against n (log-log) per width, bootstrap bars, fitted lines with slopes."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for col, kind in enumerate(("tau_mem", "tau_gen")):
        ax = axes[0][col]
        for i, width in enumerate(results["config"]["widths"]):
            rows = [
                r
                for r in results["models"]
                if r["sweep"] == "size" and r["width"] == width and r[f"{kind}_status"] == "crossed"
            ]
            if rows:
                iv = [r[f"{kind}_interval"] for r in rows]
                ax.errorbar(
                    [r["n"] for r in rows],
                    [r[kind] for r in rows],
                    yerr=[
                        [r[kind] - v["low"] for r, v in zip(rows, iv)],
                        [v["high"] - r[kind] for r, v in zip(rows, iv)],
                    ],
                    fmt="o",
                    color=f"C{i}",
                    capsize=2,
                    label=f"width {width}",
                )
            fit = results["fits"][f"w{width}"][kind]
            if fit.get("slope") is not None:
                ns = np.array(sorted({p["n"] for p in fit["points"]}), dtype=float)
                s = fit["slope"]
                slope = s["value"] if "slope_pooled" not in fit else fit["slope_pooled"]
                ax.plot(
                    ns,
                    np.exp(fit["intercept"]) * ns**slope,
                    "-",
                    color=f"C{i}",
                    lw=1,
                    label=f"slope {s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}]",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training-set size n")
        ax.set_ylabel(f"{kind} (steps)")
        ax.set_title(f"{kind}: models that crossed within the budget", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no model crossed ({kind})", transform=ax.transAxes, ha="center", fontsize=8)
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def plot_lr(results: dict, path) -> Path:
    """Memorized fraction (Wilson bars) and Frechet distance at the budget against the learning rate."""
    from diffcore.experiments.plotting import finish

    plt = _plt()
    rows = results["lr_sweep"]
    c = results["config"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    rates = [r["learning_rate"] for r in rows]
    f = [r["final_memorized_fraction"] for r in rows]
    ax.errorbar(
        rates,
        [x["value"] for x in f],
        yerr=[[x["value"] - x["low"] for x in f], [x["high"] - x["value"] for x in f]],
        marker="o",
        capsize=3,
    )
    ax.set_ylabel("memorized fraction at the budget")
    ax2.plot(rates, [r["final_fd"] for r in rows], marker="o")
    ax2.set_ylabel("Frechet distance at the budget")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel(f"learning rate ({c.get('lr_sweep_optimizer', 'adam')})")
        a.grid(alpha=0.3)
    return finish(
        fig,
        path,
        suptitle=f"width {c['lr_sweep_width']}, n = {c['lr_sweep_n']}, {c['train_steps']} steps, "
        f"seeds {c['train_seeds']}",
    )


def plot_losses(results: dict, path) -> Path:
    """Training (solid) and held-out (dashed) denoising loss against the step, per sigma, first width."""
    plt = _plt()
    c = results["config"]
    width = c["widths"][0]
    sigmas = c["loss_sigmas"]
    fig, axes = plt.subplots(1, len(sigmas), figsize=(3.6 * len(sigmas), 3.3), squeeze=False)
    for ax, sigma in zip(axes[0], sigmas):
        for i, n in enumerate(c["sizes"]):
            pts = [p for p in _size_rows(results, width, n) if p["seed"] == c["train_seeds"][0]]
            if not pts:
                raise ValueError(f"results: no checkpoints of width {width}, n {n}, seed {c['train_seeds'][0]}")
            steps = [p["step"] for p in pts]
            ax.plot(steps, [p[f"loss_train_{sigma:g}"] for p in pts], "-", color=f"C{i}", label=f"n={n}")
            ax.plot(steps, [p[f"loss_heldout_{sigma:g}"] for p in pts], "--", color=f"C{i}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(f"sigma = {sigma:g} (width {width}; dashed: held-out)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean |D(y + sigma z) - y|^2 per pixel")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


# ----------------------------------------------------------------------------- entry points


# No hooks: the study calls the stack directly.
STUDY = base.Study(
    NAME,
    DynamicsConfig,
    threads=_CPU_THREADS,
    takes_hooks=False,
    presets=PRESETS,
    make=base.standard_make(_Study, hooks=False),
)
run, run_preset = STUDY.run, STUDY.run_preset
