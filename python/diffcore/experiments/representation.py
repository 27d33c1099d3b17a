"""Representation dynamics across noise levels as a signal of generalization (docs/papers.md section 7).

For UNets trained on nested subsets of N digits (the reproducibility study's models: reused from its
output folder with ``models_from``, or trained here by running that study into ``OUT/reproducibility``):

- features at one named layer (``decoder_last``, mean-pooled, 100 labelled digits: the setting a
  sweep chose on width-32 models, fixed before the widths measured here were looked at; forward
  hooks) for inputs ``x0 + sigma n`` over a log-spaced sigma grid, the noise ``n`` of pool image i
  from its own seed (``noise_seed_start + i``, the same at every sigma);
- representation quality per sigma: the accuracy of a multinomial logistic probe fitted on
  ``probe_train`` labelled digits and scored on ``probe_test`` held-out digits, for ``probe_splits``
  seeded splits (label draws) of the 1797 digits, and the class SNR (between-class over within-class
  energy) of the held-out features; 95% intervals across the splits (``seeds-t``);
- the control: the same probe on the raw pixels ``x0 + sigma n`` (digits are nearly linearly
  separable in pixel space, so a feature curve means something only beside it), and per model the
  paired advantage of the features over the pixels at the feature curve's peak;
- per model: the shape of the probe curve decided on the intervals
  (:func:`diffcore.analysis.representation.interval_shape`: unimodal, decreasing, increasing or
  flat), next to the model's GL score and memorized fraction (Wilson intervals);
- across training time: the same curves for each N of ``trajectory_sizes`` at checkpoints every
  ``snapshot_every`` steps of one training run, with each checkpoint's GL score;
- claims (``intervals.claim``): the paper's signature per width (every generalizing model unimodal,
  every memorizing model decreasing) and per trajectory;
- the theory curve: the optimal denoiser of a noisy mixture of low-rank Gaussians
  (``MoLRGDenoiser`` with ``noise_std``): SNR of its output in the true class subspace against the
  rest, and the posterior class confidence, against sigma.

Outputs: ``results.json``, ``curves.csv`` (model x step x sigma x split), ``summary.csv`` (model x
sigma, with intervals), ``models.csv``, ``molrg.csv``, ``representation.png``. Feature curves, the
trajectory training and its metrics are resumable units.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcore._files import load_json
from diffcore.experiments import _stack, base, experiment

log = logging.getLogger(__name__)

NAME = "representation"
# The study whose models this one measures, run or read through the registry (no study imports another).
REPRODUCIBILITY = "reproducibility"


@dataclass(frozen=True)
class RepresentationConfig:
    models_from: str = ""  # a reproducibility study's --out folder; "" = run it into OUT/reproducibility
    reproducibility_preset: str = "quick"  # the preset of that study when it runs here
    widths: tuple[int, ...] = (8, 16)  # models used (and trained here); () = every width found
    sizes: tuple[int, ...] = ()  # () = every N of the preset / of models_from
    # The probe setting, fixed before the models measured here were looked at: chosen by
    # scripts/representation_probe_sweep.py on width-32 models (docs/studies.md), applied to other widths.
    layer: str = "decoder_last"  # a name of diffcore.analysis.feature_layers(model)
    pooling: str = "mean"  # mean (spatial average) | flatten
    probe_train: int = 100  # labelled digits the probe is fitted on
    probe_test: int = 797  # held-out digits it is scored on
    probe_l2: float = 1e-2
    probe_splits: int = 5  # seeded splits (label draws) split_seed .. split_seed + probe_splits - 1
    split_seed: int = 0
    num_sigmas: int = 12  # log-spaced from sigma_min to sigma_max
    sigma_min: float = 0.01
    sigma_max: float = 10.0
    noise_seed_start: int = 300000  # pool image i gets the noise of seed start + i
    trajectory_sizes: tuple[int, ...] = (16, 1797)  # N of the training-time curves (first width; (): none)
    snapshot_every: int = 250  # steps between the checkpoints of those curves
    generalizes_gl: float = 0.5  # a model generalizes when its GL interval lies above, memorizes when below
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
        base.check_seed_range("split_seed", self.split_seed, self.probe_splits)
        if self.molrg_components * self.molrg_latent_dim > self.molrg_ambient_dim:
            raise base.ConfigError(
                "molrg_latent_dim: molrg_components * molrg_latent_dim must not exceed "
                "molrg_ambient_dim (mutually orthogonal class subspaces)"
            )
        _stack.check_reproducibility_preset(self)

    def sigmas(self) -> list[float]:
        ratio = self.sigma_max / self.sigma_min
        return [self.sigma_min * ratio ** (i / (self.num_sigmas - 1)) for i in range(self.num_sigmas)]


FIELD_CHECKS: dict[str, base.Check] = {
    **_stack.REPRODUCIBILITY_MODELS_CHECKS,
    "layer": base.text,
    "pooling": base.one_of("mean", "flatten"),
    "probe_train": base.positive,
    "probe_test": base.positive,
    "probe_l2": base.number(0),
    "probe_splits": base.integer(3),  # a seeds-t interval of the mean needs three or more
    "split_seed": base.seed,
    "num_sigmas": base.integer(3),  # a shape needs a middle
    "noise_seed_start": base.seed,
    "trajectory_sizes": base.tuple_of(base.integer(2), min_len=0),
    "snapshot_every": base.positive,
    "generalizes_gl": base.number(0, 1),
    "molrg_components": base.integer(2),
    "molrg_ambient_dim": base.positive,
    "molrg_latent_dim": base.positive,
    "molrg_noise_std": base.number(0),
    "molrg_samples": base.integer(10),
    "molrg_seed": base.seed,
}


def _quick() -> RepresentationConfig:
    """The main job's digits UNets (reproducibility quick: widths 8 and 16, N = 16 ... 1797, 1000
    steps), the probe setting chosen on width-32 models (decoder_last, mean-pooled, 100 labels),
    five label draws, the raw-pixel control, training-time curves at N = 16 and N = 1797 (width 8)."""
    return RepresentationConfig()


def _tiny() -> RepresentationConfig:
    """Seconds: the reproducibility study's tiny preset, a coarse grid, small probe and theory."""
    return RepresentationConfig(
        reproducibility_preset="tiny",
        widths=(4,),
        probe_train=60,
        probe_test=120,
        probe_splits=3,
        num_sigmas=5,
        trajectory_sizes=(8,),
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
        trajectory_sizes=(1024, 16384),
        snapshot_every=20000,
        sigma_max=80.0,
        num_sigmas=14,
    )


PRESETS: dict[str, Callable[[], RepresentationConfig]] = {"quick": _quick, "tiny": _tiny, "paper": _paper}
CONFIG_CLASS = RepresentationConfig


# ----------------------------------------------------------------------------- one curve


def probe_split(pool_size: int, config: RepresentationConfig, split: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the probe's labelled split ``[probe_train]`` and held-out split ``[probe_test]`` of
    label draw ``split`` (a permutation of the pool seeded by ``split_seed + split``)."""
    c = config
    if c.probe_train + c.probe_test > pool_size:
        raise base.ConfigError(
            f"probe_train + probe_test: {c.probe_train + c.probe_test} exceeds the {pool_size} labelled images"
        )
    order = torch.randperm(pool_size, generator=torch.Generator().manual_seed(c.split_seed + split))
    return order[: c.probe_train], order[c.probe_train : c.probe_train + c.probe_test]


def probe_curve(
    denoiser: torch.nn.Module | None, pool: torch.Tensor, labels: torch.Tensor, config: RepresentationConfig
) -> list[dict]:
    """Probe accuracy and class SNR per sigma and label draw of ``denoiser``'s features at
    ``config.layer``; ``denoiser=None``: of the raw pixels ``x0 + sigma n`` themselves (the control).

    ``pool`` [P, C, H, W] and ``labels`` [P]: the labelled images, split ``probe_splits`` times by
    :func:`probe_split`; pool image i's noise comes from seed ``noise_seed_start + i`` (the same at
    every sigma and in every split). The SNR is that of the held-out split's features. Rows:
    ``{sigma, split, probe_accuracy, probe_train_accuracy, snr}``, sigma-major."""
    from diffcore import sampler
    from diffcore.analysis.representation import class_snr, extract_features, linear_probe

    c = config
    splits = [probe_split(pool.shape[0], c, r) for r in range(c.probe_splits)]
    base.check_seed_range("noise_seed_start", c.noise_seed_start, pool.shape[0])
    noise = sampler.noise_from_seeds(
        [c.noise_seed_start + i for i in range(pool.shape[0])], tuple(pool.shape[1:]), device="cpu", dtype=torch.float32
    )
    images, y = pool.float().cpu(), labels.cpu()
    rows = []
    for sigma in c.sigmas():
        if denoiser is None:
            feats = (images + float(sigma) * noise).reshape(images.shape[0], -1).double()
        else:
            feats = extract_features(denoiser, images, noise, sigma, [c.layer], pooling=c.pooling)[c.layer]
        for r, (train_idx, test_idx) in enumerate(splits):
            probe = linear_probe(feats[train_idx], y[train_idx], feats[test_idx], y[test_idx], l2=c.probe_l2)
            rows.append(
                {
                    "sigma": sigma,
                    "split": r,
                    "probe_accuracy": probe.accuracy,
                    "probe_train_accuracy": probe.train_accuracy,
                    "snr": class_snr(feats[test_idx], y[test_idx]),
                }
            )
    return rows


def summarize_curve(sigmas: list[float], rows: list[dict], pixel_rows: list[dict] | None = None) -> dict:
    """Per-sigma 95% intervals across label draws (``seeds-t``) of probe accuracy and class SNR, the
    shape of the accuracy curve decided on them (:func:`interval_shape`), and, given the raw-pixel
    rows of the same splits, the paired advantage of the features over the pixels at the peak sigma
    (``beats_pixels``: its interval lies above 0)."""
    from diffcore.analysis.representation import interval_shape
    from diffcore.metrics import intervals

    def per_split(key: str, source: list[dict], sigma: float) -> list[float]:
        return [r[key] for r in sorted((r for r in source if r["sigma"] == sigma), key=lambda r: r["split"])]

    accuracy = [intervals.seed_interval(per_split("probe_accuracy", rows, s)) for s in sigmas]
    snr = [intervals.seed_interval(per_split("snr", rows, s)) for s in sigmas]
    shape = interval_shape(sigmas, accuracy)
    out = {
        **shape,
        "accuracy": [a.as_dict() for a in accuracy],
        "snr": [v.as_dict() for v in snr],
    }
    if pixel_rows is not None:
        peak_sigma = shape["peak_sigma"]
        gap = [
            a - b
            for a, b in zip(
                per_split("probe_accuracy", rows, peak_sigma), per_split("probe_accuracy", pixel_rows, peak_sigma)
            )
        ]
        advantage = intervals.seed_interval(gap)
        out["over_pixels_at_peak"] = advantage.as_dict()
        out["beats_pixels"] = bool(advantage.low > 0)
    return out


# ----------------------------------------------------------------------------- the study


_Model = _stack.ModelOfReproducibilityRun  # a finished model unit of the reproducibility run


class _Study(_stack.ReproducibilityModelsStudy):
    """The representation study of the reproducibility run's models (models: the shared base)."""

    # models --------------------------------------------------------------------
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
            raise base.ConfigError(f"layer: these models have no layer {c.layer!r}; they have: {', '.join(layers)}")

    def _untrained_model(self):
        """The first model of the reproducibility run made here, built but not trained (its layers)."""
        from diffcore.train.registry import build_model

        c = self.c
        rc = dataclasses.asdict(experiment(REPRODUCIBILITY).PRESETS[c.reproducibility_preset]())
        width = (c.widths or tuple(rc["widths"]))[0]
        return build_model(_stack.model_spec(_stack.model_unit_spec(rc, width, 1, 0)))

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
            "probe_splits": c.probe_splits,
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
    def trajectory_unit(self, repro: dict, n: int):
        """One model (the first width, N = ``n``, the first seed) trained with the reproducibility
        run's recipe, keeping its checkpoints every ``snapshot_every`` steps."""
        from diffcore import train

        c = self.c
        rc = repro["config"]
        width = (c.widths or tuple(rc["widths"]))[0]
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
    def gl_interval(self, gl: float | None, repro: dict):
        """Wilson interval of a GL score measured on the reproducibility run's ``num_samples``."""
        from diffcore.metrics import intervals

        if gl is None:
            return None
        num = int(repro["config"]["num_samples"])
        return intervals.wilson_interval(round(gl * num), num)

    def regime(self, gl_interval) -> str:
        """``generalizing`` (GL interval above ``generalizes_gl``), ``memorizing`` (below) or ``between``."""
        if gl_interval is None:
            return "unknown"
        if gl_interval.low > self.c.generalizes_gl:
            return "generalizing"
        if gl_interval.high < self.c.generalizes_gl:
            return "memorizing"
        return "between"

    def run(self) -> dict:
        c = self.c
        self.check_inputs()
        self.ws.bind_config(c)
        repro, root = self.reproducibility_run()
        pool = self.hooks.load_dataset(repro["config"]["dataset"], repro["config"]["data_root"])
        labels = _labels(repro["config"]["dataset"], repro["config"]["data_root"], pool.shape[0])
        sigmas = c.sigmas()
        start = time.perf_counter()
        pixel_rows = self.curve_unit("pixels", {"raw_pixels": True}, lambda: None, pool, labels)
        pixels = summarize_curve(sigmas, pixel_rows)
        curves = [{"model": "pixels", "n": None, "step": None, **r} for r in pixel_rows]
        models = []
        for m in self.models(repro, root):
            spec = load_json(m.path / "MANIFEST.json", what="unit manifest", follow=False)["spec"]
            rows = self.curve_unit(m.label, spec, lambda p=m.path: self._load(p), pool, labels)
            gl = self.gl_interval(m.gl, repro)
            models.append(
                {
                    "model": m.label,
                    "width": m.width,
                    "n": m.n,
                    "seed": m.seed,
                    "step": repro["config"]["train_steps"],
                    "gl": None if gl is None else gl.as_dict(),
                    "memorized_ratio": m.memorized_ratio,
                    "regime": self.regime(gl),
                    **summarize_curve(sigmas, rows, pixel_rows),
                }
            )
            curves.extend({"model": m.label, "n": m.n, "step": repro["config"]["train_steps"], **r} for r in rows)
        self.seconds["model_curves"] = time.perf_counter() - start
        trajectory = []
        for n in c.trajectory_sizes:
            trajectory.extend(self.trajectory(repro, n, pool, labels, curves, pixel_rows))
        start = time.perf_counter()
        molrg, molrg_shape = self.theory()
        self.seconds["molrg"] = time.perf_counter() - start
        results = self.results(
            NAME,
            root,
            {
                "threshold": repro["threshold"],
                "similarity": repro["similarity"],
                "claims": self.claims(models, trajectory, pixels),
                "pixels": pixels,
                "models": models,
                "trajectory": trajectory,
                "curves": curves,
                "molrg": molrg,
                "molrg_shape": molrg_shape,
            },
        )
        self.write(results)
        return results

    def claims(self, models: list[dict], trajectory: list[dict], pixels: dict) -> dict:
        """The paper's signature decided on the intervals: per width (final models) and per
        trajectory N (checkpoints), every generalizing curve unimodal and every memorizing one
        decreasing, with at least one model of each regime in the group (a group without both
        regimes cannot show the contrast: ``holds`` false, ``testable`` false); ``signature``: every
        testable group holds (and at least one is testable). The raw-pixel control's shape beside."""
        from diffcore.metrics import intervals

        def group_claim(rows: list[dict]) -> dict:
            gen = [r for r in rows if r["regime"] == "generalizing"]
            mem = [r for r in rows if r["regime"] == "memorizing"]
            gen_ok = [r["model"] for r in gen if r["shape"] == "unimodal"]
            mem_ok = [r["model"] for r in mem if r["shape"] == "decreasing"]
            testable = bool(gen) and bool(mem)
            return intervals.claim(
                testable and len(gen_ok) == len(gen) and len(mem_ok) == len(mem),
                testable=testable,
                generalizing_unimodal=f"{len(gen_ok)}/{len(gen)}",
                memorizing_decreasing=f"{len(mem_ok)}/{len(mem)}",
                shapes={r["model"]: f"{r['regime']}: {r['shape']}" for r in rows},
            )

        out: dict = {}
        for width in sorted({m["width"] for m in models}):
            out[f"signature_w{width}"] = group_claim([m for m in models if m["width"] == width])
        for n in sorted({t["n"] for t in trajectory}):
            out[f"trajectory_n{n}"] = group_claim([t for t in trajectory if t["n"] == n])
        # Among generalizing models only: is the curve unimodal (without the memorizing contrast)?
        gen = [m for m in models if m["regime"] == "generalizing"]
        out["generalizing_unimodal"] = intervals.claim(
            bool(gen) and all(m["shape"] == "unimodal" for m in gen),
            count=f"{sum(m['shape'] == 'unimodal' for m in gen)}/{len(gen)}",
        )
        out["features_beat_pixels_at_peak"] = intervals.claim(
            bool(models) and all(m["beats_pixels"] for m in models),
            count=f"{sum(m['beats_pixels'] for m in models)}/{len(models)}",
        )
        out["pixels_not_unimodal"] = intervals.claim(
            pixels["shape"] != "unimodal", shape=pixels["shape"], peak=pixels["peak"], first=pixels["first"]
        )
        tested = [v for k, v in out.items() if k.startswith(("signature_w", "trajectory_n")) and v["testable"]]
        out["signature"] = intervals.claim(
            bool(tested) and all(v["holds"] for v in tested), groups_testable=len(tested)
        )
        return out

    def trajectory(self, repro: dict, n: int, pool, labels, curves: list, pixel_rows: list[dict]) -> list[dict]:
        start = time.perf_counter()
        unit, spec = self.trajectory_unit(repro, n)
        self.seconds[f"trajectory_n{n}_train"] = time.perf_counter() - start
        start = time.perf_counter()
        sigmas = self.c.sigmas()
        out = []
        for step in unit.meta["steps"]:
            name = f"{unit.path.name}-step{step}"
            rows = self.curve_unit(
                name, {**spec, "step": step}, lambda s=step: self._load(unit.path / f"step{s}"), pool, labels
            )
            scores = self.snapshot_metrics(unit, spec, step, pool, repro)
            gl = self.gl_interval(scores["gl"], repro)
            out.append(
                {
                    "model": name,
                    "n": spec["n"],
                    "width": spec["width"],
                    "step": step,
                    "gl": gl.as_dict(),
                    "memorized_ratio": scores["memorized_ratio"],
                    "regime": self.regime(gl),
                    **summarize_curve(sigmas, rows, pixel_rows),
                }
            )
            curves.extend({"model": name, "n": spec["n"], "step": step, **r} for r in rows)
        self.seconds[f"trajectory_n{n}_curves"] = time.perf_counter() - start
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
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(root / "curves.csv", results["curves"])
        base.atomic_write_csv(root / "summary.csv", summary_rows(results))
        scalar = (
            "model",
            "width",
            "n",
            "seed",
            "step",
            "memorized_ratio",
            "regime",
            "shape",
            "rises",
            "falls",
            "peak_sigma",
            "beats_pixels",
        )
        base.atomic_write_csv(
            root / "models.csv",
            [
                {
                    **{k: m.get(k) for k in scalar},
                    **({} if m["gl"] is None else intervals_flat("gl", m["gl"])),
                    **intervals_flat("peak", m["peak"]),
                    **intervals_flat("first", m["first"]),
                    **intervals_flat("over_pixels_at_peak", m["over_pixels_at_peak"]),
                }
                for m in results["models"] + results["trajectory"]
            ],
        )
        base.atomic_write_csv(root / "molrg.csv", results["molrg"])
        plot(results, root / "representation.png")


def intervals_flat(name: str, interval: dict) -> dict:
    """An interval dict as flat CSV columns ``name, name_low, name_high``."""
    return {name: interval["value"], f"{name}_low": interval["low"], f"{name}_high": interval["high"]}


def summary_rows(results: dict) -> list[dict]:
    """One row per curve (the pixels, every model and checkpoint) and sigma, with the intervals."""
    sigmas = (
        results["config"]
        and RepresentationConfig(
            **{k: v for k, v in results["config"].items() if k in ("num_sigmas", "sigma_min", "sigma_max")}
        ).sigmas()
    )
    out = []
    for m in [
        {"model": "pixels", "n": None, "step": None, **results["pixels"]},
        *results["models"],
        *results["trajectory"],
    ]:
        for sigma, acc, snr in zip(sigmas, m["accuracy"], m["snr"]):
            out.append(
                {
                    "model": m["model"],
                    "n": m["n"],
                    "step": m["step"],
                    "sigma": sigma,
                    **intervals_flat("probe_accuracy", acc),
                    **intervals_flat("snr", snr),
                }
            )
    return out


def _labels(dataset: str, data_root: str, expected: int) -> torch.Tensor:
    """Integer class labels of the dataset's pool, in the pool's order."""
    from diffcore import data

    labels = data.load_dataset(_stack.data_spec(dataset, data_root)).labels
    if labels.shape[0] != expected:
        raise ValueError(f"dataset: {labels.shape[0]} labels for {expected} images")
    return labels.cpu()


# ----------------------------------------------------------------------------- figure


def _band(ax, sigmas, curve: list[dict], color, label, style="-o"):
    ax.plot(sigmas, [c["value"] for c in curve], style, ms=3, color=color, label=label)
    ax.fill_between(sigmas, [c["low"] for c in curve], [c["high"] for c in curve], color=color, alpha=0.2, lw=0)


def figure_title(results: dict) -> str:
    """The figure's title, built from the claims (never a fixed conclusion)."""
    claims = results["claims"]
    parts = []
    for key, value in claims.items():
        if key.startswith(("signature_w", "trajectory_n")):
            where = key.replace("signature_w", "width ").replace("trajectory_n", "training time N=")
            verdict = "holds" if value["holds"] else ("does not hold" if value["testable"] else "not testable")
            parts.append(
                f"{where}: gen. unimodal {value['generalizing_unimodal']}, mem. decreasing "
                f"{value['memorizing_decreasing']} ({verdict})"
            )
    overall = "holds" if claims["signature"]["holds"] else "does not hold"
    return (
        f"Probe-curve shapes decided on 95% intervals ({results['config']['probe_splits']} label draws); "
        f"the paper's signature {overall} here\n"
        + "\n".join("; ".join(parts[i : i + 2]) for i in range(0, len(parts), 2))
    )


def plot(results: dict, path) -> Path:
    """Top row: probe accuracy vs sigma per width (bands: 95% intervals across label draws; black
    dashed: the raw-pixel control), class SNR per width. Bottom row: probe accuracy over training
    time per trajectory N, and the MoLRG theory curve (SNR and class confidence)."""
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    cfg = results["config"]
    sigmas = RepresentationConfig(
        **{k: v for k, v in cfg.items() if k in ("num_sigmas", "sigma_min", "sigma_max")}
    ).sigmas()
    widths = sorted({m["width"] for m in results["models"]})
    traj_sizes = sorted({t["n"] for t in results["trajectory"]})
    cols = max(2 * len(widths), len(traj_sizes) + 1)
    fig, axes = plt.subplots(2, cols, figsize=(4.6 * cols, 8.2), squeeze=False)
    for w_index, width in enumerate(widths):
        final = [m for m in results["models"] if m["width"] == width]
        colors = plt.cm.viridis([i / max(1, len(final) - 1) for i in range(len(final))])
        acc_ax, snr_ax = axes[0][2 * w_index], axes[0][2 * w_index + 1]
        for m, color in zip(final, colors):
            gl = "n/a" if m["gl"] is None else f"{m['gl']['value']:.2f}"
            label = f"N={m['n']} (GL {gl}, {m['shape']})"
            _band(acc_ax, sigmas, m["accuracy"], color, label)
            _band(snr_ax, sigmas, m["snr"], color, label)
        _band(acc_ax, sigmas, results["pixels"]["accuracy"], "k", f"raw pixels ({results['pixels']['shape']})", "--")
        _band(snr_ax, sigmas, results["pixels"]["snr"], "k", "raw pixels", "--")
        acc_ax.set_title(f"width {width}: linear probe on {cfg['layer']} ({cfg['probe_train']} labels)", fontsize=9)
        acc_ax.set_ylabel("held-out probe accuracy")
        snr_ax.set_title(f"width {width}: class SNR of the held-out features", fontsize=9)
        snr_ax.set_ylabel("between / within-class energy")
        snr_ax.set_yscale("log")
    for t_index, n in enumerate(traj_sizes):
        ax = axes[1][t_index]
        snaps = [t for t in results["trajectory"] if t["n"] == n]
        colors = plt.cm.plasma([i / max(1, len(snaps) - 1) for i in range(len(snaps))])
        for snap, color in zip(snaps, colors):
            _band(
                ax,
                sigmas,
                snap["accuracy"],
                color,
                f"step {snap['step']} (GL {snap['gl']['value']:.2f}, {snap['shape']})",
            )
        _band(ax, sigmas, results["pixels"]["accuracy"], "k", "raw pixels", "--")
        ax.set_title(f"training time, width {snaps[0]['width']}, N={n}", fontsize=9)
        ax.set_ylabel("held-out probe accuracy")
    for row in axes:
        for ax in row:
            if ax.lines:
                ax.set_xscale("log")
                ax.set_xlabel("sigma")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
    theory = results["molrg"]
    ax = axes[1][len(traj_sizes)]
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
    ax.set_title(
        f"theory: optimal noisy-MoLRG denoiser ({results['molrg_shape']['shape']})\nK={cfg['molrg_components']}, "
        f"n={cfg['molrg_ambient_dim']}, d={cfg['molrg_latent_dim']}, delta={cfg['molrg_noise_std']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    for row in axes:
        for ax in row:
            if not ax.lines and not ax.collections:
                ax.axis("off")
    fig.suptitle(figure_title(results), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return base.atomic_save_figure(fig, path)


STUDY = base.Study(NAME, RepresentationConfig, one_process=True, presets=PRESETS, make=base.standard_make(_Study))
run, run_preset = STUDY.run, STUDY.run_preset
