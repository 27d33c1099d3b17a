"""Closed-form local denoisers against trained networks, from memorizing to generalizing (docs/papers.md
section 11).

For UNets trained on nested subsets of N images (the reproducibility study's models: reused from its
output folder with ``models_from``, or trained here by running that study, with the preset's recipe,
into ``OUT/reproducibility``), and for each model:

1. **Calibration** (seeds ``calibration_seed_start ...``, disjoint from the evaluation seeds): the
   network's own reverse trajectory (every denoiser call of the deterministic sampler: its state,
   sigma and output) and, per noise level of the schedule and per machine with a patch size (LS, ELS,
   PSPC), the P of ``patch_sizes`` whose output at those states agrees best with the network's
   (mean per-sample R^2).
2. **Evaluation** (seeds ``sample_seed_start ...``): the network's trajectory again; every machine
   (the empirical denoiser, the Gaussian denoiser of the N images, LS, ELS and PSPC with their
   calibrated P(sigma), the data-derived Wiener-mask machine) evaluated at the network's states, and
   sampled from the same noise with the same sampler.

Measures, named apart (``diffcore.analysis.locality``):

- ``pearson``: Pearson correlation of each seed's final sample with the network's (Kamb & Ganguli's
  measure), reported as the median over seeds;
- ``r2``: per-sample ``1 - SSE / (D var)`` of the machine's denoiser output against the network's at
  the network's states (Lukoianov et al.'s measure), mean over the trajectory's calls, then over seeds;
- ``mse``: mean squared difference of the same outputs (Niedoba et al.'s measure), mean over calls,
  pixels and seeds.

Intervals: percentile bootstrap over the evaluation seeds. Claims (``intervals.claim``, paired
bootstrap of the differences over the same seeds): at the largest N of each width each local machine
agrees with the network better than the empirical denoiser; at the smallest N the empirical denoiser
agrees better than each local machine.

Outputs: ``results.json``, ``agreement.csv`` (model x machine), ``schedules.csv`` (the calibrated
P(sigma)), ``samples.png``, ``agreement.png``, ``schedules.png``. One resumable unit per model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcore._files import load_json
from diffcore.experiments import _stack, base
from diffcore.metrics import intervals

log = logging.getLogger(__name__)

NAME = "locality"
# The study whose models this one measures, run or read through the registry (no study imports another).
REPRODUCIBILITY = "reproducibility"

CALIBRATED = ("ls", "els", "pspc")  # the machines with a patch size calibrated per noise level
MACHINES = ("empirical", "gaussian", "ls", "els", "pspc", "mask")
LOCAL = ("ls", "els", "pspc", "mask")  # the local machines of the claims
MEASURES = ("pearson", "r2", "mse")
TRAJECTORY_BATCH = 64  # seeds per recorded network trajectory (the sampler's default batch is larger)
MACHINE_LABELS = {
    "empirical": "empirical",
    "gaussian": "Gaussian",
    "ls": "LS",
    "els": "ELS",
    "pspc": "PSPC",
    "mask": "Wiener mask",
}


@dataclass(frozen=True)
class LocalityConfig:
    models_from: str = ""  # a reproducibility study's --out folder; "" = run it into OUT/reproducibility
    reproducibility_preset: str = "quick"  # the preset of that study when it runs here
    widths: tuple[int, ...] = ()  # () = every width of the preset / of models_from
    sizes: tuple[int, ...] = ()  # () = every N
    patch_sizes: tuple[int, ...] = (3, 5, 7)  # the P candidates of the calibration (odd)
    padding: str = "zeros"  # of ELS and LS (zeros: boundary-broken dictionaries, as the UNet pads)
    calibration_seed_start: int = 200000  # calibration seeds (disjoint from the evaluation seeds)
    calibration_seeds: int = 8
    sample_seed_start: int = 100000  # evaluation seeds start .. start + num_samples - 1
    num_samples: int = 32
    wiener_threshold: float = 0.02  # the public code's mask_threshold (docs/local_denoise.md)
    wiener_rule: str = "public"  # wiener_masks' rule: public (the paper's code) | row
    grid_samples: int = 6  # samples shown per model in samples.png
    torch_threads: int = 0  # intra-op CPU threads of the machines (the op's result does not depend on them)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field out of its range."""
        base.check_fields(self, FIELD_CHECKS)
        if any(p % 2 == 0 for p in self.patch_sizes):
            raise base.ConfigError(f"patch_sizes: expected odd patch sizes, got {self.patch_sizes}")
        base.check_seed_range("calibration_seed_start", self.calibration_seed_start, self.calibration_seeds)
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        cal = range(self.calibration_seed_start, self.calibration_seed_start + self.calibration_seeds)
        ev = range(self.sample_seed_start, self.sample_seed_start + self.num_samples)
        if set(cal) & set(ev):
            raise base.ConfigError(
                "calibration_seed_start: the calibration seeds overlap the evaluation seeds "
                f"({cal.start}..{cal.stop - 1} and {ev.start}..{ev.stop - 1}); they must be disjoint"
            )
        if self.grid_samples > self.num_samples:
            raise base.ConfigError(
                f"grid_samples: expected at most num_samples = {self.num_samples}, got {self.grid_samples}"
            )
        _stack.check_reproducibility_preset(self)

    def seeds(self) -> list[int]:
        return list(range(self.sample_seed_start, self.sample_seed_start + self.num_samples))

    def calibration(self) -> list[int]:
        return list(range(self.calibration_seed_start, self.calibration_seed_start + self.calibration_seeds))


FIELD_CHECKS: dict[str, base.Check] = {
    **_stack.REPRODUCIBILITY_MODELS_CHECKS,
    "patch_sizes": base.tuple_of(base.integer(1, 31)),
    "padding": base.one_of("zeros", "circular"),
    "calibration_seed_start": base.seed,
    "calibration_seeds": base.positive,
    "num_samples": base.integer(3),  # a bootstrap interval needs a few seeds
    "wiener_threshold": base.number(0, 1, lo_open=True),
    "wiener_rule": base.one_of("public", "row"),
}


def _quick() -> LocalityConfig:
    """The reproducibility study's quick models (widths 8 and 16, N = 16 .. 1797, one seed): set
    models_from to the main job's folder, or they are trained here with that preset's recipe.
    8 calibration seeds, 32 evaluation seeds, P in {3, 5, 7}."""
    return LocalityConfig()


def _tiny() -> LocalityConfig:
    """Seconds: the reproducibility study's tiny recipe (width 4, 20 training steps, 8 Heun steps) at
    N = 8 and 64, 2 calibration seeds, 4 evaluation seeds, P in {3, 5}."""
    return LocalityConfig(
        reproducibility_preset="tiny",
        widths=(4,),
        sizes=(8, 64),
        patch_sizes=(3, 5),
        calibration_seeds=2,
        num_samples=4,
        grid_samples=3,
    )


def _paper() -> LocalityConfig:
    """CIFAR-10 models of the reproducibility study's paper preset (set models_from to that run, or
    data_root through that preset); P in {3, 5, 7, 9, 11} (Kamb & Ganguli calibrate up to the image
    size at 32x32), 16 calibration and 64 evaluation seeds. Validation only: it has not run here
    (hours of the ELS machine on 5000+ images on a CPU; a GPU backend of the op is not yet in auto)."""
    return LocalityConfig(
        reproducibility_preset="paper",
        patch_sizes=(3, 5, 7, 9, 11),
        calibration_seeds=16,
        num_samples=64,
        grid_samples=8,
    )


PRESETS: dict[str, Callable[[], LocalityConfig]] = {"quick": _quick, "tiny": _tiny, "paper": _paper}
CONFIG_CLASS = LocalityConfig


# ----------------------------------------------------------------------------- one model


_Model = _stack.ModelOfReproducibilityRun  # a finished model unit of the reproducibility run


def _trajectory(sample: Callable, network, seeds: list[int], shape, rc: dict, device) -> tuple:
    """The network's reverse trajectory from ``seeds``: (final samples [S, ...], states [M, ...],
    sigmas [M], outputs [M, ...], seed index of each row [M]); rows are every call of every seed."""
    from diffcore.analysis.locality import RecordingDenoiser

    finals, index = [], []
    recorder = RecordingDenoiser(network)
    for start in range(0, len(seeds), TRAJECTORY_BATCH):  # one batch per sampler call: rows map to seeds
        chunk = seeds[start : start + TRAJECTORY_BATCH]
        calls = len(recorder.states)
        finals.append(
            sample(
                recorder,
                chunk,
                shape,
                steps=rc["sampler_steps"],
                solver=rc["solver"],
                sigma_min=rc["sigma_min"],
                sigma_max=rc["sigma_max"],
                device=device,
                progress=False,
            )
        )
        for state in recorder.states[calls:]:
            if state.shape[0] != len(chunk):
                raise ValueError(f"sample: expected one call per step over all {len(chunk)} seeds of a batch")
            index.append(torch.arange(start, start + len(chunk)))
    states, sigmas, outputs = (torch.cat(v) for v in (recorder.states, recorder.sigmas, recorder.outputs))
    return torch.cat(finals).float().cpu(), states, sigmas, outputs, torch.cat(index)


def _per_seed_mean(values: torch.Tensor, seed_index: torch.Tensor, seeds: int) -> list[float]:
    """Mean of ``values`` [M] per seed (``seed_index`` [M]) -> [seeds]."""
    sums = torch.zeros(seeds, dtype=torch.float64).index_add_(0, seed_index, values.to(torch.float64))
    counts = torch.bincount(seed_index, minlength=seeds).to(torch.float64)
    return (sums / counts).tolist()


def measure_model(
    network, train_images: torch.Tensor, config: LocalityConfig, rc: dict, sample: Callable, device
) -> tuple[dict, dict]:
    """Calibrate and evaluate every machine against one network. Returns ``(meta, tensors)``:
    ``meta`` = levels, calibrated P per machine, the calibration R^2 tables, per machine and seed the
    pearson / r2 / mse values, the nearest training image's index and Pearson per seed;
    ``tensors`` = final samples [S, ...] of the network and of each machine (for the figure)."""
    from diffcore import sampler
    from diffcore.analysis.locality import (
        LocalMachine,
        MaskMachine,
        calibrate_patch_sizes,
        pearson_per_sample,
        per_sample_r2,
    )
    from diffcore.denoisers import EmpiricalDenoiser, GaussianDenoiser
    from diffcore.ops import local_denoise, wiener_masks

    c = config
    shape = tuple(train_images.shape[1:])
    train = train_images.float().cpu().contiguous()

    # 1. calibration on the network's own trajectory (calibration seeds only)
    _, cal_states, cal_sigmas, cal_outputs, _ = _trajectory(sample, network, c.calibration(), shape, rc, device)
    levels = sorted({float(s) for s in cal_sigmas.tolist()}, reverse=True)
    chosen, tables = {}, {}
    for kind in CALIBRATED:
        sizes = [p for p in c.patch_sizes if kind != "pspc" or p <= min(shape[1:])]

        def machine(x, sigma, size, kind=kind):
            return local_denoise(x, train, sigma, kind=kind, patch_size=size, padding=c.padding)

        chosen[kind], table = calibrate_patch_sizes(machine, cal_states, cal_sigmas, cal_outputs, levels, sizes)
        tables[kind] = {"patch_sizes": sizes, "mean_r2": table}

    gaussian = GaussianDenoiser.fit(train)
    masks = [wiener_masks(train, s, c.wiener_threshold, rule=c.wiener_rule) for s in levels]
    machines: dict[str, Callable] = {
        "empirical": EmpiricalDenoiser(train),
        # float64 inside: its matrix products then round the same whatever the thread count
        "gaussian": lambda x, sigma: gaussian(x.double(), sigma).to(x.dtype),
        **{kind: LocalMachine(train, kind, levels, chosen[kind], c.padding) for kind in CALIBRATED},
        "mask": MaskMachine(train, levels, masks),
    }

    # 2. evaluation: the network's trajectory from the evaluation seeds, every machine at its states
    seeds = c.seeds()
    net_final, states, sigmas, outputs, seed_index = _trajectory(sample, network, seeds, shape, rc, device)
    per_seed: dict[str, dict[str, list[float]]] = {}
    finals = {"network": net_final}
    for name, machine in machines.items():
        with torch.no_grad():
            predicted = machine(states, sigmas).float()
            r2 = per_sample_r2(predicted, outputs)
            mse = (predicted - outputs).to(torch.float64).square().flatten(1).mean(dim=1)
            final = sampler.sample(
                machine,
                seeds=seeds,
                shape=shape,
                steps=rc["sampler_steps"],
                solver=rc["solver"],
                sigma_min=rc["sigma_min"],
                sigma_max=rc["sigma_max"],
            ).float()
        finals[name] = final
        per_seed[name] = {
            "pearson": pearson_per_sample(final, net_final).tolist(),
            "r2": _per_seed_mean(r2, seed_index, len(seeds)),
            "mse": _per_seed_mean(mse, seed_index, len(seeds)),
        }
    # the copy control: each network sample against its nearest training image (l2)
    distances = torch.cdist(net_final.flatten(1).double(), train.flatten(1).double())
    nearest = distances.argmin(dim=1)
    per_seed["nearest_train"] = {"pearson": pearson_per_sample(train[nearest], net_final).tolist()}
    finals["nearest_train"] = train[nearest]
    meta = {
        "levels": levels,
        "patch_schedule": chosen,
        "calibration": tables,
        "mask_sizes": [float(m.sum(dim=1).mean()) for m in masks],
        "per_seed": per_seed,
        "nearest_index": nearest.tolist(),
    }
    return meta, finals


# ----------------------------------------------------------------------------- summaries


def _median(a: np.ndarray) -> float:
    return float(np.median(a))


def _mean(a: np.ndarray) -> float:
    return float(np.mean(a))


STATISTIC = {"pearson": _median, "r2": _mean, "mse": _mean}  # median over seeds: Kamb & Ganguli's
BETTER = {"pearson": 1.0, "r2": 1.0, "mse": -1.0}  # +1: larger agrees better


def summarize(per_seed: dict) -> dict:
    """Per machine and measure the statistic over seeds with its bootstrap interval (as dicts)."""
    out: dict = {}
    for name, measures in per_seed.items():
        out[name] = {m: intervals.bootstrap_interval(v, STATISTIC[m]).as_dict() for m, v in measures.items()}
    return out


def paired_difference(per_seed: dict, better: str, worse: str, measure: str) -> intervals.Interval:
    """Bootstrap interval (resampling seeds, paired) of ``stat(better) - stat(worse)``, signed so that
    a positive value means ``better`` agrees with the network more (MSE: smaller)."""
    rows = np.stack([per_seed[better][measure], per_seed[worse][measure]], axis=1)
    stat, sign = STATISTIC[measure], BETTER[measure]
    return intervals.bootstrap_interval(rows, lambda a: sign * (stat(a[:, 0]) - stat(a[:, 1])))


def claims(models: list[dict]) -> dict:
    """Per width, at its largest N ("generalizing") each local machine beats the empirical denoiser, and
    at its smallest N ("memorizing") the empirical denoiser beats each local machine; decided per measure
    on paired bootstrap intervals of the difference (holds when the interval's low end is above 0)."""
    out: dict = {}
    for width in sorted({m["width"] for m in models}):
        rows = sorted((m for m in models if m["width"] == width), key=lambda m: m["n"])
        if len(rows) < 2:
            continue
        for regime, model, local_better in (("generalizing", rows[-1], True), ("memorizing", rows[0], False)):
            for kind in LOCAL:
                for measure in MEASURES:
                    better, worse = (kind, "empirical") if local_better else ("empirical", kind)
                    diff = paired_difference(model["per_seed"], better, worse, measure)
                    key = f"w{width}-{regime}-{kind}-{measure}"
                    out[key] = intervals.claim(
                        diff.low > 0,
                        statement=(
                            f"width {width}, N = {model['n']}: {MACHINE_LABELS[better]} agrees with the network "
                            f"better than {MACHINE_LABELS[worse]} ({measure})"
                        ),
                        difference=diff,
                        n=model["n"],
                        width=width,
                        gl=model["gl"],
                        measure=measure,
                    )
    return out


# ----------------------------------------------------------------------------- the study


class _Study(_stack.ReproducibilityModelsStudy):
    """The locality study of the reproducibility run's models (models: the shared base)."""

    def measure_spec(self, model_spec: dict, rc: dict) -> dict:
        c = self.c
        return {
            "model": model_spec,
            "sampler": {k: rc[k] for k in ("sampler_steps", "solver", "sigma_min", "sigma_max")},
            "patch_sizes": list(c.patch_sizes),
            "padding": c.padding,
            "calibration_seeds": c.calibration(),
            "seeds": c.seeds(),
            "wiener_threshold": c.wiener_threshold,
            "wiener_rule": c.wiener_rule,
        }

    def model_unit(self, m: _Model, pool: torch.Tensor, rc: dict) -> tuple[dict, dict]:
        spec = load_json(m.path / "MANIFEST.json", what="unit manifest", follow=False)["spec"]

        def produce(tmp: Path, work: Path) -> dict:
            network = self.hooks.load(m.path, device=self.device)
            train_images, _ = self.hooks.subset(pool, m.n, rc["subset_seed"])
            meta, finals = measure_model(network, train_images, self.c, rc, self._sample, self.device)
            torch.save({k: v[: self.c.grid_samples].clone() for k, v in finals.items()}, tmp / "samples.pt")
            return meta

        unit = self.ws.run_unit("machines", m.label, self.measure_spec(spec, rc), produce)
        shown = torch.load(unit.file("samples.pt"), map_location="cpu", weights_only=True)
        return unit.meta, shown

    def _sample(self, denoiser, seeds, shape, **kwargs):
        return self.hooks.sample(denoiser, seeds, shape, **kwargs)

    def run(self) -> dict:
        c = self.c
        if c.models_from:  # a folder that is no reproducibility run is refused before this one is bound
            repro, root = self.reproducibility_run()
            self.ws.bind_config(c)
        else:
            self.ws.bind_config(c)
            repro, root = self.reproducibility_run()
        rc = repro["config"]
        pool = self.hooks.load_dataset(rc["dataset"], rc["data_root"])
        start = time.perf_counter()
        models, shown = [], {}
        for m in self.models(repro, root):
            meta, samples = self.model_unit(m, pool, rc)
            shown[m.label] = samples
            models.append(
                {
                    "model": m.label,
                    "width": m.width,
                    "n": m.n,
                    "seed": m.seed,
                    "gl": m.gl,
                    "memorized_ratio": m.memorized_ratio,
                    "levels": meta["levels"],
                    "patch_schedule": meta["patch_schedule"],
                    "calibration": meta["calibration"],
                    "mask_sizes": meta["mask_sizes"],
                    "agreement": summarize(meta["per_seed"]),
                    "per_seed": meta["per_seed"],
                }
            )
        self.seconds["machines"] = time.perf_counter() - start
        results = self.results(
            NAME,
            root,
            {
                "sampler": {k: rc[k] for k in ("sampler_steps", "solver", "sigma_min", "sigma_max")},
                "calibration_seeds": c.calibration(),
                "evaluation_seeds": c.seeds(),
                "measures": {
                    "pearson": "median over seeds of the Pearson correlation of final samples (Kamb & Ganguli)",
                    "r2": "mean over seeds of the per-sample R^2 = 1 - SSE/(D var) of denoiser outputs at the "
                    "network's trajectory states, averaged over the trajectory's calls (Lukoianov et al.)",
                    "mse": "mean squared difference of denoiser outputs at the network's states",
                },
                "models": models,
                "claims": claims(models),
            },
        )
        self.write(results, shown)
        return results

    def write(self, results: dict, shown: dict) -> None:
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(root / "agreement.csv", agreement_rows(results))
        base.atomic_write_csv(root / "schedules.csv", schedule_rows(results))
        plot_agreement(results, root / "agreement.png")
        plot_schedules(results, root / "schedules.png")
        plot_samples(results, shown, root / "samples.png")


def agreement_rows(results: dict) -> list[dict]:
    rows = []
    for m in results["models"]:
        for name, measures in m["agreement"].items():
            row = {"model": m["model"], "width": m["width"], "n": m["n"], "gl": m["gl"], "machine": name}
            for measure, iv in measures.items():
                row.update(intervals.flat(measure, intervals.Interval(**iv)))
            rows.append(row)
    return rows


def schedule_rows(results: dict) -> list[dict]:
    rows = []
    for m in results["models"]:
        for i, sigma in enumerate(m["levels"]):
            row = {"model": m["model"], "width": m["width"], "n": m["n"], "sigma": sigma}
            row.update({f"P_{kind}": m["patch_schedule"][kind][i] for kind in CALIBRATED})
            row["mask_pixels"] = m["mask_sizes"][i]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- figures


def plot_agreement(results: dict, path) -> Path:
    """Three panels against N: median Pearson, mean R^2, mean MSE per machine (a line per machine,
    a line style per width), with the bootstrap intervals as error bars."""
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    widths = sorted({m["width"] for m in results["models"]})
    styles = ["-", "--", ":", "-."]
    names = [*MACHINES, "nearest_train"]
    for wi, width in enumerate(widths):
        rows = sorted((m for m in results["models"] if m["width"] == width), key=lambda m: m["n"])
        for ci, name in enumerate(names):
            for ax, measure in zip(axes, MEASURES):
                pts = [(m["n"], m["agreement"][name].get(measure)) for m in rows if measure in m["agreement"][name]]
                if not pts:
                    continue
                ns = [p[0] for p in pts]
                vals = [p[1]["value"] for p in pts]
                err = [[p[1]["value"] - p[1]["low"] for p in pts], [p[1]["high"] - p[1]["value"] for p in pts]]
                label = f"{MACHINE_LABELS.get(name, 'nearest training image')} (w{width})"
                ax.errorbar(
                    ns, vals, yerr=err, fmt="o", ls=styles[wi % 4], ms=3, capsize=2, color=f"C{ci}", label=label
                )
    titles = {
        "pearson": "median Pearson r of final samples with the network's",
        "r2": "mean per-sample R^2 of denoiser outputs\nat the network's trajectory states",
        "mse": "mean squared difference of denoiser outputs",
    }
    for ax, measure in zip(axes, MEASURES):
        ax.set_xscale("log")
        ax.set_xlabel("training images N")
        ax.set_title(titles[measure], fontsize=9)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Agreement of closed-form denoisers with the network, 95% bootstrap intervals over seeds", fontsize=10)
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def plot_schedules(results: dict, path) -> Path:
    """The calibrated P(sigma) of LS, ELS and PSPC per model, and the Wiener masks' mean size."""
    from diffcore.experiments.plotting import plt

    fig, axes = plt.subplots(1, len(CALIBRATED) + 1, figsize=(4.2 * (len(CALIBRATED) + 1), 3.8))
    models = results["models"]
    colors = plt.cm.viridis([i / max(1, len(models) - 1) for i in range(len(models))])
    for m, color in zip(models, colors):
        for ax, kind in zip(axes, CALIBRATED):
            ax.step(m["levels"], m["patch_schedule"][kind], where="mid", color=color, label=m["model"])
        axes[-1].plot(m["levels"], m["mask_sizes"], "-o", ms=2, color=color, label=m["model"])
    for ax, kind in zip(axes, CALIBRATED):
        ax.set_title(f"calibrated P(sigma), {MACHINE_LABELS[kind]}", fontsize=9)
        ax.set_ylabel("patch size P")
    axes[-1].set_title(f"Wiener masks ({results['config']['wiener_rule']} rule)", fontsize=9)
    axes[-1].set_ylabel("pixels per mask row (mean)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def plot_samples(results: dict, shown: dict, path) -> Path:
    """A block per model (a row of blocks per width, a column per N): rows network, each machine, the
    nearest training image; one column per evaluation seed (the first ``grid_samples``)."""
    from diffcore.experiments.plotting import plt

    rows = ["network", *MACHINES, "nearest_train"]
    labels = ["network"] + [MACHINE_LABELS[r] for r in MACHINES] + ["nearest train"]
    models = results["models"]
    widths = sorted({m["width"] for m in models})
    sizes = sorted({m["n"] for m in models})
    cols = max(1, results["config"]["grid_samples"])
    fig, axes = plt.subplots(
        len(widths),
        len(sizes),
        figsize=(0.8 + max(1.8, 0.42 * cols) * len(sizes), 0.6 + 0.5 * len(rows) * len(widths)),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.axis("off")
    for m in models:
        ax = axes[widths.index(m["width"]), sizes.index(m["n"])]
        samples = shown[m["model"]]
        framed = {r: torch.nn.functional.pad(samples[r], (1, 1, 1, 1), value=0.2) for r in rows}  # grey frames
        grid = torch.cat([torch.cat(list(framed[r]), dim=-1) for r in rows], dim=-2)  # [C, rows*H, cols*W]
        image = ((grid.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        ax.axis("on")
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        h = framed["network"].shape[-2]
        ax.set_yticks([h * (i + 0.5) for i in range(len(rows))])
        ax.set_yticklabels(labels if sizes.index(m["n"]) == 0 else [], fontsize=6)
        ax.set_xticks([])
        gl = "n/a" if m["gl"] is None else f"{m['gl']:.2f}"
        ax.set_title(f"w{m['width']}, N = {m['n']} (GL {gl})", fontsize=7)
    fig.suptitle("Final samples from the same noise (columns: evaluation seeds)", fontsize=9)
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


STUDY = base.Study(
    NAME, LocalityConfig, cpu_only=True, one_process=True, presets=PRESETS, make=base.standard_make(_Study)
)
run, run_preset = STUDY.run, STUDY.run_preset
