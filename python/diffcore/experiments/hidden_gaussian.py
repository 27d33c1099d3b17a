"""Hidden Gaussian structure of trained denoisers (docs/papers.md section 3).

For UNets trained on nested subsets of N images (trained here through ``diffcore.train``, or reused
from a finished reproducibility study with ``models_from``), on EDM's 40-level sigma grid:

- linearity score: the mean cosine between ``D(a x1 + b x2)`` and ``a D(x1) + b D(x2)``,
  ``a = b = 1/sqrt(2)``, for pure-noise inputs ``x = sigma z`` and noisy images ``x = y + sigma z``;
- the relative distance ``|D_model(x) - D_ref(x)|_F / |D_ref(x)|_F`` over noisy images, to the
  Gaussian denoiser of the model's N training images (``diffcore.denoisers.GaussianDenoiser``) and to
  their empirical denoiser (``diffcore.denoisers.EmpiricalDenoiser``), on two probe sets: noisy
  dataset images (``dist_*``) and noisy training images of the model (``dist_*_train``, what
  :func:`effect_properties` checks);
- linear distillation: one affine map ``x -> W x + b`` per sigma fitted by least squares to the
  model's outputs on those noisy images, against the Gaussian ``W(sigma) = U diag(lam / (lam +
  sigma^2)) U^T``: ``|W_fit - W_G|_F / |W_G|_F`` (and the fit's R^2);
- samples of the model (Heun), the Gaussian model (its exact PF-ODE map) and the empirical
  denoiser (Heun) from the same seeds, with their PFD (``diffcore.metrics.pfd_from_samples``, RMS
  per pixel);
- training time (``time_checkpoints``): the distances on noisy training images again at
  log-spaced checkpoints of every model trained here (``training_time``, :func:`time_properties`).

Outputs: ``results.json``, ``curves.csv`` (one row per model and sigma), ``samples.csv``,
``linearity.png``, ``distance.png``, ``distillation.png``, ``capacity.png``, ``samples.png``,
``training_time.csv`` and ``training_time.png`` (with checkpoints), ``timings.json``. Every
per-sigma measure carries a 95% bootstrap interval over its probe inputs (``*_low``, ``*_high``),
and the linear distillation has its control: the same fit applied to the Gaussian and to the
empirical denoiser (``distill_w_error_gaussian``, ``distill_w_error_empirical``).
Trained models and per-model measurements are resumable units.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcore._files import load_json
from diffcore.analysis.generalization import distill_affine, linearity_cosines
from diffcore.experiments import _stack, base, hooks as study_hooks, plotting, recipes
from diffcore.metrics import intervals

log = logging.getLogger(__name__)

NAME = "hidden-gaussian"


@dataclass(frozen=True)
class HiddenGaussianConfig:
    models_from: str = ""  # a reproducibility study's --out folder to reuse models from
    dataset: str = "digits"
    data_root: str = ""
    model_preset: str = "ddpmpp-digits"
    widths: tuple[int, ...] = (8,)  # with models_from: () = every width found
    sizes: tuple[int, ...] = (16, 1024)  # with models_from: () = every N found
    train_seeds: tuple[int, ...] = (0,)
    subset_seed: int = 0
    train_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_warmup_images: int = 1000
    precond: str = "edm"  # edm | vp (EDM's VP preconditioning and loss)
    augment_p: float = 0.0  # EDM's non-leaky augmentation probability (0: off)
    sigma_p_mean: float = -1.2  # training noise levels ln sigma ~ N(sigma_p_mean, sigma_p_std^2)
    sigma_p_std: float = 1.2  # (EDM's P_mean, P_std; precond=edm; unused with models_from)
    train_target: str = "clean"  # EDM loss target: clean | empirical (at sigma >= target_sigma_min)
    target_sigma_min: float = 0.0  # (diffcore.train.loss.EDMLoss; docs/train.md)
    sigma_log_uniform: float = 0.0  # share of training noise levels log-uniform over [sigma_min, sigma_max]
    num_sigmas: int = 40  # EDM grid (rho = 7)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    linearity_pairs: int = 64
    distill_samples: int = 256  # noisy images per sigma (> pixels + 1 for the fit)
    probe_seed: int = 7
    num_samples: int = 64
    sample_seed_start: int = 100000
    sampler_steps: int = 18
    grid_samples: int = 8
    # training time: the distances on noisy training images at this many log-spaced
    # checkpoints of every model trained here, from first_checkpoint to train_steps (0: none; with
    # models_from not measured, and results.json says so in training_time_skipped)
    time_checkpoints: int = 0
    first_checkpoint: int = 1

    def validate(self, pixels: int | None = None) -> None:
        """Raise ConfigError naming the first field out of its range (``pixels``: numbers per image
        of the dataset, once loaded, bound ``distill_samples``)."""
        base.check_fields(self, FIELD_CHECKS)
        if not self.models_from and not (self.widths and self.sizes):
            raise base.ConfigError(
                "widths, sizes: expected at least one value each (an empty tuple means "
                "'every one found' and needs models_from)"
            )
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        base.check_sigmas(self.sigma_min, self.sigma_max)
        if self.precond != "edm" and (self.sigma_p_mean, self.sigma_p_std) != _stack.EDM_SIGMA_LOGNORMAL:
            raise base.ConfigError(
                "sigma_p_mean, sigma_p_std: only precond=edm draws ln sigma ~ N(mean, std^2); "
                f"precond={self.precond} has its own noise levels"
            )
        if self.sigma_log_uniform and self.precond != "edm":
            raise base.ConfigError(
                f"sigma_log_uniform: only precond=edm takes a log-uniform share of noise "
                f"levels, got precond={self.precond}"
            )
        if self.train_target == "clean" and self.target_sigma_min:
            raise base.ConfigError(
                "target_sigma_min: only train_target=empirical uses it, got "
                f"{self.target_sigma_min} with train_target=clean"
            )
        if self.train_target != "clean" and (self.precond != "edm" or self.augment_p > 0):
            raise base.ConfigError(
                f"train_target: {self.train_target!r} needs precond=edm and augment_p=0, got "
                f"precond={self.precond}, augment_p={self.augment_p}"
            )
        if self.time_checkpoints:
            if not 0 < self.first_checkpoint < self.train_steps:
                raise base.ConfigError(
                    f"first_checkpoint: expected 0 < first_checkpoint < train_steps = {self.train_steps}, "
                    f"got {self.first_checkpoint}"
                )
            if not 3 <= self.time_checkpoints <= self.train_steps - self.first_checkpoint + 1:
                raise base.ConfigError(
                    f"time_checkpoints: expected 0 or 3 .. {self.train_steps - self.first_checkpoint + 1} "
                    f"(distinct steps from first_checkpoint to train_steps), got {self.time_checkpoints}"
                )
        if pixels is not None and self.distill_samples <= pixels + 1:
            raise base.ConfigError(
                f"distill_samples: the linear fit needs more than pixels + 1 = {pixels + 1} "
                f"noisy images, got {self.distill_samples}"
            )


FIELD_CHECKS: dict[str, base.Check] = {
    "widths": base.tuple_of(base.positive, min_len=0),  # with models_from: () = every width found
    "sizes": base.tuple_of(base.integer(2), min_len=0),  # with models_from: () = every N found
    "num_sigmas": base.integer(2),  # its measures are curves over the noise grid
    "linearity_pairs": base.positive,
    "distill_samples": base.integer(2),
    "train_target": base.one_of("clean", "empirical"),
    "target_sigma_min": base.optional_sigma,
    "time_checkpoints": base.integer(0),
    "first_checkpoint": base.positive,
}


def _quick() -> HiddenGaussianConfig:
    """Two UNets trained here, minutes on a 2-core CPU (docs/studies.md): the main job's quick
    recipe (the light UNet at width 16, 1000 steps at batch 32, lr 1e-3) at N = 16 (memorizes) and
    N = 1797 (all digits, generalizes), trained by plain EDM denoising score matching (the clean
    image as the target), with the noise levels covering the measured grid: half of them
    EDM's ln sigma ~ N(-1.2, 1.2^2), half log-uniform over [sigma_min, sigma_max] = [0.002, 80]
    (EDM's alone puts 1% of its draws above sigma 5, none near 80). Fixed before looking at the
    outcome. Each model keeps 10 log-spaced checkpoints (steps 1 .. 1000) where the distances on
    noisy training images are measured again (training time; fixed before looking).
    :func:`_empirical_target` is the earlier recipe at the same budget, kept as an option.
    ``--set models_from=runs/quick`` measures the main job's models instead (widths 8 and 16)."""
    return HiddenGaussianConfig(
        **recipes.DIGITS_QUICK_TRAINING,
        widths=(16,),
        sizes=(16, 1797),
        sigma_log_uniform=0.5,
        time_checkpoints=10,
        first_checkpoint=1,
    )


def _empirical_target() -> HiddenGaussianConfig:
    """Issue 19's recipe, an option and not the default: the quick preset's models and budget, with
    training noise levels ln sigma ~ N(1.0, 2.0^2) and, at sigma >= 2, the empirical denoiser of the
    training set as the regression target (diffcore.train.loss.EDMLoss, target "empirical": same
    optimum, lower-variance target). It was chosen among about 20 variants by looking at whether the
    directions held, so it is no evidence on its own; docs/studies.md reports it beside
    the quick preset."""
    return dataclasses.replace(
        _quick(),
        sigma_log_uniform=0.0,
        time_checkpoints=0,
        sigma_p_mean=1.0,
        sigma_p_std=2.0,
        train_target="empirical",
        target_sigma_min=2.0,
    )


def _tiny() -> HiddenGaussianConfig:
    """Seconds with stand-in hooks (tests)."""
    return HiddenGaussianConfig(
        widths=(4,),
        sizes=(16, 512),
        num_sigmas=12,
        linearity_pairs=16,
        distill_samples=96,
        num_samples=8,
        sampler_steps=8,
        grid_samples=4,
        train_steps=10,
        time_checkpoints=4,
        first_checkpoint=1,
    )


def _paper() -> HiddenGaussianConfig:
    """The hidden-Gaussian paper's training, "the EDM configuration with a fixed channel size of
    128" (EDM's CIFAR-10 recipe: EDM preconditioning, batch 512, lr 1e-3, 10 Mimg warm-up, 200 Mimg
    = 390 625 steps, augmentation p = 0.12), on CIFAR-10 subsets of the paper's FFHQ sizes (68 ..
    35000, and all 50000 CIFAR-10 images). Linear distillation by ordinary least squares on 12 800
    noisy images per sigma: over 4x the 3073 unknowns per output (3072 pixels + bias). Set
    data_root, or models_from a finished reproducibility run (docs/experiments.md: the table)."""
    return HiddenGaussianConfig(
        **recipes.EDM_CIFAR10_TRAINING,
        widths=(128,),
        sizes=(68, 137, 1094, 8750, 35000, 50000),
        batch_size=512,
        augment_p=0.12,
        linearity_pairs=256,
        distill_samples=12_800,
        num_samples=1024,
        grid_samples=16,
    )


PRESETS: dict[str, Callable[[], HiddenGaussianConfig]] = {
    "quick": _quick,
    "empirical-target": _empirical_target,
    "tiny": _tiny,
    "paper": _paper,
}
CONFIG_CLASS = HiddenGaussianConfig


# ----------------------------------------------------------------------------- measurements


def _linearity(name: str, denoiser, x1: torch.Tensor, x2: torch.Tensor, sigma: float) -> dict[str, float]:
    """The linearity score with its bootstrap interval over the input pairs (flat columns)."""
    cos = linearity_cosines(denoiser, x1, x2, sigma).numpy()
    return intervals.flat(name, intervals.bootstrap_sums(cos, lambda s: s[:, 0] / cos.shape[0]))


def measure_curves(
    model,
    gaussian,
    empirical,
    images: torch.Tensor,
    sigmas: list[float],
    config: HiddenGaussianConfig,
    train_images: torch.Tensor | None = None,
) -> list[dict]:
    """Per-sigma linearity, distances and distillation of ``model`` (see the module docstring).

    ``images`` [P, ...]: the pool the noisy inputs are drawn from (seeded); ``train_images``
    [N, ...]: the model's training images, for the ``*_train`` distances on noisy training images
    (the inputs the model was trained on; omitted when None). All inputs are float32."""
    c = config
    g = torch.Generator().manual_seed(c.probe_seed)
    shape = tuple(images.shape[1:])
    m = c.distill_samples
    pick = torch.randint(0, images.shape[0], (m + 2 * c.linearity_pairs,), generator=g)
    g_train = torch.Generator().manual_seed(c.probe_seed + 1)
    rows = []
    for sigma in sigmas:
        z = torch.randn((m + 4 * c.linearity_pairs, *shape), generator=g)
        x = images[pick[:m]] + sigma * z[:m]
        p = c.linearity_pairs
        y1, y2 = images[pick[m : m + p]], images[pick[m + p : m + 2 * p]]
        z1, z2, z3, z4 = (z[m + i * p : m + (i + 1) * p] for i in range(4))
        with torch.no_grad():
            out_m, out_g, out_e = model(x, sigma).float(), gaussian(x, sigma).float(), empirical(x, sigma).float()
        w_fit, _, r2 = distill_affine(x, out_m)
        w_g = gaussian.jacobian(sigma)
        rows.append(
            {
                "sigma": sigma,
                **_linearity("linearity_noise", model, sigma * z1, sigma * z2, sigma),
                **_linearity("linearity_image", model, y1 + sigma * z3, y2 + sigma * z4, sigma),
                **_linearity("linearity_noise_empirical", empirical, sigma * z1, sigma * z2, sigma),
                **_linearity("linearity_image_empirical", empirical, y1 + sigma * z3, y2 + sigma * z4, sigma),
                **_distances(out_m, out_g, out_e, ""),
                "distill_w_error": _w_error(w_fit, w_g),
                "distill_r2": r2,
                # the control: the same fit applied to the Gaussian denoiser (its own W: 0 up to the
                # fit's error) and to the empirical one (a memorizer's reference value), and the
                # conditioning of the fit's inputs (their covariance's largest / smallest eigenvalue)
                "distill_w_error_gaussian": _w_error(distill_affine(x, out_g)[0], w_g),
                "distill_w_error_empirical": _w_error(distill_affine(x, out_e)[0], w_g),
                "distill_condition": _condition(x),
                **(
                    {}
                    if train_images is None
                    else _distances_on(
                        model, gaussian, empirical, _noisy(train_images, m, sigma, g_train), sigma, "_train"
                    )
                ),
            }
        )
    return rows


def _noisy(images: torch.Tensor, count: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` noisy images ``y + sigma z``, y drawn from ``images`` [P, ...] (seeded by ``generator``)."""
    y = images[torch.randint(0, images.shape[0], (count,), generator=generator)]
    return y + sigma * torch.randn(y.shape, generator=generator)


def _w_error(w_fit: torch.Tensor, w_g: torch.Tensor) -> float:
    return float((w_fit - w_g).norm() / w_g.norm().clamp_min(1e-30))


def _condition(x: torch.Tensor) -> float:
    """Condition number of the covariance of the inputs ``x [M, ...]`` of a least-squares fit."""
    xf = x.reshape(x.shape[0], -1).double()
    eig = torch.linalg.eigvalsh(torch.cov(xf.T))
    return float(eig[-1] / eig[0].clamp_min(1e-300))


def _distances(out_m: torch.Tensor, out_g: torch.Tensor, out_e: torch.Tensor, suffix: str) -> dict[str, float]:
    """``dist_gaussian``, ``dist_empirical``, ``dist_empirical_gaussian`` (relative Frobenius
    distances over the batch, as :func:`relative_distance`) and ``gap`` = dist_gaussian -
    dist_empirical (names + ``suffix``), from the model's, the Gaussian's and the empirical
    denoiser's outputs on the same inputs ``[M, ...]``; each with its bootstrap interval over the
    M inputs (``*_low``, ``*_high``; the gap's on the same resamples, so paired)."""

    def sq(a, b=None):
        diff = a.double() if b is None else a.double() - b.double()
        return diff.reshape(diff.shape[0], -1).square().sum(1)

    terms = torch.stack([sq(out_m, out_g), sq(out_g), sq(out_m, out_e), sq(out_e), sq(out_e, out_g)], 1).numpy()
    ratio = lambda s, i, j: np.sqrt(s[:, i] / np.maximum(s[:, j], 1e-300))  # noqa: E731
    found = intervals.bootstrap_sums_each(
        terms,
        {
            "dist_gaussian": lambda s: ratio(s, 0, 1),
            "dist_empirical": lambda s: ratio(s, 2, 3),
            "dist_empirical_gaussian": lambda s: ratio(s, 4, 1),
            "gap": lambda s: ratio(s, 0, 1) - ratio(s, 2, 3),
        },
    )
    out: dict[str, float] = {}
    for name, interval in found.items():
        out.update(intervals.flat(name + suffix, interval))
    return out


def _distances_on(model, gaussian, empirical, x: torch.Tensor, sigma: float, suffix: str) -> dict[str, float]:
    """:func:`_distances` of the three denoisers on inputs ``x`` at ``sigma``."""
    with torch.no_grad():
        return _distances(model(x, sigma).float(), gaussian(x, sigma).float(), empirical(x, sigma).float(), suffix)


def _row_interval(row: dict, key: str) -> intervals.Interval:
    return intervals.Interval(row[key], row[f"{key}_low"], row[f"{key}_high"], method="bootstrap")


def _extreme(rows: list[dict], key: str, worst) -> dict | None:
    """The row with the worst ``key`` (``worst``: ``max`` or ``min``), None without rows."""
    return worst(rows, key=lambda r: r[key]) if rows else None


def effect_properties(
    results: dict, high_sigma: float = 5.0, mid=(0.1, 2.0), tolerance: float = 0.05
) -> dict[str, dict]:
    """What the study's figure must show, each decided on 95% bootstrap intervals over
    the probe inputs and recorded as ``{"holds": bool, ...}`` with the deciding row's intervals
    (:func:`diffcore.metrics.intervals.claim`), from the distances on noisy training images
    (``dist_*_train``: each model's denoiser on the inputs it was trained on, against the Gaussian
    and the empirical denoiser of the same N images):

    - ``close_to_gaussian_at_high_sigma``: every model's distance to the Gaussian denoiser has its
      upper end below ``tolerance`` at every sigma >= ``high_sigma`` (on the pool probes too);
    - ``largest_n_closer_to_gaussian``: for sigma in ``mid`` the largest-N model(s) closer to the
      Gaussian denoiser than to the empirical one: the paired gap dist_gaussian - dist_empirical
      has its upper end below 0 at every sigma there;
    - ``smallest_n_closer_to_empirical``: the smallest-N model(s): the gap's lower end above 0.

    The pool probes (``dist_gaussian``, ``dist_empirical``: noisy images of the whole dataset) are
    mostly images the small-N model never saw; there, at small sigma, no model with EDM's
    preconditioning (``c_skip`` near 1) snaps to a training image the way the empirical denoiser
    does, so they test generalization, not memorization (docs/studies.md)."""
    sizes = sorted({m["n"] for m in results["models"]})
    rows = results["curves"]
    high = [r for r in rows if r["sigma"] >= high_sigma]
    mid_rows = lambda n: [r for r in rows if r["n"] == n and mid[0] <= r["sigma"] <= mid[1]]  # noqa: E731
    worst_pool = _extreme(high, "dist_gaussian_high", max)
    worst_train = _extreme(high, "dist_gaussian_train_high", max)
    large, small = mid_rows(sizes[-1]), mid_rows(sizes[0])
    worst_large, worst_small = _extreme(large, "gap_train_high", max), _extreme(small, "gap_train_low", min)

    def at(row: dict | None, key: str) -> dict:
        if row is None:
            return {}
        return {"model": row["model"], "sigma": row["sigma"], key: _row_interval(row, key).as_dict()}

    return {
        "close_to_gaussian_at_high_sigma": intervals.claim(
            bool(high)
            and worst_pool["dist_gaussian_high"] <= tolerance
            and worst_train["dist_gaussian_train_high"] <= tolerance,
            tolerance=tolerance,
            high_sigma=high_sigma,
            worst_pool=at(worst_pool, "dist_gaussian"),
            worst_train=at(worst_train, "dist_gaussian_train"),
        ),
        "largest_n_closer_to_gaussian": intervals.claim(
            bool(large) and worst_large["gap_train_high"] < 0,
            mid=list(mid),
            n=sizes[-1],
            worst=at(worst_large, "gap_train"),
        ),
        "smallest_n_closer_to_empirical": intervals.claim(
            bool(small) and worst_small["gap_train_low"] > 0,
            mid=list(mid),
            n=sizes[0],
            worst=at(worst_small, "gap_train"),
        ),
    }


# ----------------------------------------------------------------------------- the study


@dataclass
class _Model(_stack.ModelOfSubset):
    unit: base.Unit


class _Study:
    def __init__(self, config: HiddenGaussianConfig, out, hooks, device: str, progress: bool):
        self.c = config
        self.ws = base.Workspace(out)
        self.hooks = hooks
        self.device = device
        self.progress = progress

    # models --------------------------------------------------------------------
    def model_spec(self, width: int, n: int, seed: int) -> dict:
        spec = _stack.model_unit_spec(self.c, width, n, seed)
        steps = self.checkpoint_steps()
        return {**spec, "keep_steps": steps} if steps else spec

    def checkpoint_steps(self) -> list[int]:
        """The log-spaced training steps measured for training time (:func:`checkpoint_steps`)."""
        c = self.c
        if not c.time_checkpoints or c.models_from:  # reused models keep no checkpoints
            return []
        return checkpoint_steps(c.first_checkpoint, c.train_steps, c.time_checkpoints)

    def trained_models(self, pool: torch.Tensor) -> list[_Model]:
        c = self.c
        out = []
        for width in c.widths:
            for n in c.sizes:
                for seed in c.train_seeds:
                    spec = self.model_spec(width, n, seed)
                    train_images, _ = self.hooks.subset(pool, n, c.subset_seed)
                    name = _stack.model_unit_name(width, n, seed)
                    unit = self.ws.run_unit(
                        "models",
                        name,
                        spec,
                        lambda tmp, work, s=spec, t=train_images: self.hooks.train(
                            t, s, tmp, work, device=self.device, progress=self.progress
                        ),
                    )
                    self.ws.record(unit)
                    out.append(_Model(name, width, n, seed, unit))
        return out

    def reused_models(self) -> list[_Model]:
        """Every finished model unit of the reproducibility study in ``models_from`` (filtered by
        widths / sizes / train_seeds when those are non-empty), checked against its manifest."""
        c = self.c
        root = Path(c.models_from)
        if not root.is_dir():
            raise base.ConfigError(f"models_from: {root} is not a folder")
        other = base.Workspace(root, read_only=True)  # only read: never created, need not be writable
        found = []
        for manifest in sorted((root / "units" / "models").glob("*/MANIFEST.json")):
            spec = load_json(manifest, what="models_from: unit manifest", follow=False)["spec"]
            if (
                (c.widths and spec["width"] not in c.widths)
                or (c.sizes and spec["n"] not in c.sizes)
                or (c.train_seeds and spec["seed"] not in c.train_seeds)
            ):
                continue
            if spec["dataset"] != c.dataset or spec["subset_seed"] != c.subset_seed:
                raise ValueError(
                    f"models_from: {manifest.parent.name} was trained on {spec['dataset']} "
                    f"(subset_seed {spec['subset_seed']}); this config asks for {c.dataset} "
                    f"(subset_seed {c.subset_seed})"
                )
            unit = other.finished("models", manifest.parent.name, spec)
            found.append(_Model(manifest.parent.name, spec["width"], spec["n"], spec["seed"], unit))
        if not found:
            raise ValueError(
                f"models_from: no finished model under {root / 'units' / 'models'} matches "
                f"widths={c.widths}, sizes={c.sizes}, train_seeds={c.train_seeds}; run "
                f"'diffcore run reproducibility --preset quick --out {root}' first, or "
                "--set models_from=<a reproducibility study's --out folder> (or models_from= to train here)"
            )
        return sorted(found, key=lambda m: (m.width, m.n, m.seed))

    # measurements -------------------------------------------------------------
    def sigmas(self) -> list[float]:
        from diffcore import sampler

        c = self.c
        return sampler.karras_sigmas(c.num_sigmas, c.sigma_min, c.sigma_max, append_zero=False).tolist()

    def measure_unit(self, model: _Model, pool: torch.Tensor) -> base.Unit:
        from diffcore import metrics
        from diffcore.denoisers import GaussianDenoiser

        c = self.c
        spec = {
            "model": model.unit.spec,
            "num_sigmas": c.num_sigmas,
            "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max,
            "linearity_pairs": c.linearity_pairs,
            "distill_samples": c.distill_samples,
            "probe_seed": c.probe_seed,
            "num_samples": c.num_samples,
            "sample_seed_start": c.sample_seed_start,
            "sampler_steps": c.sampler_steps,
            "probes": ["pool", "train"],  # distances on noisy pool and training images
            "intervals": "bootstrap over probes; distillation control",
        }

        def produce(tmp: Path, work: Path):
            train_images, _ = self.hooks.subset(pool, model.n, c.subset_seed)
            train_images = train_images.float()
            denoiser = self.hooks.load(model.unit.path, device=self.device)
            gaussian = GaussianDenoiser.fit(train_images)
            empirical = self.hooks.empirical_denoiser(train_images)
            curves = measure_curves(
                _on_cpu(denoiser, self.device),
                gaussian,
                empirical,
                pool.float(),
                self.sigmas(),
                c,
                train_images=train_images,
            )
            seeds = list(range(c.sample_seed_start, c.sample_seed_start + c.num_samples))
            shape = tuple(pool.shape[1:])

            def sample(d):
                return (
                    self.hooks.sample(
                        d,
                        seeds,
                        shape,
                        steps=c.sampler_steps,
                        solver="heun",
                        sigma_min=c.sigma_min,
                        sigma_max=c.sigma_max,
                        device=self.device,
                        progress=self.progress,
                    )
                    .float()
                    .cpu()
                )

            s_model = sample(denoiser)
            s_emp = sample(
                empirical if str(self.device) == "cpu" else self.hooks.empirical_denoiser(train_images.to(self.device))
            )
            noise = self.hooks.noise_from_seeds(seeds, shape, "cpu", torch.float64)
            s_gauss = gaussian.sample(noise, c.sigma_max).float()
            torch.save({"model": s_model, "gaussian": s_gauss, "empirical": s_emp}, tmp / "samples.pt")
            pfd = lambda a, b: metrics.pfd_from_samples(a, b, "per_dim").value  # noqa: E731
            return {
                "curves": curves,
                "pfd_model_gaussian": pfd(s_model, s_gauss),
                "pfd_model_empirical": pfd(s_model, s_emp),
                "pfd_gaussian_empirical": pfd(s_gauss, s_emp),
            }

        unit = self.ws.run_unit("measure", model.label, spec, produce)
        self.ws.record(unit)
        return unit

    def training_time_unit(self, model: _Model, pool: torch.Tensor) -> base.Unit:
        """The distances on noisy training images (the ``*_train`` columns of :func:`measure_curves`,
        on the same probes: same seed) of ``model`` at every checkpoint step, against the Gaussian
        and the empirical denoiser of its N images."""
        from diffcore.denoisers import GaussianDenoiser

        c = self.c
        spec = {
            "model": model.unit.spec,
            "steps": self.checkpoint_steps(),
            "num_sigmas": c.num_sigmas,
            "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max,
            "distill_samples": c.distill_samples,
            "probe_seed": c.probe_seed,
        }

        def produce(tmp: Path, work: Path):
            train_images = self.hooks.subset(pool, model.n, c.subset_seed)[0].float()
            gaussian = GaussianDenoiser.fit(train_images)
            empirical = self.hooks.empirical_denoiser(train_images)
            rows = []
            for step in self.checkpoint_steps():
                denoiser = _on_cpu(
                    self.hooks.load(model.unit.path / "steps" / _stack.step_name(step), device=self.device),
                    self.device,
                )
                g_train = torch.Generator().manual_seed(c.probe_seed + 1)  # measure_curves' training probes
                for sigma in self.sigmas():
                    x = _noisy(train_images, c.distill_samples, sigma, g_train)
                    rows.append(
                        {
                            "step": step,
                            "sigma": sigma,
                            **_distances_on(denoiser, gaussian, empirical, x, sigma, "_train"),
                        }
                    )
            return {"rows": rows}

        unit = self.ws.run_unit("training-time", model.label, spec, produce)
        self.ws.record(unit)
        return unit

    def run(self) -> dict:
        c = self.c
        pool = self.hooks.load_dataset(c.dataset, c.data_root)
        c.validate(pool[0].numel())
        reused = self.reused_models() if c.models_from else None  # checked before the folder is bound
        self.ws.bind_config(c)
        models = reused if reused is not None else self.trained_models(pool)
        per_model, curves, samples = [], [], {}
        for model in models:
            unit = self.measure_unit(model, pool)
            meta = unit.meta
            per_model.append(
                {
                    "model": model.label,
                    "width": model.width,
                    "n": model.n,
                    "seed": model.seed,
                    "reused_from": c.models_from or None,
                    **{k: meta[k] for k in ("pfd_model_gaussian", "pfd_model_empirical", "pfd_gaussian_empirical")},
                }
            )
            curves.extend({"model": model.label, "width": model.width, "n": model.n, **row} for row in meta["curves"])
            samples[model.label] = torch.load(unit.file("samples.pt"), weights_only=True)
            per_model[-1].update(pfd_intervals(samples[model.label]))
        results = {"experiment": NAME, "config": dataclasses.asdict(c), "models": per_model, "curves": curves}
        results["capacity"] = capacity(results)
        results["effect_properties"] = effect_properties(results)
        if c.time_checkpoints and c.models_from:
            results["training_time_skipped"] = "models_from: the reused models keep no checkpoints"
            log.warning("time_checkpoints: not measured, %s", results["training_time_skipped"])
        elif c.time_checkpoints:
            results["training_time"] = [
                {"model": m.label, "width": m.width, "n": m.n, **row}
                for m in models
                for row in self.training_time_unit(m, pool).meta["rows"]
            ]
            results["effect_properties"].update(time_properties(results))
        results = json.loads(base.json_dumps(results))
        self.write(results, samples)
        return results

    def write(self, results: dict, samples: dict) -> None:
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(root / "curves.csv", results["curves"])
        base.atomic_write_csv(root / "samples.csv", results["models"])
        plot_curves(
            results,
            ("linearity_noise", "linearity_image"),
            ("pure-noise inputs", "noisy-image inputs"),
            "linearity score (cosine)",
            root / "linearity.png",
            dashed=("linearity_noise_empirical", "linearity_image_empirical"),
        )
        plot_distances(results, root / "distance.png")
        plot_curves(
            results,
            ("distill_w_error",),
            ("linear distillation vs Gaussian W (dashed: the same fit to the empirical denoiser)",),
            "|W_fit - W_G|_F / |W_G|_F",
            root / "distillation.png",
            logy=True,
            dashed=("distill_w_error_empirical",),
        )
        plot_capacity(results, root / "capacity.png")
        if "training_time" in results:
            base.atomic_write_csv(root / "training_time.csv", results["training_time"])
            plot_training_time(results, root / "training_time.png")
        plot_samples(results, samples, self.c.grid_samples, root / "samples.png")


def plot_samples(results: dict, samples: dict, k: int, path) -> Path:
    """Rows of samples from the same seeds: each model, its Gaussian, its empirical denoiser."""
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    rows, labels = [], []
    for m in results["models"]:
        s = samples[m["model"]]
        rows += [s["model"][:k], s["gaussian"][:k], s["empirical"][:k]]
        labels += [
            f"model {m['model']}",
            f"Gaussian N={m['n']} (PFD {m['pfd_model_gaussian']:.2f})",
            f"empirical N={m['n']} (PFD {m['pfd_model_empirical']:.2f})",
        ]
    grid = plotting.mosaic(rows)
    h = rows[0].shape[2] + 1
    fig, ax = plt.subplots(figsize=(0.55 * k + 3.2, 0.55 * len(rows) + 0.8))
    image = grid.permute(1, 2, 0).numpy()
    ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * h + h / 2 - 1 for r in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_title(
        "same seeds: model / Gaussian (exact flow) / empirical (Heun);\nPFD to the model, RMS per pixel", fontsize=8
    )
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def pfd_intervals(samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """``pfd_model_gaussian``, ``pfd_model_empirical``, ``pfd_gaussian_empirical`` (RMS per pixel,
    ``metrics.pfd_from_samples(..., "per_dim")``) of the sample sets ``{"model", "gaussian",
    "empirical"}`` ``[B, ...]`` from the same seeds, with bootstrap intervals over the B seeds."""
    out: dict[str, float] = {}
    for name, (a, b) in {
        "pfd_model_gaussian": ("model", "gaussian"),
        "pfd_model_empirical": ("model", "empirical"),
        "pfd_gaussian_empirical": ("gaussian", "empirical"),
    }.items():
        diff = (samples[a].double() - samples[b].double()).reshape(samples[a].shape[0], -1)
        per_seed, size = diff.square().mean(1).numpy(), diff.shape[0]
        out.update(
            intervals.flat(name, intervals.bootstrap_sums(per_seed, lambda t, size=size: np.sqrt(t[:, 0] / size)))
        )
    return out


def _on_cpu(denoiser, device: str):
    """The measurements feed CPU tensors: move them to the model's device and back."""
    if str(device) == "cpu":
        return denoiser

    def run(x, sigma):  # in chunks: the paper preset distills from 12 800 images per sigma
        per_sample = isinstance(sigma, torch.Tensor) and sigma.dim() > 0
        sigmas = sigma.to(device).split(1024) if per_sample else [sigma] * -(-x.shape[0] // 1024)
        return torch.cat([denoiser(xc.to(device), sc).cpu() for xc, sc in zip(x.split(1024), sigmas)])

    return run


def plot_distances(results: dict, path, high_sigma: float = 5.0, mid=(0.1, 2.0), tolerance: float = 0.05) -> Path:
    """A panel per model (columns) and probe set (rows: noisy training images, noisy pool images):
    the model's relative distance to the Gaussian (solid) and to the empirical denoiser (dashed),
    and theirs to each other (dotted); :func:`effect_properties`' sigma band shaded and its
    high-sigma tolerance drawn."""
    from diffcore.experiments.plotting import finish, plt  # the Agg backend, set in one place

    probes = (("_train", "noisy training images"), ("", "noisy pool images (all digits)"))
    models = results["models"]
    fig, axes = plt.subplots(
        len(probes), len(models), figsize=(4.4 * len(models), 3.3 * len(probes)), squeeze=False, sharey="row"
    )
    for row, (suffix, probe) in enumerate(probes):
        for col, m in enumerate(models):
            ax = axes[row][col]
            pts = [r for r in results["curves"] if r["model"] == m["model"]]
            sig = [r["sigma"] for r in pts]
            ax.axvspan(*mid, color="0.92", zorder=0)
            ax.hlines(
                tolerance,
                high_sigma,
                max(sig),
                colors="k",
                linestyles=":",
                lw=1,
                label=f"{tolerance} (sigma >= {high_sigma:g})",
            )
            ax.plot(sig, [r["dist_gaussian" + suffix] for r in pts], "-", marker=".", color="C0", label="to Gaussian")
            _band(ax, pts, "dist_gaussian" + suffix, "C0")
            ax.plot(
                sig, [r["dist_empirical" + suffix] for r in pts], "--", marker=".", color="C3", label="to empirical"
            )
            _band(ax, pts, "dist_empirical" + suffix, "C3")
            ax.plot(
                sig,
                [r["dist_empirical_gaussian" + suffix] for r in pts],
                ":",
                color="0.4",
                label="empirical vs Gaussian",
            )
            ax.set_xscale("log")
            ax.set_xlabel("sigma")
            ax.set_title(f"{m['model']} (N={m['n']}), on {probe}", fontsize=8)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("|D - D_ref| / |D_ref|")
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    return finish(
        fig,
        path,
        suptitle="relative distance of each model to the Gaussian and the empirical denoiser of its N images\n"
        "(bands: 95% bootstrap intervals over the probe inputs)",
    )


def _band(ax, pts: list[dict], key: str, color) -> None:
    """Shade the rows' 95% interval of ``key`` (``key_low`` .. ``key_high``) against sigma, when recorded."""
    if pts and f"{key}_low" in pts[0]:
        ax.fill_between(
            [r["sigma"] for r in pts],
            [r[f"{key}_low"] for r in pts],
            [r[f"{key}_high"] for r in pts],
            color=color,
            alpha=0.18,
            linewidth=0,
        )


def checkpoint_steps(first: int, last: int, count: int) -> list[int]:
    """``count`` distinct integer steps from ``first`` to ``last`` (both included), evenly spaced in
    log time where the integers allow (steps that round together move up by one)."""
    if not 0 < first < last or not 2 <= count <= last - first + 1:
        raise ValueError(
            f"first, last, count: expected 0 < first < last and 2 <= count <= last - first + 1, "
            f"got {first}, {last}, {count}"
        )
    raw = np.exp(np.linspace(math.log(first), math.log(last), count))
    steps: list[int] = []
    for i, value in enumerate(raw):
        step = max(round(float(value)), steps[-1] + 1 if steps else first)
        steps.append(min(step, last - (count - 1 - i)))  # leave room for the steps after it
    return steps


def _time_curve(results: dict, model: str, mid=(0.1, 2.0)) -> list[dict]:
    """Per checkpoint step of ``model``: the distances to G and E at the grid sigma nearest
    :data:`CAPACITY_SIGMA` and the least favourable gap over the ``mid`` band (its row: the largest
    upper end, for "closer to G", with the sigma where it is)."""
    rows = [r for r in results["training_time"] if r["model"] == model]
    sigmas = sorted({r["sigma"] for r in rows})
    at_sigma = min(sigmas, key=lambda v: abs(math.log(v / CAPACITY_SIGMA)))
    out = []
    for step in sorted({r["step"] for r in rows}):
        here = [r for r in rows if r["step"] == step]
        mid_rows = [r for r in here if mid[0] <= r["sigma"] <= mid[1]]
        worst = max(mid_rows, key=lambda r: r["gap_train_high"])
        point = next(r for r in here if r["sigma"] == at_sigma)
        out.append(
            {
                "step": step,
                "sigma": at_sigma,
                **{k: point[k] for k in point if k.startswith(("dist_gaussian_train", "dist_empirical_train"))},
                "worst_gap_sigma": worst["sigma"],
                **{f"worst_{k}": worst[k] for k in ("gap_train", "gap_train_low", "gap_train_high")},
            }
        )
    return out


def time_properties(results: dict, mid=(0.1, 2.0)) -> dict[str, dict]:
    """Training-time claims (the paper: early in training even memorizing-size models are near the
    Gaussian denoiser), for the smallest-N model(s), fixed before looking, on the 95% bootstrap
    intervals over the probes:

    - ``smallest_n_closer_to_gaussian_early``: at some checkpoint between the first and the last,
      the paired gap dist_gaussian_train - dist_empirical_train has its upper end below 0 at every
      sigma in ``mid``, and the distance to G at the grid sigma nearest 1 lies clearly below the
      first checkpoint's (the control: a near-untrained network can be farther from the empirical
      denoiser than from G without having learned anything; the first checkpoint stands for it).
      Records the steps where it holds and the least favourable gap per step;
    - ``smallest_n_distance_to_gaussian_dips``: the distance to G at the grid sigma nearest 1
      across the checkpoints has an interior minimum clearly below the first and the last
      checkpoint (:func:`intervals.dips`).

    The largest-N model's curves are the reference (``training_time`` in results.json)."""
    sizes = sorted({m["n"] for m in results["models"]})
    small = [m["model"] for m in results["models"] if m["n"] == sizes[0]]
    early, dips, curves = {}, {}, {}
    for model in small:
        curve = _time_curve(results, model, mid)
        curves[model] = curve
        distance = [_row_interval(p, "dist_gaussian_train") for p in curve]
        early[model] = [
            p["step"]
            for p, d in zip(curve[1:-1], distance[1:-1])
            if p["worst_gap_train_high"] < 0 and intervals.clearly_below(d, distance[0])
        ]
        dips[model] = intervals.dips(distance)
        dips[model]["step_at"] = curve[dips[model]["at"]]["step"]
    return {
        "smallest_n_closer_to_gaussian_early": intervals.claim(
            all(early.values()),
            n=sizes[0],
            mid=list(mid),
            steps_closer_to_gaussian=early,
            least_favourable_gap={
                model: [
                    {
                        "step": p["step"],
                        "sigma": p["worst_gap_sigma"],
                        "gap": p["worst_gap_train"],
                        "low": p["worst_gap_train_low"],
                        "high": p["worst_gap_train_high"],
                    }
                    for p in curve
                ]
                for model, curve in curves.items()
            },
        ),
        "smallest_n_distance_to_gaussian_dips": intervals.claim(
            all(d["holds"] for d in dips.values()), n=sizes[0], per_model=dips
        ),
    }


def plot_training_time(results: dict, path) -> Path:
    """Left: each model's distance to G (solid) and to E (dashed) on its noisy training images at
    the grid sigma nearest 1 against the training step; right: the least favourable gap G - E over
    sigma in [0.1, 2] per step (below 0 at every level: closer to G). Bands and bars: 95% bootstrap
    intervals over the probes."""
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    sigma = None
    for index, m in enumerate(results["models"]):
        curve = _time_curve(results, m["model"])
        if not curve:
            continue
        sigma = curve[0]["sigma"]
        steps = [p["step"] for p in curve]
        color = f"C{index}"
        for key, style, label in (("dist_gaussian_train", "-", "to G"), ("dist_empirical_train", "--", "to E")):
            left.plot(steps, [p[key] for p in curve], style, marker=".", color=color, label=f"{m['model']} {label}")
            left.fill_between(
                steps,
                [p[f"{key}_low"] for p in curve],
                [p[f"{key}_high"] for p in curve],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
        gap = [p["worst_gap_train"] for p in curve]
        right.errorbar(
            steps,
            gap,
            yerr=[
                [g - p["worst_gap_train_low"] for g, p in zip(gap, curve)],
                [p["worst_gap_train_high"] - g for g, p in zip(gap, curve)],
            ],
            marker="o",
            capsize=3,
            color=color,
            label=f"{m['model']} (N={m['n']})",
        )
    right.axhline(0, color="k", lw=0.8)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    left.set_ylabel("|D - D_ref| / |D_ref| (noisy training images)")
    left.set_title(f"distance to G and E at sigma = {sigma:.3g} against training time", fontsize=8)
    right.set_ylabel("largest gap G - E over sigma in [0.1, 2]")
    right.set_title("least favourable gap (bars: 95% bootstrap over the probes)", fontsize=8)
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


CAPACITY_SIGMA = 1.0
"""The capacity figure's noise level: the grid's sigma nearest 1 (mid-SNR for images in [-1, 1])."""


def capacity(results: dict) -> dict:
    """Distance to the Gaussian denoiser (noisy training images) against N, one curve per width, at
    the grid sigma nearest :data:`CAPACITY_SIGMA`, with the intervals: ``{"sigma", "widths": {w:
    {"n", "dist_gaussian_train", "_low", "_high"}}}`` (the paper: the Gaussian structure appears
    when N is large relative to capacity, so wider models need larger N)."""
    sigmas = sorted({r["sigma"] for r in results["curves"]})
    sigma = min(sigmas, key=lambda v: abs(math.log(v / CAPACITY_SIGMA)))
    out: dict = {"sigma": sigma, "widths": {}}
    for width in sorted({m["width"] for m in results["models"]}):
        rows = sorted(
            (r for r in results["curves"] if r["width"] == width and r["sigma"] == sigma), key=lambda r: r["n"]
        )
        key = "dist_gaussian_train"
        out["widths"][str(width)] = {
            "n": [r["n"] for r in rows],
            **{k: [r[k] for r in rows] for k in (key, f"{key}_low", f"{key}_high")},
        }
    return out


def plot_capacity(results: dict, path) -> Path:
    from diffcore.experiments.plotting import finish, plt  # the Agg backend, set in one place

    cap = results["capacity"]
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for width, curve in cap["widths"].items():
        v = curve["dist_gaussian_train"]
        err = [
            [a - lo for a, lo in zip(v, curve["dist_gaussian_train_low"])],
            [hi - a for a, hi in zip(v, curve["dist_gaussian_train_high"])],
        ]
        ax.errorbar(curve["n"], v, yerr=err, marker="o", capsize=3, label=f"width {width}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (training images)")
    ax.set_ylabel("|D - D_G| / |D_G| (noisy training images)")
    ax.set_title(
        f"distance to the Gaussian denoiser at sigma = {cap['sigma']:.3g}\n(bars: 95% bootstrap "
        "intervals over the probe inputs)",
        fontsize=8,
    )
    return finish(fig, path, [ax])


def plot_curves(results: dict, keys, titles, ylabel: str, path, dashed=None, logy: bool = False) -> Path:
    from diffcore.experiments.plotting import finish, plt  # the Agg backend, set in one place

    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.4), squeeze=False)
    labels = [m["model"] for m in results["models"]]
    for i, (ax, key, title) in enumerate(zip(axes[0], keys, titles)):
        for label in labels:
            pts = [r for r in results["curves"] if r["model"] == label]
            n = pts[0]["n"]
            (line,) = ax.plot(
                [r["sigma"] for r in pts], [r[key] for r in pts], "-", marker=".", label=f"{label} (N={n})"
            )
            _band(ax, pts, key, line.get_color())
            extra = dashed[i] if dashed else None
            if extra:
                ax.plot(
                    [r["sigma"] for r in pts],
                    [r[extra] for r in pts],
                    "--",
                    color=line.get_color(),
                    lw=1,
                    label=f"empirical vs {'Gaussian' if 'dist' in extra else 'itself'}, N={n}",
                )
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("sigma")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
    return finish(fig, path, axes[0], legend_fontsize=6)


# One intra-op thread on the CPU: the digits UNets are small, and on a busy 2-core machine a
# training step took 0.17 s with one thread against 5-11 s with two (thread contention).
STUDY = base.Study(
    NAME,
    HiddenGaussianConfig,
    threads=1,
    presets=PRESETS,
    make=base.standard_make(_Study, default_hooks=lambda: study_hooks.default_hooks()),  # looked up at run time
)
run, run_preset = STUDY.run, STUDY.run_preset
