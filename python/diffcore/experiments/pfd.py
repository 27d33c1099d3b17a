"""Probability flow distance: teacher-student generalization and memorization (docs/papers.md section 2).

A closed-form teacher (a mixture of low-rank Gaussians, ``diffcore.denoisers.MoLRGDenoiser``, or a
low-rank Gaussian, ``diffcore.denoisers.GaussianDenoiser``) generates N training vectors (nested in
N); an EDM-preconditioned MLP student is trained on them by denoising score matching. With the
PF-ODE maps Phi of each denoiser evaluated on the same per-seed noise (``diffcore.metrics``):

    E_gen(N) = PFD(student, teacher)          E_mem(N) = PFD(student, empirical denoiser of the N vectors)

against N, and against training time (weight snapshots) for one N, where early learning shows: the
student first approaches the teacher and only later (at small N) the empirical denoiser. The PFD of
the teacher to the empirical denoiser is reported as the memorizer's E_gen. All flows use the same
solver and grid (Heun); ``teacher_flow="exact"`` takes the Gaussian teacher's closed-form PF-ODE
map instead (``GaussianDenoiser.sample``).

The empirical denoiser is ``diffcore.denoisers.EmpiricalDenoiser`` (the ``empirical_denoise`` op);
tests inject a reference one through ``hooks``.

Outputs: ``results.json``, ``pfd.csv``, ``curve.csv``, ``pfd_vs_n.png``, ``pfd_vs_time.png``,
``timings.json``. Each trained student (with its PFDs) is a resumable unit.
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

from diffcore.experiments import _vector, base
from diffcore.metrics import intervals
from diffcore.models import vector

log = logging.getLogger(__name__)

NAME = "pfd"


@dataclass(frozen=True)
class PFDConfig:
    teacher: str = "molrg"  # molrg | gaussian
    teacher_flow: str = "sampler"  # sampler | exact (gaussian teacher only)
    num_components: int = 2  # MoLRG: K
    ambient_dim: int = 16  # n
    latent_dim: int = 8  # MoLRG: d; Gaussian: rank (eigenvalues 1/k)
    teacher_seed: int = 0
    sizes: tuple[int, ...] = (4, 16, 64, 256, 1024)
    train_seeds: tuple[int, ...] = (0,)
    mlp_width: int = 128  # the student of the training-time curve
    mlp_depth: int = 3
    widths: tuple[int, ...] = ()  # student widths of the size sweep (): (mlp_width,)
    train_steps: int = 2000
    learning_rate: float = 2e-3
    batch_size: int = 128
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_log_uniform: float = 0.0  # share of training noise levels log-uniform over [sigma_min, sigma_max]
    curve_size: int = 256  # N of the E vs training-time curve
    curve_points: int = 10  # snapshots, log-spaced over training
    num_samples: int = 256
    sample_seed_start: int = 100000
    sampler_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    normalize: str = "per_dim"  # none | per_dim (RMS per coordinate)

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of its range."""
        base.check_fields(self, FIELD_CHECKS)
        if self.teacher_flow == "exact" and self.teacher != "gaussian":
            raise base.ConfigError("teacher_flow: 'exact' needs teacher=gaussian (the MoLRG flow has no closed form)")
        if self.latent_dim > self.ambient_dim:
            raise base.ConfigError(f"latent_dim: expected <= ambient_dim = {self.ambient_dim}, got {self.latent_dim}")
        if self.widths and self.mlp_width not in self.widths:
            raise base.ConfigError(
                f"mlp_width: the training-time curve's student ({self.mlp_width}) must be one of widths {self.widths}"
            )
        if self.curve_size and self.curve_size not in self.sizes:
            raise base.ConfigError(f"curve_size: {self.curve_size} must be one of sizes {self.sizes} (or 0 for none)")
        base.check_seed_range("teacher_seed", self.teacher_seed, 2)
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        base.check_sigmas(self.sigma_min, self.sigma_max)

    def student_widths(self) -> tuple[int, ...]:
        return tuple(self.widths) or (self.mlp_width,)

    def snapshot_steps(self) -> list[int]:
        if not self.curve_size:
            return []
        grid = torch.logspace(
            math.log10(max(1, self.train_steps // 200)), math.log10(self.train_steps), self.curve_points
        )
        return sorted({0, *(int(round(float(s))) for s in grid)})


def _quick() -> PFDConfig:
    """Minutes on a 2-core CPU (measured in docs/studies.md): a MoLRG teacher (K = 2, n = 16, d = 8),
    students of four widths (32 .. 256, depth 3) on N = 4 .. 1024 with three training seeds each
    (intervals across seeds, the bias-variance split), the width-128 student's E against training
    time at N = 256 on 24 log-spaced checkpoints; training noise levels half EDM's lognormal, half
    log-uniform over the sampled [0.002, 80] (fixed before looking at the outcome)."""
    return PFDConfig(widths=(32, 64, 128, 256), train_seeds=(0, 1, 2), sigma_log_uniform=0.5, curve_points=24)


def _tiny() -> PFDConfig:
    """Seconds, for tests."""
    return PFDConfig(
        ambient_dim=8,
        latent_dim=2,
        sizes=(2, 256),
        mlp_width=64,
        mlp_depth=2,
        train_steps=400,
        learning_rate=3e-3,
        curve_size=2,
        curve_points=4,
        num_samples=64,
        sampler_steps=10,
    )


def _seeds() -> PFDConfig:
    """For tests of the sweeps (seconds): two widths, three sizes, three seeds."""
    return dataclasses.replace(
        _tiny(),
        widths=(16, 64),
        mlp_width=64,
        sizes=(2, 16, 256),
        train_seeds=(0, 1, 2),
        train_steps=300,
        sigma_log_uniform=0.5,
        num_samples=48,
        curve_points=6,
    )


def _paper() -> PFDConfig:
    """A wider N grid, 3 training seeds, longer training (hours on a CPU; minutes on a GPU-less box
    per model)."""
    return PFDConfig(
        ambient_dim=32,
        latent_dim=4,
        sizes=tuple(2**k for k in range(1, 14)),
        train_seeds=(0, 1, 2),
        mlp_width=256,
        mlp_depth=4,
        train_steps=20000,
        curve_size=64,
        curve_points=20,
        num_samples=2048,
    )


FIELD_CHECKS: dict[str, base.Check] = {
    "teacher": base.one_of("molrg", "gaussian"),
    "teacher_flow": base.one_of("sampler", "exact"),
    "teacher_seed": base.seed,
    "widths": base.tuple_of(base.positive, min_len=0),  # (): the one student width mlp_width
    "curve_size": base.integer(0),
    "curve_points": base.positive,
    "normalize": base.one_of("none", "per_dim"),
}

PRESETS: dict[str, Callable[[], PFDConfig]] = {"quick": _quick, "tiny": _tiny, "tiny-sweep": _seeds, "paper": _paper}
CONFIG_CLASS = PFDConfig


@dataclass
class PFDHooks:
    """``empirical_denoiser(train [N, n]) -> D(x, sigma)``: default ``diffcore.denoisers.EmpiricalDenoiser``."""

    empirical_denoiser: Callable


def default_hooks() -> PFDHooks:
    from diffcore.denoisers import EmpiricalDenoiser

    return PFDHooks(empirical_denoiser=EmpiricalDenoiser)


def make_teacher(config: PFDConfig):
    """The closed-form teacher: ``MoLRGDenoiser.random`` or a Gaussian with random orthonormal
    eigenvectors and eigenvalues ``1/k`` (k = 1 .. latent_dim)."""
    from diffcore.denoisers import GaussianDenoiser, MoLRGDenoiser

    c = config
    if c.teacher == "molrg":
        return MoLRGDenoiser.random(c.num_components, c.ambient_dim, c.latent_dim, seed=c.teacher_seed)
    g = torch.Generator().manual_seed(c.teacher_seed)
    q, r = torch.linalg.qr(torch.randn(c.ambient_dim, c.latent_dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    lam = 1.0 / torch.arange(1, c.latent_dim + 1, dtype=torch.float64)
    return GaussianDenoiser(torch.zeros(c.ambient_dim, dtype=torch.float64), q, lam)


def teacher_data(teacher, num: int, seed: int) -> torch.Tensor:
    """``num`` teacher samples [num, n] (float32); nested in num for a fixed seed."""
    from diffcore.denoisers import GaussianDenoiser

    if isinstance(teacher, GaussianDenoiser):
        z = torch.randn(
            num, teacher.eigvals.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        return (teacher.mean + (z * teacher.eigvals.sqrt()) @ teacher.eigvecs.T).float()
    return teacher.sample(num, seed=seed)


class _Study:
    def __init__(self, config: PFDConfig, out, hooks: PFDHooks, progress: bool):
        config.validate()
        self.c = config
        self.ws = base.Workspace(out)
        self.hooks = hooks
        self.progress = progress
        from diffcore import sampler

        self.sigmas = sampler.karras_sigmas(config.sampler_steps, config.sigma_min, config.sigma_max)
        seeds = list(range(config.sample_seed_start, config.sample_seed_start + config.num_samples))
        self.noise = sampler.noise_from_seeds(seeds, (config.ambient_dim,))  # [B, n] float32
        self.teacher = make_teacher(config)

    def flow(self, denoiser) -> torch.Tensor:
        """Phi(z) of ``denoiser`` for the study's noises [B, n] (Heun on the Karras grid)."""
        from diffcore import sampler

        with torch.no_grad():
            return sampler.sample_heun(denoiser, self.sigmas[0].float() * self.noise, self.sigmas).float()

    def teacher_flow(self) -> torch.Tensor:
        if self.c.teacher_flow == "exact":
            return self.teacher.sample(self.noise.double(), self.c.sigma_max).float()
        return self.flow(self.teacher)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        from diffcore import metrics

        return metrics.pfd_from_samples(a, b, self.c.normalize).value

    def per_seed_errors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[B]`` squared distances between two flows, per noise (per coordinate for ``per_dim``):
        PFD = sqrt(mean of these)."""
        sq = (a.double() - b.double()).square().sum(1)
        return sq / a.shape[1] if self.c.normalize == "per_dim" else sq

    def student_unit(self, width: int, n_train: int, seed: int, train: torch.Tensor, phi_teacher: torch.Tensor):
        c = self.c
        with_curve = n_train == c.curve_size and seed == c.train_seeds[0] and width == c.mlp_width
        spec = {
            "teacher": c.teacher,
            "teacher_flow": c.teacher_flow,
            "K": c.num_components,
            "n": c.ambient_dim,
            "d": c.latent_dim,
            "teacher_seed": c.teacher_seed,
            "N": n_train,
            "seed": seed,
            "width": width,
            "depth": c.mlp_depth,
            "steps": c.train_steps,
            "lr": c.learning_rate,
            **_vector.training_and_sampling_spec(c),
            "normalize": c.normalize,
            "snapshots": c.snapshot_steps() if with_curve else [],
            "curve_intervals": "bootstrap over noises",
        }

        def produce(tmp: Path, work: Path):
            torch.manual_seed(seed)
            model = vector.MLPDenoiser(c.ambient_dim, width, c.mlp_depth, sigma_data=_vector.data_sigma(train))
            tlog = _vector.train_denoiser(
                model,
                train,
                steps=c.train_steps,
                batch_size=c.batch_size,
                lr=c.learning_rate,
                seed=seed,
                P_mean=c.P_mean,
                P_std=c.P_std,
                sigma_data=_vector.data_sigma(train),
                snapshot_steps=spec["snapshots"],
                log_uniform_fraction=c.sigma_log_uniform,
                log_uniform_range=(c.sigma_min, c.sigma_max),
            )
            torch.save(model.state_dict(), tmp / "model.pt")
            phi_emp = self.flow(self.hooks.empirical_denoiser(train))
            phi_student = self.flow(model)
            torch.save({"student": phi_student, "empirical": phi_emp}, tmp / "flows.pt")
            meta = {
                "e_gen": self.distance(phi_student, phi_teacher),
                "e_mem": self.distance(phi_student, phi_emp),
                "pfd_teacher_empirical": self.distance(phi_teacher, phi_emp),
                "final_loss": tlog.losses[-1],
                "loss_steps": tlog.steps,
                "losses": tlog.losses,
            }
            curve = []
            for step, state in sorted(tlog.snapshots.items()):
                model.load_state_dict(state)
                phi = self.flow(model.eval())
                curve.append({"step": step, **self.pfd_columns({"e_gen": (phi, phi_teacher), "e_mem": (phi, phi_emp)})})
            meta["curve"] = curve
            return meta

        name = f"N{n_train}-s{seed}" if width == c.mlp_width else f"w{width}-N{n_train}-s{seed}"
        unit = self.ws.run_unit("student", name, spec, produce)
        self.ws.record(unit)
        return unit

    def pfd_columns(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Each named PFD with its bootstrap interval over the noises (paired: the same resamples)."""
        errors = torch.stack([self.per_seed_errors(a, b) for a, b in pairs.values()], 1).numpy()
        size = errors.shape[0]
        found = intervals.bootstrap_sums_each(
            errors, {name: (lambda t, k=k: np.sqrt(t[:, k] / size)) for k, name in enumerate(pairs)}
        )
        out: dict[str, float] = {}
        for name, interval in found.items():
            out.update(intervals.flat(name, interval))
        return out

    def run(self) -> dict:
        from tqdm.auto import tqdm

        from diffcore import _env

        c = self.c
        self.ws.bind_config(c)
        pool = teacher_data(self.teacher, max(c.sizes), seed=c.teacher_seed + 1)
        phi_teacher = self.teacher_flow()
        rows, curve, flows = [], [], {}
        bar = tqdm(
            total=len(c.student_widths()) * len(c.sizes) * len(c.train_seeds),
            desc=NAME,
            unit="student",
            disable=not _env.progress_enabled(self.progress),
        )
        for width in c.student_widths():
            for n_train in c.sizes:
                for seed in c.train_seeds:
                    unit = self.student_unit(width, n_train, seed, pool[:n_train], phi_teacher)
                    m = unit.meta
                    flow = torch.load(unit.file("flows.pt"), weights_only=True)
                    flows[(width, n_train, seed)] = flow["student"]
                    rows.append(
                        {
                            "width": width,
                            "params": student_params(c, width),
                            "N": n_train,
                            "seed": seed,
                            **self.pfd_columns(
                                {
                                    "e_gen": (flow["student"], phi_teacher),
                                    "e_mem": (flow["student"], flow["empirical"]),
                                    "pfd_teacher_empirical": (phi_teacher, flow["empirical"]),
                                }
                            ),
                            "final_loss": m["final_loss"],
                        }
                    )
                    curve.extend({"width": width, "N": n_train, **p} for p in m["curve"])
                    bar.update(1)
        bar.close()
        summary = summarize(rows)
        results = {
            "experiment": NAME,
            "config": dataclasses.asdict(c),
            "students": rows,
            "curve": curve,
            "summary": summary,
            "bias_variance": self.bias_variance(flows, phi_teacher),
            "transition": transition(rows),
        }
        results["effect_properties"] = effect_properties(results)
        results = json.loads(base.json_dumps(results))
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(root / "pfd.csv", rows)
        base.atomic_write_csv(root / "curve.csv", curve)
        plot_vs_n(results, root / "pfd_vs_n.png")
        if curve:
            plot_vs_time(results, root / "pfd_vs_time.png")
        return results

    def bias_variance(self, flows: dict, phi_teacher: torch.Tensor) -> list[dict]:
        """Per (width, N) with 2+ seeds, the split of the seeds' mean squared E_gen (the PFD paper's
        bias-variance decomposition): ``bias2`` = mean over noises of |mean_s Phi_s - Phi_teacher|^2,
        ``variance`` = mean over noises and seeds of |Phi_s - mean_s Phi_s|^2 (per coordinate with
        ``per_dim``), so ``bias2 + variance`` = the seeds' mean of E_gen^2; bootstrap intervals over
        the noises (the same resamples for both)."""
        c = self.c
        out = []
        if len(c.train_seeds) < 2:
            return out
        for width in c.student_widths():
            for n_train in c.sizes:
                phis = torch.stack([flows[(width, n_train, s)].double() for s in c.train_seeds])  # [S, B, n]
                mean = phis.mean(0)
                bias_z = self.per_seed_errors(mean, phi_teacher)
                var_z = torch.stack([self.per_seed_errors(p, mean) for p in phis]).mean(0)
                terms = torch.stack([bias_z, var_z], 1).numpy()
                size = terms.shape[0]
                found = intervals.bootstrap_sums_each(
                    terms,
                    {"bias2": lambda t, size=size: t[:, 0] / size, "variance": lambda t, size=size: t[:, 1] / size},
                )
                out.append(
                    {
                        "width": width,
                        "N": n_train,
                        **intervals.flat("bias2", found["bias2"]),
                        **intervals.flat("variance", found["variance"]),
                    }
                )
        return out


def student_params(config: PFDConfig, width: int) -> int:
    """|theta|: the number of parameters of the MLP student of ``width``."""
    model = vector.MLPDenoiser(config.ambient_dim, width, config.mlp_depth, sigma_data=1.0)
    return sum(p.numel() for p in model.parameters())


def summarize(rows: list[dict]) -> dict:
    """Per width and N: E_gen, E_mem over the training seeds with 95% intervals (seeds-t across 3+
    seeds; with fewer, the bootstrap over noises of the one student, or the mean of the two seeds'
    bootstrap ends, labelled), and PFD(teacher, empirical) with its bootstrap over the noises.
    Keyed by width (a string); each entry has
    ``N``, ``params`` and for every measure ``key``, ``key_low``, ``key_high``."""
    out: dict = {}
    for width in sorted({r["width"] for r in rows}):
        entry: dict = {"N": [], "params": None}
        for n in sorted({r["N"] for r in rows if r["width"] == width}):
            at = [r for r in rows if r["width"] == width and r["N"] == n]
            entry["N"].append(n)
            entry["params"], entry["n_seeds"] = at[0]["params"], len(at)
            for key in ("e_gen", "e_mem", "pfd_teacher_empirical"):
                # the teacher and the empirical denoiser do not depend on the training seed: their
                # PFD's interval is the bootstrap over the noises
                rows_for = at[:1] if key == "pfd_teacher_empirical" else at
                interval = _over_seeds([r[key] for r in rows_for], rows_for, key)
                for suffix, value in (("", interval.value), ("_low", interval.low), ("_high", interval.high)):
                    entry.setdefault(key + suffix, []).append(value)
                entry.setdefault(key + "_method", interval.method)
        out[str(width)] = entry
    return out


def _over_seeds(values: list[float], rows: list[dict], key: str) -> intervals.Interval:
    if len(values) >= 3:
        return intervals.seed_interval(values)
    mean = sum(values) / len(values)
    low = min(mean, sum(r[f"{key}_low"] for r in rows) / len(rows))
    high = max(mean, sum(r[f"{key}_high"] for r in rows) / len(rows))
    return intervals.Interval(mean, low, high, method="bootstrap" if len(values) == 1 else "bootstrap-mean-of-2")


def _crossing(ns: list[int], e_gen: list[float], e_mem: list[float]) -> float | None:
    """N* where E_gen - E_mem first changes sign from + (closer to the empirical denoiser: memorizing)
    to - (closer to the teacher), interpolated linearly in log2 N; None without a crossing."""
    diff = [g - m for g, m in zip(e_gen, e_mem)]
    for i in range(len(diff) - 1):
        if diff[i] > 0 >= diff[i + 1]:
            a, b = math.log2(ns[i]), math.log2(ns[i + 1])
            t = diff[i] / (diff[i] - diff[i + 1])
            return 2 ** (a + t * (b - a))
    return None


def transition(rows: list[dict]) -> dict:
    """The memorization-to-generalization point N* (E_gen = E_mem) per width and seed, and the spread
    of log2 N* across widths on the two axes the PFD paper compares: N and N / sqrt(|theta|)
    (``spread_n``, ``spread_scaled``: standard deviations across widths, per seed)."""
    widths = sorted({r["width"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    params = {r["width"]: r["params"] for r in rows}
    per_seed = []
    for seed in seeds:
        points = {}
        for width in widths:
            at = sorted((r for r in rows if r["width"] == width and r["seed"] == seed), key=lambda r: r["N"])
            points[width] = _crossing([r["N"] for r in at], [r["e_gen"] for r in at], [r["e_mem"] for r in at])
        entry: dict = {"seed": seed, "n_star": {str(w): v for w, v in points.items()}}
        if len(widths) >= 2 and all(v is not None for v in points.values()):
            log_n = np.array([math.log2(points[w]) for w in widths])
            log_scaled = log_n - 0.5 * np.log2([params[w] for w in widths])
            entry.update(spread_n=float(log_n.std()), spread_scaled=float(log_scaled.std()))
        per_seed.append(entry)
    return {"widths": widths, "params": [params[w] for w in widths], "per_seed": per_seed}


def effect_properties(results: dict) -> dict[str, dict]:
    """The PFD paper's claims on this run, each decided on 95% intervals (``intervals.claim``):

    - ``e_gen_falls_with_n``: at every width E_gen at the largest N lies clearly below E_gen at the
      smallest N;
    - ``e_mem_rises_with_n``: at every width E_mem at the largest N lies clearly above the smallest N's;
    - ``transition_aligns_on_n_over_sqrt_params``: the spread of log2 N* across widths is smaller on
      the N / sqrt(|theta|) axis than on the N axis: the seeds-t interval of (spread_scaled -
      spread_n) lies below 0 (needs 2+ widths, 3+ seeds and a crossing at every width and seed);
    - ``early_learning_dip``: E_gen against training time dips (:func:`intervals.dips` over the
      checkpoints after step 0: its minimum clearly below both the first and the last checkpoint).
    """
    out = {}
    s = results["summary"]

    def iv(e, key, i):
        return intervals.Interval(
            e[key][i],
            e[f"{key}_low"][i],
            e[f"{key}_high"][i],
            method=e[f"{key}_method"],
            n=e["n_seeds"],
        )

    falls = {w: (iv(e, "e_gen", 0), iv(e, "e_gen", -1)) for w, e in s.items()}
    out["e_gen_falls_with_n"] = intervals.claim(
        all(intervals.clearly_below(b, a) for a, b in falls.values()),
        **{f"w{w}": {"smallest_n": a.as_dict(), "largest_n": b.as_dict()} for w, (a, b) in falls.items()},
    )
    rises = {w: (iv(e, "e_mem", 0), iv(e, "e_mem", -1)) for w, e in s.items()}
    out["e_mem_rises_with_n"] = intervals.claim(
        all(intervals.clearly_above(b, a) for a, b in rises.values()),
        **{f"w{w}": {"smallest_n": a.as_dict(), "largest_n": b.as_dict()} for w, (a, b) in rises.items()},
    )
    spreads = [(p["spread_scaled"], p["spread_n"]) for p in results["transition"]["per_seed"] if "spread_n" in p]
    complete = len(spreads) == len(results["transition"]["per_seed"]) >= 3
    if complete:
        diff = intervals.seed_interval([a - b for a, b in spreads])
        out["transition_aligns_on_n_over_sqrt_params"] = intervals.claim(
            diff.high < 0,
            spread_scaled_minus_spread_n=diff,
            spread_n=intervals.seed_interval([b for _, b in spreads]),
            spread_scaled=intervals.seed_interval([a for a, _ in spreads]),
        )
    else:
        out["transition_aligns_on_n_over_sqrt_params"] = intervals.claim(
            False,
            reason="needs 2+ widths, 3+ seeds and an E_gen = E_mem crossing at every width and seed",
            seeds_with_spreads=len(spreads),
        )
    points = [p for p in results["curve"] if p["step"] > 0]
    if len(points) >= 3:
        dip = intervals.dips(
            [intervals.Interval(p["e_gen"], p["e_gen_low"], p["e_gen_high"], method="bootstrap") for p in points]
        )
        out["early_learning_dip"] = {**dip, "step_at": points[dip["at"]]["step"]}
    else:
        out["early_learning_dip"] = intervals.claim(False, reason="no training-time curve (curve_size = 0)")
    return out


def _pyplot():
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    return plt


def plot_vs_n(results: dict, path) -> Path:
    """E_gen (solid) and E_mem (dashed) per student width against N and against N / sqrt(|theta|),
    bands the 95% intervals, and the bias-variance split of E_gen^2 against N."""
    from diffcore.experiments.plotting import finish

    plt = _pyplot()
    s, c = results["summary"], results["config"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, (width, e) in enumerate(s.items()):
        color = f"C{i}"
        for ax, scale in ((axes[0], 1.0), (axes[1], 1.0 / math.sqrt(e["params"]))):
            x = [n * scale for n in e["N"]]
            ax.plot(x, e["e_gen"], "o-", color=color, label=f"width {width}: E_gen (to teacher)")
            ax.fill_between(x, e["e_gen_low"], e["e_gen_high"], color=color, alpha=0.15, linewidth=0)
            ax.plot(x, e["e_mem"], "s--", color=color, label=f"width {width}: E_mem (to empirical)")
            ax.fill_between(x, e["e_mem_low"], e["e_mem_high"], color=color, alpha=0.15, linewidth=0)
    first = next(iter(s.values()))
    axes[0].plot(first["N"], first["pfd_teacher_empirical"], "k:", label="PFD(teacher, empirical)")
    axes[0].set_xlabel("training set size N")
    axes[1].set_xlabel("N / sqrt(|theta|)")
    for i, width in enumerate(s):
        bv = [b for b in results["bias_variance"] if str(b["width"]) == width]
        if bv:
            n = [b["N"] for b in bv]
            axes[2].plot(n, [b["bias2"] for b in bv], "o-", color=f"C{i}", label=f"width {width}: bias^2")
            axes[2].fill_between(
                n, [b["bias2_low"] for b in bv], [b["bias2_high"] for b in bv], color=f"C{i}", alpha=0.15, linewidth=0
            )
            axes[2].plot(n, [b["variance"] for b in bv], "s--", color=f"C{i}", label=f"width {width}: variance")
    axes[2].set_xlabel("training set size N")
    axes[2].set_ylabel("squared PFD")
    axes[2].set_title("bias-variance split of E_gen^2 over the training seeds", fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5)
    axes[0].set_ylabel(f"PFD ({c['normalize']})")
    return finish(
        fig,
        path,
        suptitle=f"{c['teacher']} teacher (n={c['ambient_dim']}, d={c['latent_dim']}), MLP students of depth "
        f"{c['mlp_depth']}; bands: 95% intervals ({first['e_gen_method']})",
    )


def plot_vs_time(results: dict, path) -> Path:
    from diffcore.experiments.plotting import finish

    plt = _pyplot()
    pts = [p for p in results["curve"] if p["step"] > 0]
    steps = [p["step"] for p in pts]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, marker, label in (("e_gen", "o-", "E_gen (to teacher)"), ("e_mem", "s-", "E_mem (to empirical)")):
        (line,) = ax.plot(steps, [p[key] for p in pts], marker, ms=3, label=label)
        ax.fill_between(
            steps,
            [p[f"{key}_low"] for p in pts],
            [p[f"{key}_high"] for p in pts],
            color=line.get_color(),
            alpha=0.18,
            linewidth=0,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"PFD ({results['config']['normalize']})")
    ax.set_title(
        f"E against training time: width-{results['config']['mlp_width']} student, "
        f"N={results['config']['curve_size']}\n(bands: 95% bootstrap intervals over the noises)",
        fontsize=8,
    )
    return finish(fig, path, [ax])


# CPU only: the students are tiny MLPs.
STUDY = base.Study(
    NAME,
    PFDConfig,
    cpu_only=True,
    threads=1,
    presets=PRESETS,
    make=lambda r: _Study(r.config, r.out, r.hooks or default_hooks(), r.progress),
)
run, run_preset = STUDY.run, STUDY.run_preset
