"""Mixtures of low-rank Gaussians: the phase transition in N/d (PAPERS.md section 4, issue 8).

For each intrinsic dimension d and each ratio N/d: draw N MoLRG samples (K classes, ambient n,
nested in N), train

(a) the subspace-parameterized denoiser (the MoLRG optimal-denoiser form with learnable bases,
    :class:`diffcore.models.vector.SubspaceDenoiser`; best of ``restarts`` by training loss) and
(b) an EDM-preconditioned MLP denoiser,

by denoising score matching with EDM's sigma sampling, and measure

- subspace recovery of (a): principal angles to the true bases after matching by permutation
  (``recovery_error`` = mean sin^2 of the angles, 0 = exact);
- for samples of each model (Heun, the same seeds): the relative distance to the true union of
  subspaces, the memorized fraction (|x - NN1| / |x - NN2| < 1/3) and the GL score against the
  training set (a fixed centered-cosine threshold, 0.99 by default, or calibrated on a fresh pool); ``generalized`` = fraction of samples
  that are both off the training set (not memorized) and on the union (relative distance < 0.1);
- the numerical rank of the Jacobian along the sampling trajectory
  (``diffcore.analysis.rank_along_trajectory``) for the true MoLRG denoiser, the learned subspace
  denoiser and the MLPs at the smallest and largest N, at the largest d.

Outputs: ``results.json``, ``runs.csv``, ``phase_transition.png``, ``rank.png``, ``timings.json``.
Every trained model (with its samples and metrics) is a resumable unit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffcore import analysis
from diffcore.experiments import _vector
from diffcore.experiments import base
from diffcore.models import vector
from diffcore.experiments.base import (Workspace, atomic_save_figure, atomic_write_csv, atomic_write_json,
                                       config_from_preset, json_dumps)

log = logging.getLogger(__name__)

NAME = "molrg"
ON_UNION_TOLERANCE = 0.1


@dataclass(frozen=True)
class MoLRGConfig:
    num_components: int = 2                       # K
    ambient_dim: int = 32                         # n
    latent_dims: tuple[int, ...] = (2, 4)         # d (one curve each)
    ratios: tuple[float, ...] = (0.5, 1, 2, 4, 8, 16)  # N / d
    data_seed: int = 0
    models: tuple[str, ...] = ("subspace", "mlp")
    # subspace denoiser
    subspace_steps: int = 600
    subspace_lr: float = 3e-2
    subspace_restarts: int = 5                    # best of 5 by training loss (local minima)
    # MLP denoiser
    mlp_width: int = 128
    mlp_depth: int = 3
    mlp_steps: int = 2500
    mlp_lr: float = 4e-3
    batch_size: int = 128
    P_mean: float = -0.5                          # ln sigma ~ N(P_mean, P_std^2) (EDM uses -1.2, 1.2)
    P_std: float = 1.0
    train_seed: int = 0
    # evaluation
    num_samples: int = 256
    sample_seed_start: int = 100000
    sampler_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    calibration_pool: int = 2048                  # fresh samples (for a calibrated GL threshold)
    threshold: float | None = 0.99                # centered cosine; None: calibrated on the fresh pool
    rank_samples: int = 8

    def sizes(self, d: int) -> list[int]:
        return sorted({max(2, int(round(r * d))) for r in self.ratios})

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of its range."""
        base.check_fields(self, FIELD_CHECKS)
        if max(self.latent_dims) > self.ambient_dim:
            raise base.ConfigError(f"latent_dims: expected values <= ambient_dim = {self.ambient_dim}, "
                                   f"got {self.latent_dims}")
        base.check_seed_range("data_seed", self.data_seed, max(self.latent_dims) + 1)
        base.check_seed_range("sample_seed_start", self.sample_seed_start,
                              max(self.num_samples, self.rank_samples, self.calibration_pool))
        base.check_sigmas(self.sigma_min, self.sigma_max)


_POSITIVE = base.integer(1)
_POSITIVE_REAL = base.number(0, lo_open=True)
FIELD_CHECKS: dict[str, base.Check] = {
    "num_components": _POSITIVE, "ambient_dim": _POSITIVE, "latent_dims": base.tuple_of(_POSITIVE),
    "ratios": base.tuple_of(_POSITIVE_REAL), "data_seed": base.seed,
    "models": base.tuple_of(base.one_of("subspace", "mlp")),
    "subspace_steps": _POSITIVE, "subspace_lr": _POSITIVE_REAL, "subspace_restarts": _POSITIVE,
    "mlp_width": _POSITIVE, "mlp_depth": _POSITIVE, "mlp_steps": _POSITIVE, "mlp_lr": _POSITIVE_REAL,
    "batch_size": _POSITIVE, "P_mean": base.log_sigma, "P_std": _POSITIVE_REAL, "train_seed": base.seed,
    "num_samples": _POSITIVE, "sample_seed_start": base.seed, "sampler_steps": _POSITIVE,
    "sigma_min": base.sigma, "sigma_max": base.sigma,
    "calibration_pool": base.integer(2),  # a calibrated threshold needs two images
    "threshold": base.optional(base.number(-1, 1)),  # a cosine
    "rank_samples": _POSITIVE,
}


def _quick() -> MoLRGConfig:
    """About 3-5 minutes on a 2-core CPU (see docs/studies.md for the measured time)."""
    return MoLRGConfig()


def _tiny() -> MoLRGConfig:
    """Seconds, for tests."""
    return MoLRGConfig(ambient_dim=16, latent_dims=(2,), ratios=(0.5, 8), subspace_steps=400,
                       subspace_restarts=3, mlp_width=32, mlp_depth=2, mlp_steps=150, num_samples=32,
                       sampler_steps=8, calibration_pool=256, rank_samples=2)


def _paper() -> MoLRGConfig:
    """Closer to the paper's setting: n = 48, K = 2, d = 2..8, a finer N/d grid, longer training."""
    return MoLRGConfig(ambient_dim=48, latent_dims=(2, 4, 6, 8), ratios=(0.5, 1, 1.5, 2, 3, 4, 6, 8, 16, 32),
                       subspace_steps=2000, subspace_restarts=8, mlp_width=256, mlp_depth=4, mlp_steps=10000,
                       num_samples=1024)


PRESETS: dict[str, Callable[[], MoLRGConfig]] = {"quick": _quick, "tiny": _tiny, "paper": _paper}
CONFIG_CLASS = MoLRGConfig


# ----------------------------------------------------------------------------- helpers

def _sample(denoiser, config: MoLRGConfig, num: int | None = None) -> torch.Tensor:
    """Heun samples [num, n] from the config's seeds (float32, CPU)."""
    from diffcore import sampler

    seeds = list(range(config.sample_seed_start, config.sample_seed_start + (num or config.num_samples)))
    sigmas = sampler.karras_sigmas(config.sampler_steps, config.sigma_min, config.sigma_max)
    x = sigmas[0].float() * sampler.noise_from_seeds(seeds, (config.ambient_dim,))
    with torch.no_grad():
        return sampler.sample_heun(denoiser, x, sigmas).float()


def sample_metrics(samples: torch.Tensor, train: torch.Tensor, bases: torch.Tensor, threshold: float) -> dict:
    """Distance to the union, memorization and GL of ``samples`` [B, n] against ``train`` [N, n]."""
    from diffcore import metrics
    from diffcore.experiments import _stack

    dist = analysis.distance_to_union(samples, bases)
    on_union = dist < ON_UNION_TOLERANCE
    out = {"union_distance_median": float(dist.median()), "union_distance_mean": float(dist.mean()),
           "on_union": float(on_union.double().mean())}
    if train.shape[0] >= 2:
        mem = metrics.memorization_ratio(samples, train, knn=_stack.knn)
        gl = metrics.gl_score(samples, train, metrics.get_similarity("cosine"), threshold, knn=_stack.knn)
        novel = mem.ratio >= mem.threshold
        out.update(memorized=mem.fraction, gl=gl.score,
                   generalized=float((novel & on_union.to(novel.device)).double().mean()))
    return out


# ----------------------------------------------------------------------------- study

class _Study:
    def __init__(self, config: MoLRGConfig, out, progress: bool):
        self.c = config
        self.ws = Workspace(out)
        self.progress = progress

    def data(self, d: int):
        from diffcore.data import molrg

        c = self.c
        sample = molrg(c.num_components, c.ambient_dim, d, max(c.sizes(d)) + c.calibration_pool,
                       seed=c.data_seed + d)
        return sample.data, sample.bases

    def threshold(self, pool: torch.Tensor) -> float:
        from diffcore import metrics
        from diffcore.experiments import _stack

        return metrics.calibrate_threshold(pool, metrics.get_similarity("cosine"), knn=_stack.knn)

    def model_unit(self, kind: str, d: int, n_train: int, train: torch.Tensor, bases, threshold):
        c = self.c
        spec = {"kind": kind, "K": c.num_components, "n": c.ambient_dim, "d": d, "N": n_train,
                "data_seed": c.data_seed, "train_seed": c.train_seed, "batch_size": c.batch_size,
                "P_mean": c.P_mean, "P_std": c.P_std, "num_samples": c.num_samples,
                "sample_seed_start": c.sample_seed_start, "sampler_steps": c.sampler_steps,
                "threshold": threshold}
        if kind == "subspace":
            spec.update(steps=c.subspace_steps, lr=c.subspace_lr, restarts=c.subspace_restarts)
        else:
            spec.update(steps=c.mlp_steps, lr=c.mlp_lr, width=c.mlp_width, depth=c.mlp_depth)

        def produce(tmp: Path, work: Path):
            model = self.train(kind, d, train)
            meta = dict(getattr(model, "_train_info", {}))
            torch.save(model.state_dict(), tmp / "model.pt")
            samples = _sample(model, c)
            torch.save(samples, tmp / "samples.pt")
            meta.update(sample_metrics(samples, train, bases, threshold))
            if kind == "subspace":
                rec = analysis.subspace_recovery(model.bases().detach(), bases)
                meta.update(recovery_error=rec.error, max_angle_deg=rec.max_angle_deg,
                            mean_angle_deg=rec.mean_angle_deg)
            return meta

        unit = self.ws.run_unit("model", f"{kind}-d{d}-N{n_train}", spec, produce)
        self.ws.record(unit)
        return unit

    def build(self, kind: str, d: int, train: torch.Tensor):
        c = self.c
        if kind == "subspace":
            return vector.SubspaceDenoiser(c.num_components, c.ambient_dim, d)
        return vector.MLPDenoiser(c.ambient_dim, c.mlp_width, c.mlp_depth, sigma_data=_vector.data_sigma(train))

    def train(self, kind: str, d: int, train: torch.Tensor):
        c = self.c
        common = dict(batch_size=c.batch_size, P_mean=c.P_mean, P_std=c.P_std,
                      sigma_data=_vector.data_sigma(train))
        if kind == "subspace":
            model, info = _vector.train_subspace_denoiser(train, c.num_components, d, restarts=c.subspace_restarts,
                                                          seed=c.train_seed, steps=c.subspace_steps,
                                                          lr=c.subspace_lr, **common)
        elif kind == "mlp":
            torch.manual_seed(c.train_seed)
            model = self.build(kind, d, train)
            tlog = _vector.train_denoiser(model, train, steps=c.mlp_steps, lr=c.mlp_lr, seed=c.train_seed, **common)
            info = {"final_loss": tlog.losses[-1]}
        else:
            raise ValueError(f"models: unknown model kind {kind!r} (subspace, mlp)")
        model._train_info = info
        return model

    def load(self, unit, kind: str, d: int, train: torch.Tensor):
        model = self.build(kind, d, train)
        model.load_state_dict(torch.load(unit.file("model.pt"), weights_only=True))
        return model.eval()

    def run(self) -> dict:
        from tqdm.auto import tqdm

        from diffcore import _env

        c = self.c
        self.ws.bind_config(c)
        total = sum(len(c.sizes(d)) for d in c.latent_dims) * len(c.models)
        bar = tqdm(total=total, desc=NAME, unit="model", disable=not _env.progress_enabled(self.progress))
        rows, rank_inputs = [], {}
        for d in c.latent_dims:
            pool, bases = self.data(d)
            fresh = pool[max(c.sizes(d)):]
            # The calibrated threshold (0.95 quantile of nearest-other similarity) is ~1 on a dense
            # pool of low-dimensional data, which would count every sample as novel: a fixed cosine
            # (0.99, about 8 degrees) is the default instead.
            threshold = self.threshold(fresh) if c.threshold is None else float(c.threshold)
            for n_train in c.sizes(d):
                train = pool[:n_train]
                for kind in c.models:
                    unit = self.model_unit(kind, d, n_train, train, bases, threshold)
                    rows.append({"model": kind, "d": d, "N": n_train, "ratio": n_train / d, **{
                        k: v for k, v in unit.meta.items() if not isinstance(v, (list, dict))}})
                    if d == max(c.latent_dims):
                        rank_inputs[(kind, n_train)] = (unit, train)
                    bar.update(1)
        bar.close()
        ranks = self.ranks(rank_inputs)
        results = json.loads(json_dumps({"experiment": NAME, "config": dataclasses.asdict(c), "runs": rows,
                                         "rank": ranks, "on_union_tolerance": ON_UNION_TOLERANCE}))
        self.write(results)
        return results

    def ranks(self, rank_inputs: dict) -> dict:
        """Jacobian numerical rank along an Euler trajectory on the Karras (EDM) sigma grid, at the largest d."""
        from diffcore import analysis, sampler
        from diffcore.data import molrg_bases
        from diffcore.denoisers import MoLRGDenoiser

        c = self.c
        d = max(c.latent_dims)
        sigmas = sampler.karras_sigmas(c.sampler_steps, c.sigma_min, c.sigma_max)
        seeds = list(range(c.sample_seed_start, c.sample_seed_start + c.rank_samples))
        x_t = float(sigmas[0]) * sampler.noise_from_seeds(seeds, (c.ambient_dim,))
        denoisers = {"true MoLRG": MoLRGDenoiser(molrg_bases(c.num_components, c.ambient_dim, d, c.data_seed + d))}
        for kind in c.models:
            sizes = sorted(n for (k, n) in rank_inputs if k == kind)
            for n_train in ([sizes[0], sizes[-1]] if len(sizes) > 1 else sizes):
                unit, train = rank_inputs[(kind, n_train)]
                denoisers[f"{kind} N={n_train}"] = self.load(unit, kind, d, train)
        out = {"d": d, "sigmas": sigmas[:-1].tolist(), "curves": {}}
        for label, den in denoisers.items():
            tr = analysis.rank_along_trajectory(den, x_t, sigmas, progress=False)
            out["curves"][label] = tr.ranks.double().mean(1).tolist()
        return out

    def write(self, results: dict) -> None:
        root = self.ws.root
        atomic_write_json(root / "results.json", results)
        atomic_write_csv(root / "runs.csv", results["runs"])
        plot_phase_transition(results, root / "phase_transition.png")
        plot_rank(results["rank"], root / "rank.png")


# ----------------------------------------------------------------------------- figures

def plot_phase_transition(results: dict, path) -> Path:
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    runs = results["runs"]
    dims = sorted({r["d"] for r in runs})
    panels = [("subspace", "recovery_error", "subspace model: recovery error\n(mean sin$^2$ principal angle)"),
              ("subspace", "union_distance_median", "subspace model: samples'\nrel. distance to union"),
              ("mlp", "union_distance_median", "MLP: samples' rel. distance\nto union (median)"),
              ("mlp", "memorized", "MLP: memorized fraction\n(|x-NN1|/|x-NN2| < 1/3)"),
              ("mlp", "generalized", "MLP: generalized fraction\n(novel and on the union)")]
    panels = [p for p in panels if any(r["model"] == p[0] and p[1] in r for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (kind, key, title) in zip(axes[0], panels):
        for d in dims:
            pts = sorted((r["ratio"], r[key]) for r in runs if r["model"] == kind and r["d"] == d and key in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"d={d}")
        ax.axvline(results["config"]["num_components"], color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N / d")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MoLRG phase transition (K={results['config']['num_components']}, "
                 f"n={results['config']['ambient_dim']}; dotted: N/d = K)", fontsize=9)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_rank(rank: dict, path) -> Path:
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, values in rank["curves"].items():
        ax.plot(rank["sigmas"], values, "o-", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("sigma")
    ax.set_ylabel("numerical rank of dD/dx (mean)")
    ax.set_title(f"Jacobian rank along the sampling trajectory (d={rank['d']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def run(config: MoLRGConfig, out, *, hooks=None, device: str = "auto", progress: bool = True) -> dict:
    """Run (or resume) the study into ``out`` (CPU only: the models are tiny); returns results.json's content."""
    return base.run_study(STUDY, config, out, lambda given, resolved, part: _Study(config, out, progress),
                          hooks=hooks, device=device)


STUDY = base.Study(NAME, MoLRGConfig, cpu_only=True, threads=1, takes_hooks=False)


def run_preset(preset: str, out, overrides=(), **kwargs) -> dict:
    return run(config_from_preset(PRESETS, preset, overrides), out, **kwargs)
