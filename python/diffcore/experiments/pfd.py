"""Probability flow distance: teacher-student generalization and memorization (PAPERS.md section 2).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffcore.experiments import _vector
from diffcore.experiments import base
from diffcore.models import vector
from diffcore.experiments.base import (Workspace, atomic_save_figure, atomic_write_csv, atomic_write_json,
                                       config_from_preset, json_dumps)

log = logging.getLogger(__name__)

NAME = "pfd"


@dataclass(frozen=True)
class PFDConfig:
    teacher: str = "molrg"                        # molrg | gaussian
    teacher_flow: str = "sampler"                 # sampler | exact (gaussian teacher only)
    num_components: int = 2                       # MoLRG: K
    ambient_dim: int = 16                         # n
    latent_dim: int = 8                           # MoLRG: d; Gaussian: rank (eigenvalues 1/k)
    teacher_seed: int = 0
    sizes: tuple[int, ...] = (4, 16, 64, 256, 1024)
    train_seeds: tuple[int, ...] = (0,)
    mlp_width: int = 128
    mlp_depth: int = 3
    train_steps: int = 2000
    learning_rate: float = 2e-3
    batch_size: int = 128
    P_mean: float = -1.2
    P_std: float = 1.2
    curve_size: int = 256                         # N of the E vs training-time curve
    curve_points: int = 10                        # snapshots, log-spaced over training
    num_samples: int = 256
    sample_seed_start: int = 100000
    sampler_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    normalize: str = "per_dim"                    # none | per_dim (RMS per coordinate)

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of its range."""
        base.check_fields(self, FIELD_CHECKS)
        if self.teacher_flow == "exact" and self.teacher != "gaussian":
            raise base.ConfigError("teacher_flow: 'exact' needs teacher=gaussian (the MoLRG flow has no closed form)")
        if self.latent_dim > self.ambient_dim:
            raise base.ConfigError(f"latent_dim: expected <= ambient_dim = {self.ambient_dim}, got {self.latent_dim}")
        if self.curve_size and self.curve_size not in self.sizes:
            raise base.ConfigError(f"curve_size: {self.curve_size} must be one of sizes {self.sizes} (or 0 for none)")
        base.check_seed_range("teacher_seed", self.teacher_seed, 2)
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        base.check_sigmas(self.sigma_min, self.sigma_max)

    def snapshot_steps(self) -> list[int]:
        if not self.curve_size:
            return []
        grid = torch.logspace(math.log10(max(1, self.train_steps // 200)), math.log10(self.train_steps),
                              self.curve_points)
        return sorted({0, *(int(round(float(s))) for s in grid)})


def _quick() -> PFDConfig:
    """About 2-4 minutes on a 2-core CPU (measured time in docs/studies.md)."""
    return PFDConfig()


def _tiny() -> PFDConfig:
    """Seconds, for tests."""
    return PFDConfig(ambient_dim=8, latent_dim=2, sizes=(2, 256), mlp_width=64, mlp_depth=2, train_steps=400,
                     learning_rate=3e-3, curve_size=2, curve_points=4, num_samples=64, sampler_steps=10)


def _paper() -> PFDConfig:
    """A wider N grid, 3 training seeds, longer training (hours on a CPU; minutes on a GPU-less box
    per model)."""
    return PFDConfig(ambient_dim=32, latent_dim=4, sizes=tuple(2 ** k for k in range(1, 14)), train_seeds=(0, 1, 2),
                     mlp_width=256, mlp_depth=4, train_steps=20000, curve_size=64, curve_points=20, num_samples=2048)


_POSITIVE = base.integer(1)
_POSITIVE_REAL = base.number(0, lo_open=True)
FIELD_CHECKS: dict[str, base.Check] = {
    "teacher": base.one_of("molrg", "gaussian"), "teacher_flow": base.one_of("sampler", "exact"),
    "num_components": _POSITIVE, "ambient_dim": _POSITIVE, "latent_dim": _POSITIVE, "teacher_seed": base.seed,
    "sizes": base.tuple_of(_POSITIVE), "train_seeds": base.tuple_of(base.seed),
    "mlp_width": _POSITIVE, "mlp_depth": _POSITIVE, "train_steps": _POSITIVE, "learning_rate": _POSITIVE_REAL,
    "batch_size": _POSITIVE, "P_mean": base.log_sigma, "P_std": _POSITIVE_REAL,
    "curve_size": base.integer(0), "curve_points": _POSITIVE,
    "num_samples": _POSITIVE, "sample_seed_start": base.seed, "sampler_steps": _POSITIVE,
    "sigma_min": base.sigma, "sigma_max": base.sigma, "normalize": base.one_of("none", "per_dim"),
}

PRESETS: dict[str, Callable[[], PFDConfig]] = {"quick": _quick, "tiny": _tiny, "paper": _paper}
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
        z = torch.randn(num, teacher.eigvals.shape[0], generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        return (teacher.mean + (z * teacher.eigvals.sqrt()) @ teacher.eigvecs.T).float()
    return teacher.sample(num, seed=seed)


class _Study:
    def __init__(self, config: PFDConfig, out, hooks: PFDHooks, progress: bool):
        config.validate()
        self.c = config
        self.ws = Workspace(out)
        self.hooks = hooks
        self.progress = progress
        from diffcore import sampler

        self.sigmas = sampler.karras_sigmas(config.sampler_steps, config.sigma_min, config.sigma_max)
        seeds = list(range(config.sample_seed_start, config.sample_seed_start + config.num_samples))
        self.noise = sampler.noise_from_seeds(seeds, (config.ambient_dim,))           # [B, n] float32
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

    def student_unit(self, n_train: int, seed: int, train: torch.Tensor, phi_teacher: torch.Tensor):
        c = self.c
        with_curve = n_train == c.curve_size and seed == c.train_seeds[0]
        spec = {"teacher": c.teacher, "teacher_flow": c.teacher_flow, "K": c.num_components, "n": c.ambient_dim,
                "d": c.latent_dim, "teacher_seed": c.teacher_seed, "N": n_train, "seed": seed,
                "width": c.mlp_width, "depth": c.mlp_depth, "steps": c.train_steps, "lr": c.learning_rate,
                "batch_size": c.batch_size, "P_mean": c.P_mean, "P_std": c.P_std,
                "num_samples": c.num_samples, "sample_seed_start": c.sample_seed_start,
                "sampler_steps": c.sampler_steps, "normalize": c.normalize,
                "snapshots": c.snapshot_steps() if with_curve else []}

        def produce(tmp: Path, work: Path):
            torch.manual_seed(seed)
            model = vector.MLPDenoiser(c.ambient_dim, c.mlp_width, c.mlp_depth, sigma_data=_vector.data_sigma(train))
            tlog = _vector.train_denoiser(model, train, steps=c.train_steps, batch_size=c.batch_size,
                                          lr=c.learning_rate, seed=seed,
                                          P_mean=c.P_mean, P_std=c.P_std, sigma_data=_vector.data_sigma(train),
                                          snapshot_steps=spec["snapshots"])
            torch.save(model.state_dict(), tmp / "model.pt")
            phi_emp = self.flow(self.hooks.empirical_denoiser(train))
            phi_student = self.flow(model)
            torch.save({"student": phi_student, "empirical": phi_emp}, tmp / "flows.pt")
            meta = {"e_gen": self.distance(phi_student, phi_teacher), "e_mem": self.distance(phi_student, phi_emp),
                    "pfd_teacher_empirical": self.distance(phi_teacher, phi_emp), "final_loss": tlog.losses[-1],
                    "loss_steps": tlog.steps, "losses": tlog.losses}
            curve = []
            for step, state in sorted(tlog.snapshots.items()):
                model.load_state_dict(state)
                phi = self.flow(model.eval())
                curve.append({"step": step, "e_gen": self.distance(phi, phi_teacher),
                              "e_mem": self.distance(phi, phi_emp)})
            meta["curve"] = curve
            return meta

        unit = self.ws.run_unit("student", f"N{n_train}-s{seed}", spec, produce)
        self.ws.record(unit)
        return unit

    def run(self) -> dict:
        from tqdm.auto import tqdm

        from diffcore import _env

        c = self.c
        self.ws.bind_config(c)
        pool = teacher_data(self.teacher, max(c.sizes), seed=c.teacher_seed + 1)
        phi_teacher = self.teacher_flow()
        rows, curve = [], []
        bar = tqdm(total=len(c.sizes) * len(c.train_seeds), desc=NAME, unit="student",
                   disable=not _env.progress_enabled(self.progress))
        for n_train in c.sizes:
            for seed in c.train_seeds:
                unit = self.student_unit(n_train, seed, pool[:n_train], phi_teacher)
                m = unit.meta
                rows.append({"N": n_train, "seed": seed, "e_gen": m["e_gen"], "e_mem": m["e_mem"],
                             "pfd_teacher_empirical": m["pfd_teacher_empirical"], "final_loss": m["final_loss"]})
                curve.extend({"N": n_train, **p} for p in m["curve"])
                bar.update(1)
        bar.close()
        results = json.loads(json_dumps({"experiment": NAME, "config": dataclasses.asdict(c), "students": rows,
                                         "curve": curve, "summary": summarize(rows)}))
        root = self.ws.root
        atomic_write_json(root / "results.json", results)
        atomic_write_csv(root / "pfd.csv", rows)
        atomic_write_csv(root / "curve.csv", curve, columns=["N", "step", "e_gen", "e_mem"])
        plot_vs_n(results, root / "pfd_vs_n.png")
        if curve:
            plot_vs_time(results, root / "pfd_vs_time.png")
        return results


def summarize(rows: list[dict]) -> dict:
    """Means over training seeds per N."""
    out = {"N": [], "e_gen": [], "e_mem": [], "pfd_teacher_empirical": []}
    for n in sorted({r["N"] for r in rows}):
        at = [r for r in rows if r["N"] == n]
        out["N"].append(n)
        for key in ("e_gen", "e_mem", "pfd_teacher_empirical"):
            out[key].append(sum(r[key] for r in at) / len(at))
    return out


def _pyplot():
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    return plt


def plot_vs_n(results: dict, path) -> Path:
    plt = _pyplot()
    s, c = results["summary"], results["config"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(s["N"], s["e_gen"], "o-", label="E_gen = PFD(student, teacher)")
    ax.plot(s["N"], s["e_mem"], "s-", label="E_mem = PFD(student, empirical)")
    ax.plot(s["N"], s["pfd_teacher_empirical"], "k:", label="PFD(teacher, empirical)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training set size N")
    ax.set_ylabel(f"PFD ({c['normalize']})")
    ax.set_title(f"{c['teacher']} teacher (n={c['ambient_dim']}, d={c['latent_dim']}), MLP student "
                 f"{c['mlp_depth']}x{c['mlp_width']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def plot_vs_time(results: dict, path) -> Path:
    plt = _pyplot()
    pts = [p for p in results["curve"] if p["step"] > 0]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([p["step"] for p in pts], [p["e_gen"] for p in pts], "o-", label="E_gen (to teacher)")
    ax.plot([p["step"] for p in pts], [p["e_mem"] for p in pts], "s-", label="E_mem (to empirical)")
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"PFD ({results['config']['normalize']})")
    ax.set_title(f"Early learning: student trained on N={results['config']['curve_size']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def run(config: PFDConfig, out, *, hooks: PFDHooks | None = None, device: str = "auto",
        progress: bool = True) -> dict:
    """Run (or resume) the study into ``out`` (CPU only; the students are tiny MLPs)."""
    return base.run_study(STUDY, config, out, lambda given, resolved, part: _Study(
        config, out, given or default_hooks(), progress), hooks=hooks, device=device)


STUDY = base.Study(NAME, PFDConfig, cpu_only=True, threads=1)


def run_preset(preset: str, out, overrides=(), **kwargs) -> dict:
    return run(config_from_preset(PRESETS, preset, overrides), out, **kwargs)
