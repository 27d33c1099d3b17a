"""``diffcore demo``: the empirical optimal denoiser of the embedded digits memorizes.

Pure noise from per-sample seeds is denoised along a deterministic Heun trajectory by the
empirical optimal denoiser of the digits
(docs/papers.md, Common substrate: ``D*(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i``). Every sample
lands on a training image: the figure shows noise, samples and their nearest training images,
and ``results.json`` the memorization ratio (|x - NN1| / |x - NN2|, Gu et al.) and the GL score
of each sample. It runs in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcore import metrics
from diffcore.experiments import base, hooks as study_hooks, plotting
from diffcore.experiments.base import Workspace, atomic_write_json, json_dumps

log = logging.getLogger(__name__)

NAME = "demo"


@dataclass(frozen=True)
class DemoConfig:
    dataset: str = "digits"
    data_root: str = ""
    num_train: int = 1797  # nested subset of the digits used as training set (all: 1797)
    subset_seed: int = 0
    num_samples: int = 16
    sample_seed_start: int = 0
    sampler_steps: int = 18  # Heun, 35 evaluations
    solver: str = "heun"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    similarity: str = "cosine"
    threshold: float | None = None  # None: calibrated on the data (pixel space) or 0.6 (descriptors)

    def validate(self, pool_size: int | None = None) -> None:
        """Raise ConfigError naming the first field out of its range (``pool_size``: images in the
        dataset, once loaded, bound ``num_train``)."""
        base.check_fields(self, FIELD_CHECKS)
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        base.check_sigmas(self.sigma_min, self.sigma_max)
        if pool_size is not None and self.num_train > pool_size:
            raise base.ConfigError(
                f"num_train: expected 2 .. {pool_size} (the images of {self.dataset}), got {self.num_train}"
            )


FIELD_CHECKS: dict[str, base.Check] = {}  # every field is of the shared vocabulary (base.VOCABULARY_CHECKS)


PRESETS: dict[str, Callable[[], DemoConfig]] = {
    "default": DemoConfig,
    "quick": DemoConfig,
    "tiny": lambda: DemoConfig(num_train=64, num_samples=6, sampler_steps=6),
}
CONFIG_CLASS = DemoConfig


class _Demo:
    """One run of the demo: it makes no units (seconds), so it only binds its folder and writes."""

    def __init__(self, config: DemoConfig, out, hooks, device: str, progress: bool):
        self.config, self.ws, self.hooks, self.device, self.progress = config, Workspace(out), hooks, device, progress

    def run(self) -> dict:
        pool = self.hooks.load_dataset(self.config.dataset, self.config.data_root)
        self.config.validate(pool.shape[0])
        self.ws.bind_config(self.config)
        return _run(self.config, self.ws.root, self.hooks, self.device, self.progress, pool)


def summary(results: dict, out: Path) -> list[str]:
    """The lines ``diffcore demo`` prints: the memorized fraction, GL, the figure."""
    return [
        f"memorized (|x-NN1|/|x-NN2| < 1/3): {results['memorized_fraction']:.0%} of "
        f"{len(results['samples'])} samples; GL {results['gl']:.3f} "
        f"(threshold {results['threshold']:.3f}, {results['similarity']['name']})",
        f"figure: {out / 'demo.png'}",
        f"results: {out / 'results.json'}",
    ]


STUDY = base.Study(
    NAME,
    DemoConfig,
    summary=summary,
    presets=PRESETS,
    make=base.standard_make(_Demo, default_hooks=lambda: study_hooks.default_hooks()),  # looked up at run time
)
run, run_preset = STUDY.run, STUDY.run_preset


def _run(config: DemoConfig, out: Path, hooks, device: str, progress: bool, pool: torch.Tensor) -> dict:
    train, train_index = hooks.subset(pool, config.num_train, config.subset_seed)
    seeds = list(range(config.sample_seed_start, config.sample_seed_start + config.num_samples))
    shape = tuple(pool.shape[1:])
    samples = (
        hooks.sample(
            hooks.empirical_denoiser(train.to(device)),
            seeds,
            shape,
            **base.sampler_settings(config),
            device=device,
            progress=progress,
        )
        .float()
        .cpu()
    )

    similarity = metrics.get_similarity(config.similarity, device=device)
    threshold, source = _threshold(config, similarity, pool, hooks.knn)
    gl = metrics.gl_score(samples, train, similarity, threshold, knn=hooks.knn)
    mem = metrics.memorization_ratio(samples, train, knn=hooks.knn)
    noise = _noise_for_display(hooks, seeds, shape)
    plotting.image_rows(
        [noise, samples, train[mem.nn_index[:, 0]], train[mem.nn_index[:, 1]]],
        ["noise z", "sample", "nearest train", "2nd nearest"],
        out / "demo.png",
        suptitle=f"Empirical denoiser of {config.num_train} {config.dataset} images: "
        f"{mem.fraction:.0%} of samples memorized (|x-NN1|/|x-NN2| < 1/3)",
    )
    per_sample = [
        {
            "seed": s,
            "nn_index": int(train_index[mem.nn_index[i, 0]]),
            "nn_distance": float(mem.nn_distance[i, 0]),
            "nn2_distance": float(mem.nn_distance[i, 1]),
            "ratio": float(mem.ratio[i]),
            "nn_similarity": float(gl.nn_similarity[i]),
        }
        for i, s in enumerate(seeds)
    ]
    results = {
        "experiment": NAME,
        "config": dataclasses.asdict(config),
        "similarity": similarity.describe(),
        "threshold": threshold,
        "threshold_source": source,
        "gl": gl.score,
        "memorized_fraction": mem.fraction,
        "memorization_ratio_threshold": mem.threshold,
        "ratio_median": float(mem.ratio.median()),
        "samples": per_sample,
    }
    results = json.loads(json_dumps(results))
    atomic_write_json(out / "results.json", results)
    log.info("demo: %.0f%% memorized, GL %.3f -> %s", 100 * mem.fraction, gl.score, out)
    return results


def _threshold(config: DemoConfig, similarity, pool, knn) -> tuple[float, str]:
    if config.threshold is not None:
        return float(config.threshold), "config"
    if similarity.default_threshold is not None:
        return float(similarity.default_threshold), "descriptor default (paper)"
    value = metrics.calibrate_threshold(pool, similarity, knn=knn)
    return value, f"calibrated: quantile {metrics.CALIBRATION_QUANTILE} of nearest-other similarity"


def _noise_for_display(hooks, seeds, shape) -> torch.Tensor:
    """The seeds' unit noise, scaled by 1/3 to fit the [-1, 1] display range."""
    return (hooks.noise_from_seeds(seeds, shape, "cpu", torch.float32) / 3).clamp(-1, 1)
