"""Mixtures of low-rank Gaussians: the phase transition in N/d (docs/papers.md section 4).

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
  training set (a fixed centered-cosine threshold, 0.99 by default, or calibrated on a fresh
  pool); ``generalized`` = fraction of samples
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
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcore import analysis
from diffcore.experiments import _vector, base
from diffcore.metrics import intervals
from diffcore.models import vector

log = logging.getLogger(__name__)

NAME = "molrg"
ON_UNION_TOLERANCE = 0.1


@dataclass(frozen=True)
class MoLRGConfig:
    num_components: int = 2  # K
    ambient_dim: int = 32  # n
    latent_dims: tuple[int, ...] = (2, 4)  # d (one curve each)
    ratios: tuple[float, ...] = (0.5, 1, 2, 4, 8, 16)  # N / d
    data_seed: int = 0
    data_seeds: tuple[int, ...] = ()  # data draws per grid point (intervals across them); (): (data_seed,)
    mlp_draws: int = 0  # the MLP on the first this many draws (0: all)
    models: tuple[str, ...] = ("subspace", "mlp")
    # subspace denoiser
    subspace_steps: int = 600
    subspace_lr: float = 3e-2
    subspace_restarts: int = 5  # best of 5 by training loss (local minima)
    # MLP denoiser
    mlp_width: int = 128
    mlp_depth: int = 3
    mlp_steps: int = 2500
    mlp_lr: float = 4e-3
    batch_size: int = 128
    P_mean: float = -0.5  # ln sigma ~ N(P_mean, P_std^2) (EDM uses -1.2, 1.2)
    P_std: float = 1.0
    sigma_log_uniform: float = 0.0  # share of training noise levels log-uniform over [sigma_min, sigma_max]
    train_seed: int = 0
    recovery_threshold: float = 0.5  # N*: the per-class count where recovery_error falls below this
    # evaluation
    num_samples: int = 256
    sample_seed_start: int = 100000
    sampler_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    calibration_pool: int = 2048  # fresh samples (for a calibrated GL threshold)
    threshold: float | None = 0.99  # centered cosine; None: calibrated on the fresh pool
    rank_samples: int = 8

    def seeds(self) -> tuple[int, ...]:
        return tuple(self.data_seeds) or (self.data_seed,)

    def sizes(self, d: int) -> list[int]:
        return sorted({max(2, int(round(r * d))) for r in self.ratios})

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of its range."""
        base.check_fields(self, FIELD_CHECKS)
        if max(self.latent_dims) > self.ambient_dim:
            raise base.ConfigError(
                f"latent_dims: expected values <= ambient_dim = {self.ambient_dim}, got {self.latent_dims}"
            )
        for seed in self.seeds():
            base.check_seed_range("data_seeds", _data_seed(seed, 0), max(self.latent_dims) + 1)
        base.check_seed_range(
            "sample_seed_start", self.sample_seed_start, max(self.num_samples, self.rank_samples, self.calibration_pool)
        )
        base.check_sigmas(self.sigma_min, self.sigma_max)


FIELD_CHECKS: dict[str, base.Check] = {
    "latent_dims": base.tuple_of(base.positive),
    "ratios": base.tuple_of(base.positive_number),
    "data_seed": base.seed,
    "models": base.tuple_of(base.one_of("subspace", "mlp")),
    "subspace_steps": base.positive,
    "subspace_lr": base.positive_number,
    "subspace_restarts": base.positive,
    "mlp_steps": base.positive,
    "mlp_lr": base.positive_number,
    "calibration_pool": base.integer(2),  # a calibrated threshold needs two images
    "rank_samples": base.positive,
    "data_seeds": base.tuple_of(base.seed, min_len=0),
    "mlp_draws": base.integer(0),
    "recovery_threshold": base.number(0, 1, lo_open=True),
}


def _data_seed(seed: int, d: int) -> int:
    """The generator seed of the data of draw ``seed`` at latent dimension d (seed 0: d, as before)."""
    return seed * 1009 + d


def _quick() -> MoLRGConfig:
    """Minutes on a 2-core CPU (docs/studies.md has the measured CPU time): d = 2, 4, 8, N/d from 0.5
    to 8, three data draws per grid point (intervals across them) for the subspace model (best of 3
    restarts), the MLP on the first draw (Wilson intervals over its samples); training noise levels
    half EDM-style lognormal, half log-uniform over the sampled [0.002, 80] (fixed before looking at
    the outcome). The grid,
    restarts and MLP draws were cut from 6 ratios, 5 restarts and 3 draws by the measured CPU cost
    (about 410 CPU-seconds, past the 5-minute budget), before any outcome was looked at."""
    return MoLRGConfig(
        latent_dims=(2, 4, 8),
        ratios=(0.5, 1, 2, 4, 8),
        data_seeds=(0, 1, 2),
        mlp_draws=1,
        subspace_restarts=3,
        sigma_log_uniform=0.5,
    )


def _tiny() -> MoLRGConfig:
    """Seconds, for tests."""
    return MoLRGConfig(
        ambient_dim=16,
        latent_dims=(2,),
        ratios=(0.5, 8),
        subspace_steps=400,
        subspace_restarts=3,
        mlp_width=32,
        mlp_depth=2,
        mlp_steps=150,
        num_samples=32,
        sampler_steps=8,
        calibration_pool=256,
        rank_samples=2,
    )


def _paper() -> MoLRGConfig:
    """Closer to the paper's setting: n = 48, K = 2, d = 2..8, a finer N/d grid, longer training."""
    return MoLRGConfig(
        ambient_dim=48,
        latent_dims=(2, 4, 6, 8),
        ratios=(0.5, 1, 1.5, 2, 3, 4, 6, 8, 16, 32),
        subspace_steps=2000,
        subspace_restarts=8,
        mlp_width=256,
        mlp_depth=4,
        mlp_steps=10000,
        num_samples=1024,
    )


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
    num = samples.shape[0]
    median = intervals.bootstrap_interval(dist.double().cpu().numpy(), lambda a: float(np.median(a)), resamples=500)
    out = {
        **intervals.flat("union_distance_median", median),
        "union_distance_mean": float(dist.mean()),
        **_wilson("on_union", int(on_union.sum()), num),
    }
    if train.shape[0] >= 2:
        mem = metrics.memorization_ratio(samples, train, knn=_stack.knn)
        gl = metrics.gl_score(samples, train, metrics.get_similarity("cosine"), threshold, knn=_stack.knn)
        novel = mem.ratio >= mem.threshold
        out.update(
            **_wilson("memorized", int(round(mem.fraction * num)), num),
            **_wilson("gl", int(round(gl.score * num)), num),
            **_wilson("generalized", int((novel & on_union.to(novel.device)).sum()), num),
        )
    return out


def _wilson(name: str, successes: int, num: int) -> dict:
    return intervals.flat(name, intervals.wilson_interval(successes, num))


# ----------------------------------------------------------------------------- study


class _Study:
    def __init__(self, config: MoLRGConfig, out, progress: bool):
        self.c = config
        self.ws = base.Workspace(out)
        self.progress = progress

    def data(self, d: int, seed: int):
        """``(data [P, n], labels [P], bases [K, n, d])`` of draw ``seed`` at latent dimension d."""
        from diffcore.data import molrg

        c = self.c
        sample = molrg(
            c.num_components, c.ambient_dim, d, max(c.sizes(d)) + c.calibration_pool, seed=_data_seed(seed, d)
        )
        return sample.data, sample.labels, sample.bases

    def threshold(self, pool: torch.Tensor) -> float:
        from diffcore import metrics
        from diffcore.experiments import _stack

        return metrics.calibrate_threshold(pool, metrics.get_similarity("cosine"), knn=_stack.knn)

    def model_unit(self, kind: str, d: int, n_train: int, seed: int, train: torch.Tensor, bases, threshold):
        c = self.c
        spec = {
            "kind": kind,
            "K": c.num_components,
            "n": c.ambient_dim,
            "d": d,
            "N": n_train,
            "data_seed": seed,
            "train_seed": c.train_seed,
            **_vector.training_and_sampling_spec(c),
            "threshold": threshold,
            "intervals": "wilson; bootstrap median",
        }
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
                meta.update(
                    recovery_error=rec.error, max_angle_deg=rec.max_angle_deg, mean_angle_deg=rec.mean_angle_deg
                )
            return meta

        unit = self.ws.run_unit("model", f"{kind}-d{d}-N{n_train}" + (f"-data{seed}" if seed else ""), spec, produce)
        self.ws.record(unit)
        return unit

    def build(self, kind: str, d: int, train: torch.Tensor):
        c = self.c
        if kind == "subspace":
            return vector.SubspaceDenoiser(c.num_components, c.ambient_dim, d)
        return vector.MLPDenoiser(c.ambient_dim, c.mlp_width, c.mlp_depth, sigma_data=_vector.data_sigma(train))

    def train(self, kind: str, d: int, train: torch.Tensor):
        c = self.c
        common = dict(
            batch_size=c.batch_size,
            P_mean=c.P_mean,
            P_std=c.P_std,
            sigma_data=_vector.data_sigma(train),
            log_uniform_fraction=c.sigma_log_uniform,
            log_uniform_range=(c.sigma_min, c.sigma_max),
        )
        if kind == "subspace":
            model, info = _vector.train_subspace_denoiser(
                train,
                c.num_components,
                d,
                restarts=c.subspace_restarts,
                seed=c.train_seed,
                steps=c.subspace_steps,
                lr=c.subspace_lr,
                **common,
            )
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
        draws = {
            kind: len(c.seeds()) if kind != "mlp" or not c.mlp_draws else min(c.mlp_draws, len(c.seeds()))
            for kind in c.models
        }
        total = sum(len(c.sizes(d)) for d in c.latent_dims) * sum(draws.values())
        bar = tqdm(total=total, desc=NAME, unit="model", disable=not _env.progress_enabled(self.progress))
        rows, rank_inputs = [], {}
        for d in c.latent_dims:
            for seed in c.seeds():
                pool, labels, bases = self.data(d, seed)
                fresh = pool[max(c.sizes(d)) :]
                # The calibrated threshold (0.95 quantile of nearest-other similarity) is ~1 on a dense
                # pool of low-dimensional data, which would count every sample as novel: a fixed cosine
                # (0.99, about 8 degrees) is the default instead.
                threshold = self.threshold(fresh) if c.threshold is None else float(c.threshold)
                for n_train in c.sizes(d):
                    train = pool[:n_train]
                    per_class = torch.bincount(labels[:n_train], minlength=c.num_components)
                    for kind in c.models:
                        if kind == "mlp" and c.mlp_draws and seed not in c.seeds()[: c.mlp_draws]:
                            continue
                        unit = self.model_unit(kind, d, n_train, seed, train, bases, threshold)
                        rows.append(
                            {
                                "model": kind,
                                "d": d,
                                "N": n_train,
                                "data_seed": seed,
                                "ratio": n_train / d,
                                "per_class_min": int(per_class.min()),
                                "per_class_max": int(per_class.max()),
                                **{k: v for k, v in unit.meta.items() if not isinstance(v, (list, dict))},
                            }
                        )
                        if d == max(c.latent_dims) and seed == c.seeds()[0]:
                            rank_inputs[(kind, n_train)] = (unit, train)
                        bar.update(1)
        bar.close()
        summary = summarize(rows)
        ranks = self.ranks(rank_inputs)
        results = {
            "experiment": NAME,
            "config": dataclasses.asdict(c),
            "runs": rows,
            "summary": summary,
            "transition": transition(rows, c.recovery_threshold),
            "rank": ranks,
            "on_union_tolerance": ON_UNION_TOLERANCE,
        }
        results["effect_properties"] = effect_properties(results)
        results = json.loads(base.json_dumps(results))
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
        denoisers = {
            "true MoLRG": MoLRGDenoiser(molrg_bases(c.num_components, c.ambient_dim, d, _data_seed(c.seeds()[0], d)))
        }
        for kind in c.models:
            sizes = sorted(n for (k, n) in rank_inputs if k == kind)
            for n_train in [sizes[0], sizes[-1]] if len(sizes) > 1 else sizes:
                unit, train = rank_inputs[(kind, n_train)]
                denoisers[f"{kind} N={n_train}"] = self.load(unit, kind, d, train)
        out = {"d": d, "sigmas": sigmas[:-1].tolist(), "curves": {}}
        for label, den in denoisers.items():
            tr = analysis.rank_along_trajectory(den, x_t, sigmas, progress=False)
            out["curves"][label] = tr.ranks.double().mean(1).tolist()
        return out

    def write(self, results: dict) -> None:
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(root / "runs.csv", results["runs"])
        plot_phase_transition(results, root / "phase_transition.png")
        plot_rank(results["rank"], root / "rank.png")


# ----------------------------------------------------------------------------- analysis

SUMMARY_KEYS = ("recovery_error", "union_distance_median", "on_union", "memorized", "generalized", "gl")


def _over_draws(rows: list[dict], key: str) -> intervals.Interval:
    """A grid point's interval of ``key``: seeds-t across 3+ data draws, else the one run's own
    interval (Wilson / bootstrap as recorded; for two draws the mean of their ends)."""
    values = [r[key] for r in rows]
    if len(values) >= 3:
        return intervals.seed_interval(values)
    mean = sum(values) / len(values)
    if f"{key}_low" not in rows[0]:
        return intervals.Interval(mean, mean, mean, method="exact (one draw, no interval)", n=len(values))
    low = min(mean, sum(r[f"{key}_low"] for r in rows) / len(rows))
    high = max(mean, sum(r[f"{key}_high"] for r in rows) / len(rows))
    return intervals.Interval(mean, low, high, method="per-run", n=len(values))


def summarize(rows: list[dict]) -> list[dict]:
    """Per model, d and N: the mean per-class count (smallest class) and each measure of
    :data:`SUMMARY_KEYS` with its 95% interval across the data draws (``key``, ``key_low``, ``key_high``)."""
    out = []
    for kind, d, n in sorted({(r["model"], r["d"], r["N"]) for r in rows}):
        at = [r for r in rows if (r["model"], r["d"], r["N"]) == (kind, d, n)]
        entry = {
            "model": kind,
            "d": d,
            "N": n,
            "ratio": n / d,
            "draws": len(at),
            "per_class_min": sum(r["per_class_min"] for r in at) / len(at),
        }
        for key in SUMMARY_KEYS:
            if key in at[0]:
                interval = _over_draws(at, key)
                entry.update(intervals.flat(key, interval))
                entry[f"{key}_method"] = interval.method
        out.append(entry)
    return out


def _crossing_below(x: list[float], y: list[float], level: float) -> float | None:
    """The first x where y falls below ``level``, interpolated linearly in log x (None if never;
    ``x[0]`` if y starts below)."""
    for i, value in enumerate(y):
        if value < level:
            if i == 0:
                return x[0]
            t = (y[i - 1] - level) / (y[i - 1] - value)
            if x[i - 1] <= 0:  # an empty class before the crossing: interpolate linearly
                return x[i - 1] + t * (x[i] - x[i - 1])
            a, b = math.log(x[i - 1]), math.log(x[i])
            return math.exp(a + t * (b - a))
    return None


def transition(rows: list[dict], level: float) -> dict:
    """The subspace model's transition per data draw: N* (in samples of the smallest class) where
    its recovery error falls below ``level``, at each d; and per draw the exponent of N* against
    d (least-squares slope of ln N* on ln d; the paper: linear in d, slope 1)."""
    subspace = [r for r in rows if r["model"] == "subspace"]
    dims = sorted({r["d"] for r in subspace})
    per_draw = []
    for seed in sorted({r["data_seed"] for r in subspace}):
        n_star = {}
        for d in dims:
            at = sorted((r for r in subspace if r["d"] == d and r["data_seed"] == seed), key=lambda r: r["N"])
            n_star[d] = _crossing_below([r["per_class_min"] for r in at], [r["recovery_error"] for r in at], level)
        entry: dict = {"data_seed": seed, "n_star": {str(d): v for d, v in n_star.items()}}
        found = [(d, v) for d, v in n_star.items() if v is not None and v > 0]
        if len(found) >= 2:
            log_d = np.log([d for d, _ in found])
            log_n = np.log([v for _, v in found])
            entry["exponent"] = float(np.polyfit(log_d, log_n, 1)[0])
        per_draw.append(entry)
    return {"level": level, "dims": dims, "per_draw": per_draw}


def effect_properties(results: dict) -> dict[str, dict]:
    """The MoLRG paper's claims on this run, decided on 95% intervals (``intervals.claim``):

    - ``subspace_recovers_at_largest_ratio``: at every d the subspace model's recovery error at the
      largest N/d has its upper end below ``recovery_threshold`` (and above it at the smallest N/d:
      ``subspace_fails_at_smallest_ratio``);
    - ``n_star_grows_with_d``: the exponent of N* against d (seeds-t across 3+ draws) lies above 0;
      ``n_star_linear_in_d``: its interval contains 1 (recorded with the interval's width: a wide
      interval decides little);
    - ``mlp_generalizes_at_largest_ratio``: at every d the MLP's generalized fraction (novel and on
      the union) at the largest N/d lies above 0.5.
    """
    level = results["config"]["recovery_threshold"]
    summary = results["summary"]
    out = {}

    def as_iv(e, key):
        return intervals.Interval(
            e[key],
            e[f"{key}_low"],
            e[f"{key}_high"],
            method=e[f"{key}_method"],
            n=e["draws"],
        )

    for model, key, name, ok in (
        ("subspace", "recovery_error", "subspace_recovers_at_largest_ratio", lambda iv: iv.high < level),
        ("subspace", "recovery_error", "subspace_fails_at_smallest_ratio", lambda iv: iv.low > level),
        ("mlp", "generalized", "mlp_generalizes_at_largest_ratio", lambda iv: iv.low > 0.5),
    ):
        rows = [e for e in summary if e["model"] == model and key in e]
        if not rows:
            continue
        at = {}
        for d in sorted({e["d"] for e in rows}):
            by_d = sorted((e for e in rows if e["d"] == d), key=lambda e: e["ratio"])
            at[d] = as_iv(by_d[0] if "smallest" in name else by_d[-1], key)
        out[name] = intervals.claim(
            all(ok(iv) for iv in at.values()),
            **{f"d{d}": iv for d, iv in at.items()},
            **({"level": level} if model == "subspace" else {"bound": 0.5}),
        )
    exponents = [p["exponent"] for p in results["transition"]["per_draw"] if "exponent" in p]
    if len(exponents) >= 3 and len(exponents) == len(results["transition"]["per_draw"]):
        slope = intervals.seed_interval(exponents)
        out["n_star_grows_with_d"] = intervals.claim(slope.low > 0, exponent=slope)
        out["n_star_linear_in_d"] = intervals.claim(
            slope.contains(1.0) and slope.low > 0, exponent=slope, interval_width=slope.high - slope.low
        )
    else:
        reason = "needs 3+ data draws, each with a crossing at 2+ latent dimensions"
        out["n_star_grows_with_d"] = intervals.claim(False, reason=reason, draws_with_exponent=len(exponents))
        out["n_star_linear_in_d"] = intervals.claim(False, reason=reason, draws_with_exponent=len(exponents))
    return out


# ----------------------------------------------------------------------------- figures


def plot_phase_transition(results: dict, path) -> Path:
    """Each measure against the smallest class's sample count over d (the theory's per-class
    condition), one curve per d, bars the 95% intervals across data draws."""
    from diffcore.experiments.plotting import finish, plt  # the Agg backend, set in one place

    summary = results["summary"]
    dims = sorted({e["d"] for e in summary})
    panels = [
        ("subspace", "recovery_error", "subspace model: recovery error\n(mean sin$^2$ principal angle)"),
        ("subspace", "union_distance_median", "subspace model: samples'\nrel. distance to union (median)"),
        ("mlp", "union_distance_median", "MLP: samples' rel. distance\nto union (median)"),
        ("mlp", "memorized", "MLP: memorized fraction\n(|x-NN1|/|x-NN2| < 1/3)"),
        ("mlp", "generalized", "MLP: generalized fraction\n(novel and on the union)"),
    ]
    panels = [p for p in panels if any(e["model"] == p[0] and p[1] in e for e in summary)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.1), squeeze=False)
    for ax, (kind, key, title) in zip(axes[0], panels):
        for d in dims:
            pts = sorted((e for e in summary if e["model"] == kind and e["d"] == d and key in e), key=lambda e: e["N"])
            if pts:
                x = [max(e["per_class_min"], 0.25) / d for e in pts]
                y = [e[key] for e in pts]
                ax.errorbar(
                    x,
                    y,
                    yerr=[
                        [v - e[f"{key}_low"] for v, e in zip(y, pts)],
                        [e[f"{key}_high"] - v for v, e in zip(y, pts)],
                    ],
                    fmt="o-",
                    ms=3,
                    capsize=2,
                    label=f"d={d}",
                )
        if key == "recovery_error":
            ax.axhline(results["config"]["recovery_threshold"], color="gray", ls="--", lw=1)
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("smallest class's count / d")
        ax.set_title(title, fontsize=8)
    draws = max(e["draws"] for e in summary)
    return finish(
        fig,
        path,
        axes[0],
        suptitle=f"MoLRG (K={results['config']['num_components']}, n={results['config']['ambient_dim']}); "
        f"bars: 95% intervals across {draws} data draw(s); dotted: count = d",
    )


def plot_rank(rank: dict, path) -> Path:
    from diffcore.experiments.plotting import finish, plt  # the Agg backend, set in one place

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, values in rank["curves"].items():
        ax.plot(rank["sigmas"], values, "o-", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("sigma")
    ax.set_ylabel("numerical rank of dD/dx (mean)")
    ax.set_title(f"Jacobian rank along the sampling trajectory (d={rank['d']})", fontsize=9)
    return finish(fig, path, [ax])


# CPU only: the models are tiny.
STUDY = base.Study(
    NAME,
    MoLRGConfig,
    cpu_only=True,
    threads=1,
    takes_hooks=False,
    presets=PRESETS,
    make=lambda r: _Study(r.config, r.out, r.progress),
)
run, run_preset = STUDY.run, STUDY.run_preset
