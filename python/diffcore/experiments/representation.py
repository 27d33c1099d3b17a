"""Representation dynamics across noise levels as a signal of generalization (docs/papers.md section 7).

For UNets trained on nested subsets of N digits (the reproducibility study's models: reused from its
output folder with ``models_from``, or trained here by running that study into ``OUT/reproducibility``):

- features at one named layer (``decoder_last`` by default: the decoder's last full-resolution block,
  chosen by ``scripts/representation_probe_sweep.py``; forward hooks, spatially mean-pooled) for
  inputs ``x0 + sigma n`` over a log-spaced sigma grid, the noise ``n`` of image i from its own seed
  (``noise_seed_start + i``, the same at every sigma);
- representation quality per sigma: the accuracy of a multinomial logistic probe fitted on
  ``probe_train`` labelled digits and scored on ``probe_test`` held-out digits (a seeded split of the
  1797 digits), and the class SNR (between-class over within-class energy) of the same features;
- per model: the shape of the probe curve (unimodal or decreasing), its peak sigma and height, next
  to the model's GL score and memorized fraction;
- across training time: the same curve for one N (``trajectory_size``) at checkpoints every
  ``snapshot_every`` steps of one training run, with each checkpoint's GL score;
- the theory curve: the optimal denoiser of a noisy mixture of low-rank Gaussians
  (``MoLRGDenoiser`` with ``noise_std``): SNR of its output in the true class subspace against the
  rest, and the posterior class confidence, against sigma.

Outputs: ``results.json``, ``curves.csv`` (model x step x sigma), ``models.csv``, ``molrg.csv``,
``representation.png``. Feature curves, the trajectory training and its metrics are resumable units.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcore._files import load_json
from diffcore.experiments import _stack, base, experiment, hooks as study_hooks
from diffcore.experiments.base import (
    ConfigError,
    Workspace,
    atomic_save_figure,
    atomic_write_csv,
    atomic_write_json,
    config_from_preset,
    json_dumps,
)

log = logging.getLogger(__name__)

NAME = "representation"
# The study whose models this one measures, run or read through the registry (no study imports another).
REPRODUCIBILITY = "reproducibility"


@dataclass(frozen=True)
class RepresentationConfig:
    models_from: str = ""  # a reproducibility study's --out folder; "" = run it into OUT/reproducibility
    reproducibility_preset: str = "quick"  # the preset of that study when it runs here
    widths: tuple[int, ...] = (32,)  # models used (and trained here); () = every width found
    sizes: tuple[int, ...] = ()  # () = every N of the preset / of models_from
    layer: str = "decoder_last"  # a name of diffcore.analysis.feature_layers(model)
    pooling: str = "mean"  # mean (spatial average) | flatten
    probe_train: int = 100  # labelled digits the probe is fitted on
    probe_test: int = 797  # held-out digits it is scored on
    probe_l2: float = 1e-2
    split_seed: int = 0
    num_sigmas: int = 14  # log-spaced from sigma_min to sigma_max
    sigma_min: float = 0.01
    sigma_max: float = 20.0
    noise_seed_start: int = 300000  # image i of the pool gets the noise of seed start + i
    trajectory_size: int = 128  # N of the training-time curve (0: none)
    snapshot_every: int = 200  # steps between the checkpoints of that curve
    shape_tolerance: float = 0.01  # rise and fall (probe accuracy) that make a curve unimodal
    molrg_components: int = 10
    molrg_ambient_dim: int = 64
    molrg_latent_dim: int = 4
    molrg_noise_std: float = 0.1
    molrg_samples: int = 2000
    molrg_seed: int = 0
    torch_threads: int = 1  # intra-op CPU threads of the feature extraction (0: torch's default)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field out of its range."""
        base.check_fields(self, FIELD_CHECKS)
        base.check_sigmas(self.sigma_min, self.sigma_max)
        base.check_seed_range("noise_seed_start", self.noise_seed_start, self.probe_train + self.probe_test)
        if self.molrg_components * self.molrg_latent_dim > self.molrg_ambient_dim:
            raise ConfigError(
                "molrg_latent_dim: molrg_components * molrg_latent_dim must not exceed "
                "molrg_ambient_dim (mutually orthogonal class subspaces)"
            )
        if not self.models_from:
            base.one_of(*experiment(REPRODUCIBILITY).PRESETS)("reproducibility_preset", self.reproducibility_preset)

    def sigmas(self) -> list[float]:
        ratio = self.sigma_max / self.sigma_min
        return [self.sigma_min * ratio ** (i / (self.num_sigmas - 1)) for i in range(self.num_sigmas)]


_POSITIVE = base.integer(1)
FIELD_CHECKS: dict[str, base.Check] = {
    "models_from": base.text,
    "reproducibility_preset": base.text,
    "widths": base.tuple_of(_POSITIVE, min_len=0),
    "sizes": base.tuple_of(base.integer(2), min_len=0),
    "layer": base.text,
    "pooling": base.one_of("mean", "flatten"),
    "probe_train": _POSITIVE,
    "probe_test": _POSITIVE,
    "probe_l2": base.number(0),
    "split_seed": base.seed,
    "num_sigmas": base.integer(3),  # a shape needs a middle
    "sigma_min": base.sigma,
    "sigma_max": base.sigma,
    "noise_seed_start": base.seed,
    "trajectory_size": base.integer(0),
    "snapshot_every": _POSITIVE,
    "shape_tolerance": base.number(0),
    "molrg_components": base.integer(2),
    "molrg_ambient_dim": _POSITIVE,
    "molrg_latent_dim": _POSITIVE,
    "molrg_noise_std": base.number(0),
    "molrg_samples": base.integer(10),
    "molrg_seed": base.seed,
    "torch_threads": base.integer(0),
}


def _quick() -> RepresentationConfig:
    """Width-32 digits UNets of the main job's recipe at every N (the decoder's last block, mean-pooled,
    100 labelled digits: the setting with the clearest contrast in the sweep of docs/studies.md), the
    training-time curve at N = 128."""
    return RepresentationConfig()


def _tiny() -> RepresentationConfig:
    """Seconds: the reproducibility study's tiny preset, a coarse grid, small probe and theory."""
    return RepresentationConfig(
        reproducibility_preset="tiny",
        widths=(4,),
        probe_train=60,
        probe_test=120,
        num_sigmas=5,
        trajectory_size=8,
        snapshot_every=10,
        molrg_components=3,
        molrg_ambient_dim=24,
        molrg_samples=200,
    )


def _paper() -> RepresentationConfig:
    """The reproducibility study's paper-preset CIFAR-10 models (set models_from, or data_root through
    that preset); probe on 10k labelled / 10k held-out images is out of reach of the digits labels
    split, so set probe_train/probe_test to fit the dataset."""
    return RepresentationConfig(
        reproducibility_preset="paper",
        widths=(64, 128),
        probe_train=10000,
        probe_test=10000,
        trajectory_size=1024,
        snapshot_every=20000,
        sigma_max=80.0,
    )


PRESETS: dict[str, Callable[[], RepresentationConfig]] = {"quick": _quick, "tiny": _tiny, "paper": _paper}
CONFIG_CLASS = RepresentationConfig


# ----------------------------------------------------------------------------- one curve


def probe_split(pool_size: int, config: RepresentationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the probe's labelled split ``[probe_train]`` and held-out split ``[probe_test]``
    (a permutation of the pool seeded by ``split_seed``)."""
    c = config
    if c.probe_train + c.probe_test > pool_size:
        raise ConfigError(
            f"probe_train + probe_test: {c.probe_train + c.probe_test} exceeds the {pool_size} labelled images"
        )
    order = torch.randperm(pool_size, generator=torch.Generator().manual_seed(c.split_seed))
    return order[: c.probe_train], order[c.probe_train : c.probe_train + c.probe_test]


def probe_curve(
    denoiser: torch.nn.Module, pool: torch.Tensor, labels: torch.Tensor, config: RepresentationConfig
) -> list[dict]:
    """Probe accuracy and class SNR per sigma of ``denoiser``'s features at ``config.layer``.

    ``pool`` [P, C, H, W] and ``labels`` [P]: the labelled images, split by :func:`probe_split`;
    image i's noise comes from seed ``noise_seed_start + i`` (the same at every sigma). Rows:
    ``{sigma, probe_accuracy, probe_train_accuracy, snr}``."""
    from diffcore import sampler
    from diffcore.analysis.representation import class_snr, extract_features, linear_probe

    c = config
    train_idx, test_idx = probe_split(pool.shape[0], c)
    used = torch.cat([train_idx, test_idx])
    noise = sampler.noise_from_seeds(
        [c.noise_seed_start + int(i) for i in used], tuple(pool.shape[1:]), device="cpu", dtype=torch.float32
    )
    images, y = pool[used].float().cpu(), labels[used]
    k = c.probe_train
    rows = []
    for sigma in c.sigmas():
        feats = extract_features(denoiser, images, noise, sigma, [c.layer], pooling=c.pooling)[c.layer]
        probe = linear_probe(feats[:k], y[:k], feats[k:], y[k:], l2=c.probe_l2)
        rows.append(
            {
                "sigma": sigma,
                "probe_accuracy": probe.accuracy,
                "probe_train_accuracy": probe.train_accuracy,
                "snr": class_snr(feats, y),
            }
        )
    return rows


# ----------------------------------------------------------------------------- the study


@dataclass
class _Model(_stack.ModelOfSubset):
    path: Path  # a finished model unit (its checkpoint/ folder)
    gl: float | None
    memorized_ratio: float | None


class _Study:
    def __init__(self, config: RepresentationConfig, out, hooks, device: str, progress: bool):
        self.c = config
        self.ws = Workspace(out)
        self.hooks = hooks or study_hooks.default_hooks()
        self.default_stack = hooks is None
        self.device = device
        self.progress = progress
        self.seconds: dict[str, float] = {}

    # models --------------------------------------------------------------------
    def reproducibility_run(self) -> tuple[dict, Path]:
        """The reproducibility results and folder: ``models_from``, or that study run here."""
        reproducibility = experiment(REPRODUCIBILITY)
        c = self.c
        if c.models_from:
            root = Path(c.models_from)
            results_path = root / "results.json"
            if not results_path.is_file():
                raise ConfigError(f"models_from: {root} holds no results.json of a finished reproducibility run")
            results = load_json(results_path, what="models_from: results", follow=False)
            if results.get("experiment") != REPRODUCIBILITY:
                raise ConfigError(
                    f"models_from: {results_path} is a {results.get('experiment')!r} run, not a reproducibility run"
                )
            return results, root
        config = reproducibility.PRESETS[c.reproducibility_preset]()
        config = dataclasses.replace(
            config, widths=c.widths or config.widths, sizes=c.sizes or config.sizes, train_seeds=config.train_seeds[:1]
        )
        root = self.ws.root / "reproducibility"
        start = time.perf_counter()
        results = reproducibility.run(
            config, root, hooks=None if self.default_stack else self.hooks, device=self.device, progress=self.progress
        )
        self.seconds["reproducibility"] = time.perf_counter() - start
        return results, root

    def check_inputs(self) -> None:
        """ConfigError naming the field for what the config alone cannot show, before the folder is
        bound: the models in ``models_from`` that ``widths`` / ``sizes`` select, and ``layer`` among
        the layers of those models (or, when the reproducibility run is made here, of an untrained
        model built from its recipe)."""
        from diffcore.analysis.representation import feature_layers

        c = self.c
        if c.models_from:
            repro, root = self.reproducibility_run()
            model = self._load(self.models(repro, root)[0].path)
        elif self.default_stack:
            model = self._untrained_model()
        else:
            return
        layers = feature_layers(model)
        if c.layer not in layers:
            raise ConfigError(f"layer: these models have no layer {c.layer!r}; they have: {', '.join(layers)}")

    def _untrained_model(self):
        """The first model of the reproducibility run made here, built but not trained (its layers)."""
        from diffcore.train.registry import build_model

        c = self.c
        rc = dataclasses.asdict(experiment(REPRODUCIBILITY).PRESETS[c.reproducibility_preset]())
        width = (c.widths or tuple(rc["widths"]))[0]
        return build_model(_stack.model_spec(_stack.model_unit_spec(rc, width, 1, 0)))

    def models(self, results: dict, root: Path) -> list[_Model]:
        c = self.c
        found = []
        for row in results["models"]:
            if (c.widths and row["width"] not in c.widths) or (c.sizes and row["n"] not in c.sizes):
                continue
            label = f"w{row['width']}-n{row['n']}-s{row['seed']}"
            path = root / "units" / "models" / label
            if not (path / "MANIFEST.json").is_file():
                raise ConfigError(f"models_from: model unit {path} is missing")
            found.append(_Model(label, row["width"], row["n"], row["seed"], path, row["gl"], row["memorized_ratio"]))
        if not found:
            raise ConfigError(f"widths, sizes: no model of {root} matches widths={c.widths}, sizes={c.sizes}")
        return sorted(found, key=lambda m: (m.width, m.n, m.seed))

    # features ------------------------------------------------------------------
    def feature_spec(self) -> dict:
        c = self.c
        return {
            "layer": c.layer,
            "pooling": c.pooling,
            "probe_train": c.probe_train,
            "probe_test": c.probe_test,
            "probe_l2": c.probe_l2,
            "split_seed": c.split_seed,
            "sigmas": c.sigmas(),
            "noise_seed_start": c.noise_seed_start,
        }

    def curve_unit(self, name: str, model_spec: dict, load: Callable, pool, labels) -> list[dict]:
        spec = {"model": model_spec, **self.feature_spec()}
        unit = self.ws.run_unit(
            "curves", name, spec, lambda tmp, work: {"rows": probe_curve(load(), pool, labels, self.c)}
        )
        return unit.meta["rows"]

    # training time ---------------------------------------------------------------
    def trajectory_unit(self, repro: dict):
        """One model (the first width, N = trajectory_size, the first seed) trained with the
        reproducibility run's recipe, keeping its checkpoints every ``snapshot_every`` steps."""
        from diffcore import train

        c = self.c
        rc = repro["config"]
        width, n = (c.widths or tuple(rc["widths"]))[0], c.trajectory_size
        spec = {**_stack.model_unit_spec(rc, width, n, rc["train_seeds"][0]), "snapshot_every": c.snapshot_every}

        def produce(tmp: Path, work: Path) -> dict:
            steps = spec["train_steps"]
            config = _stack.training_request(spec, work, self.device, self.progress).replace(
                checkpoint_every=c.snapshot_every, keep_checkpoints=steps // c.snapshot_every + 1
            )
            train.train_from_config(config, resume="auto")
            from diffcore.train.checkpoint import list_checkpoints

            kept = [
                (step, path)
                for step, path in list_checkpoints(work / "checkpoints")
                if step % c.snapshot_every == 0 or step == steps
            ]
            for step, path in kept:
                shutil.copytree(path, tmp / f"step{step}" / "checkpoint")
            return {"steps": [step for step, _ in kept]}

        unit = self.ws.run_unit("trajectory", f"w{width}-n{n}", spec, produce)
        return unit, spec

    def snapshot_metrics(self, unit, spec: dict, step: int, pool, repro: dict) -> dict:
        """GL score and memorized fraction of one checkpoint, measured as the reproducibility study does."""
        from diffcore import metrics

        rc = repro["config"]
        train_images, _ = self.hooks.subset(pool, spec["n"], spec["subset_seed"])
        mspec = {
            "model": spec,
            "step": step,
            "similarity": repro["similarity"],
            "threshold": repro["threshold"],
            "num_samples": rc["num_samples"],
            "sample_seed_start": rc["sample_seed_start"],
        }

        def produce(tmp: Path, work: Path) -> dict:
            seeds = list(range(rc["sample_seed_start"], rc["sample_seed_start"] + rc["num_samples"]))
            model = self.hooks.load(unit.path / f"step{step}", device=self.device)
            samples = self.hooks.sample(
                model,
                seeds,
                tuple(pool.shape[1:]),
                steps=rc["sampler_steps"],
                solver=rc["solver"],
                sigma_min=rc["sigma_min"],
                sigma_max=rc["sigma_max"],
                device=self.device,
                progress=False,
            )
            similarity = metrics.get_similarity(rc["similarity"])
            gl = metrics.gl_score(samples, train_images.float(), similarity, repro["threshold"], knn=self.hooks.knn)
            mem = metrics.memorization_ratio(
                samples, train_images.float(), rc["memorization_ratio"], knn=self.hooks.knn
            )
            return {"gl": gl.score, "memorized_ratio": mem.fraction}

        return self.ws.run_unit("trajectory-metrics", f"{unit.path.name}-step{step}", mspec, produce).meta

    # the whole study ----------------------------------------------------------------
    def run(self) -> dict:
        from diffcore.analysis.representation import curve_shape

        c = self.c
        self.check_inputs()
        self.ws.bind_config(c)
        repro, root = self.reproducibility_run()
        pool = self.hooks.load_dataset(repro["config"]["dataset"], repro["config"]["data_root"])
        labels = _labels(repro["config"]["dataset"], repro["config"]["data_root"], pool.shape[0])
        sigmas = c.sigmas()
        shape_of = lambda rows: curve_shape(sigmas, [r["probe_accuracy"] for r in rows], c.shape_tolerance)  # noqa: E731
        start = time.perf_counter()
        models, curves = [], []
        for m in self.models(repro, root):
            spec = load_json(m.path / "MANIFEST.json", what="unit manifest", follow=False)["spec"]
            rows = self.curve_unit(m.label, spec, lambda p=m.path: self._load(p), pool, labels)
            models.append(
                {
                    "model": m.label,
                    "width": m.width,
                    "n": m.n,
                    "seed": m.seed,
                    "gl": m.gl,
                    "memorized_ratio": m.memorized_ratio,
                    **shape_of(rows),
                }
            )
            curves.extend({"model": m.label, "n": m.n, "step": repro["config"]["train_steps"], **r} for r in rows)
        self.seconds["model_curves"] = time.perf_counter() - start
        trajectory = self.trajectory(repro, pool, labels, curves, shape_of) if c.trajectory_size else []
        start = time.perf_counter()
        molrg, molrg_shape = self.theory()
        self.seconds["molrg"] = time.perf_counter() - start
        results = json.loads(
            json_dumps(
                {
                    "experiment": NAME,
                    "config": dataclasses.asdict(c),
                    "models_from": str(root),
                    "threshold": repro["threshold"],
                    "similarity": repro["similarity"],
                    "models": models,
                    "trajectory": trajectory,
                    "curves": curves,
                    "molrg": molrg,
                    "molrg_shape": molrg_shape,
                    "seconds": self.seconds,
                }
            )
        )
        self.write(results)
        return results

    def trajectory(self, repro: dict, pool, labels, curves: list, shape_of) -> list[dict]:
        start = time.perf_counter()
        unit, spec = self.trajectory_unit(repro)
        self.seconds["trajectory_train"] = time.perf_counter() - start
        start = time.perf_counter()
        out = []
        for step in unit.meta["steps"]:
            name = f"{unit.path.name}-step{step}"
            rows = self.curve_unit(
                name, {**spec, "step": step}, lambda s=step: self._load(unit.path / f"step{s}"), pool, labels
            )
            scores = self.snapshot_metrics(unit, spec, step, pool, repro)
            out.append(
                {"model": name, "n": spec["n"], "width": spec["width"], "step": step, **scores, **shape_of(rows)}
            )
            curves.extend({"model": name, "n": spec["n"], "step": step, **r} for r in rows)
        self.seconds["trajectory_curves"] = time.perf_counter() - start
        return out

    def theory(self) -> tuple[list[dict], dict]:
        from diffcore.analysis.representation import curve_shape, molrg_representation_curve
        from diffcore.denoisers import MoLRGDenoiser

        c = self.c
        den = MoLRGDenoiser.random(
            c.molrg_components, c.molrg_ambient_dim, c.molrg_latent_dim, seed=c.molrg_seed, noise_std=c.molrg_noise_std
        )
        sigmas = [0.002 * (80 / 0.002) ** (i / 24) for i in range(25)]
        rows = molrg_representation_curve(den, sigmas, num=c.molrg_samples, seed=c.molrg_seed)
        shape = curve_shape(sigmas, [math.log10(r["snr"]) for r in rows], tolerance=0.1)
        return rows, {**shape, "measure": "log10 snr"}

    def _load(self, unit_path: Path):
        model = self.hooks.load(unit_path, device=self.device)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"hooks.load: expected a torch.nn.Module (features are read by hooks), got {type(model).__name__}"
            )
        return model

    def write(self, results: dict) -> None:
        root = self.ws.root
        atomic_write_json(root / "results.json", results)
        atomic_write_csv(root / "curves.csv", results["curves"])
        atomic_write_csv(root / "models.csv", results["models"] + results["trajectory"])
        atomic_write_csv(root / "molrg.csv", results["molrg"])
        plot(results, root / "representation.png")


def _labels(dataset: str, data_root: str, expected: int) -> torch.Tensor:
    """Integer class labels of the dataset's pool, in the pool's order."""
    from diffcore import data

    labels = data.load_dataset(_stack.data_spec(dataset, data_root)).labels
    if labels.shape[0] != expected:
        raise ValueError(f"dataset: {labels.shape[0]} labels for {expected} images")
    return labels.cpu()


# ----------------------------------------------------------------------------- figure


def plot(results: dict, path) -> Path:
    """Four panels: probe accuracy vs sigma per N; class SNR vs sigma per N; probe accuracy vs sigma
    over training time for one N; the MoLRG theory curve (SNR and class confidence)."""
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.0))
    final = results["models"]
    colors = plt.cm.viridis([i / max(1, len(final) - 1) for i in range(len(final))])
    for m, color in zip(final, colors):
        rows = [r for r in results["curves"] if r["model"] == m["model"]]
        gl = "n/a" if m["gl"] is None else f"{m['gl']:.2f}"
        label = f"N={m['n']} (GL {gl}, {m['shape']})"
        axes[0].plot(
            [r["sigma"] for r in rows], [r["probe_accuracy"] for r in rows], "-o", ms=3, color=color, label=label
        )
        axes[1].plot([r["sigma"] for r in rows], [r["snr"] for r in rows], "-o", ms=3, color=color, label=label)
    axes[0].set_title(
        f"linear probe on {results['config']['layer']} features\n({results['config']['probe_train']} labelled digits)",
        fontsize=9,
    )
    axes[1].set_title("class SNR of the same features", fontsize=9)
    axes[0].set_ylabel("held-out probe accuracy")
    axes[1].set_ylabel("between / within-class energy")
    axes[1].set_yscale("log")
    snaps = results["trajectory"]
    colors = plt.cm.plasma([i / max(1, len(snaps) - 1) for i in range(len(snaps))])
    for s, color in zip(snaps, colors):
        rows = [r for r in results["curves"] if r["model"] == s["model"]]
        axes[2].plot(
            [r["sigma"] for r in rows],
            [r["probe_accuracy"] for r in rows],
            "-o",
            ms=3,
            color=color,
            label=f"step {s['step']} (GL {s['gl']:.2f}, {s['shape']})",
        )
    title = f"training time, N={snaps[0]['n']}" if snaps else "training time (not run)"
    axes[2].set_title(title, fontsize=9)
    axes[2].set_ylabel("held-out probe accuracy")
    for ax in axes[:3]:
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    theory = results["molrg"]
    ax = axes[3]
    ax.plot([r["sigma"] for r in theory], [r["snr"] for r in theory], "-", color="C0", label="SNR (left)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sigma")
    ax.set_ylabel("SNR of D(x) in the class subspace", color="C0")
    twin = ax.twinx()
    twin.plot(
        [r["sigma"] for r in theory],
        [r["confidence"] for r in theory],
        "--",
        color="C3",
        label="class confidence (right)",
    )
    twin.set_ylabel("posterior weight of the true class", color="C3")
    cfg = results["config"]
    ax.set_title(
        f"theory: optimal noisy-MoLRG denoiser\nK={cfg['molrg_components']}, n={cfg['molrg_ambient_dim']}, "
        f"d={cfg['molrg_latent_dim']}, delta={cfg['molrg_noise_std']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.suptitle(
        "Representation dynamics across noise levels: unimodal when generalizing, decreasing when memorizing",
        fontsize=10,
    )
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def run(config: RepresentationConfig, out, *, hooks=None, device: str = "auto", progress: bool = True) -> dict:
    """Run (or resume) the study into ``out``; returns results.json's content."""
    return base.run_study(
        STUDY,
        config,
        out,
        lambda given, resolved, part: _Study(config, out, given, resolved, progress),
        hooks=hooks,
        device=device,
    )


STUDY = base.Study(NAME, RepresentationConfig, one_process=True)


def run_preset(preset: str, out, overrides=(), **kwargs) -> dict:
    return run(config_from_preset(PRESETS, preset, overrides), out, **kwargs)
