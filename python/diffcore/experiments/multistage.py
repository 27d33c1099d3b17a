"""``diffcore run multistage``: multi-stage models (shared encoder, one decoder per noise interval).

docs/papers.md section 9 (Zhang et al., CVPR 2024). Two parts:

1. Stage division: the mean cosine similarity of the empirical optimal denoiser's (centred) outputs
   for the same ``(x0, n)`` at every pair of sigmas on a log grid (``diffcore.analysis.stages``), and
   the exact best split of the grid into K contiguous intervals (dynamic program, no solver).
   Figure ``similarity.png``; compared with the paper's EDM CIFAR-10 boundaries 2.5103 / 7.6577.
2. Cost against quality at equal training images: a single UNet and a multi-stage UNet
   (``diffcore.models.MultiStageUNet``; stage boundaries from step 1 unless the config fixes them)
   trained with diffcore.train on the same data, seeds and batches. At every ``eval_steps`` point:
   measured training throughput (img/s, wall and process CPU time), the study's own per-stage loss
   (EDM-weighted, fixed draws), sampling time, FLOPs per sample (torch's FlopCounterMode over one
   whole deterministic sampling run), and sample quality: Frechet distance in the shipped digits
   network's feature space (FID with local Inception weights on other datasets, ``fid_weights``),
   the classifier's mean confidence and the entropy of its predicted classes (diversity).
   Figures ``quality.png`` (quality against training images); ``cost.csv`` the cost table.

Every part is a resumable unit of ``experiments.base.Workspace``; training resumes from the
trainer's checkpoints (a later eval point continues the earlier run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcore.experiments import _stack, base
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

NAME = "multistage"
PAPER_BOUNDARIES = (2.5103, 7.6577)  # EDM sigmas of the paper's three-stage CIFAR-10 model
MODELS = ("single", "multistage")


@dataclass(frozen=True)
class MultistageConfig:
    """The study's settings (ranges checked by :meth:`validate`)."""

    dataset: str = "digits"
    data_root: str = ""
    num_train: int = 1797  # nested subset of the dataset, 2 .. pool size
    subset_seed: int = 0
    # stage division
    grid_points: int = 40  # sigmas on a log grid, >= num_stages
    grid_sigma_min: float = 0.002
    grid_sigma_max: float = 80.0
    num_probes: int = 128  # (x0, n) pairs: x0 from the training images
    probe_seed: int = 0
    num_stages: int = 3  # >= 1
    stage_boundaries: tuple[float, ...] = ()  # sigmas the multi-stage model uses; () = the DP's
    # models: a UNet preset, the single UNet's width, the encoder's width, one decoder width per stage
    model_preset: str = "ddpmpp-digits-light"
    single_channels: int = 16
    encoder_channels: int = 16
    decoder_channels: tuple[int, ...] = (24, 16, 4)  # lowest noise first (paper: 192/128/16 on 128)
    # training (the same for both models: equal training images)
    eval_steps: tuple[int, ...] = (400, 800, 1200)
    batch_size: int = 64
    learning_rate: float = 2e-3
    lr_warmup_images: int = 5000
    seed: int = 0
    # evaluation
    num_samples: int = 512
    sample_seed_start: int = 0
    sampler_steps: int = 18  # Heun: 2 * steps - 1 denoiser calls
    loss_eval_images: int = 1024
    loss_eval_seed: int = 1
    fid_weights: str = ""  # non-digits data: local Inception-v3 weights for FID
    torch_threads: int = 1  # intra-op threads on the CPU (0: torch's default); the digits
    #                                    models are so small that one thread is fastest on a busy CPU

    def validate(self, pool_size: int | None = None) -> None:
        """Raise ConfigError naming the first field out of range."""
        base.check_fields(self, FIELD_CHECKS)
        if pool_size is not None and self.num_train > pool_size:
            raise ConfigError(f"num_train: expected at most the pool's {pool_size} images, got {self.num_train}")
        if not self.grid_sigma_min < self.grid_sigma_max:
            raise ConfigError(
                f"grid_sigma_min: expected grid_sigma_min < grid_sigma_max, "
                f"got {self.grid_sigma_min}, {self.grid_sigma_max}"
            )
        if self.num_stages > self.grid_points:
            raise ConfigError(f"num_stages: expected at most grid_points = {self.grid_points}, got {self.num_stages}")
        if len(self.decoder_channels) != self.num_stages:
            raise ConfigError(
                f"decoder_channels: expected {self.num_stages} integers >= 4 (one per stage), "
                f"got {self.decoder_channels!r}"
            )
        bounds = self.stage_boundaries
        if bounds and (len(bounds) != self.num_stages - 1 or list(bounds) != sorted(bounds)):
            raise ConfigError(
                f"stage_boundaries: expected () or {self.num_stages - 1} increasing sigmas > 0, got {bounds!r}"
            )
        if list(self.eval_steps) != sorted(self.eval_steps):
            raise ConfigError(f"eval_steps: expected increasing integers >= 1, got {self.eval_steps!r}")
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        if self.dataset != "digits" and not self.fid_weights:
            log.warning("fid_weights: empty, so sample quality on %s is not measured", self.dataset)

    def sigma_grid(self) -> np.ndarray:
        return np.geomspace(self.grid_sigma_min, self.grid_sigma_max, self.grid_points)


def _channels(name: str, value) -> None:
    """One width >= 4 per stage; stages may share a width, so repeats are allowed (unlike base.tuple_of)."""
    if not isinstance(value, tuple) or not value:
        raise ConfigError(f"{name}: expected at least 1 comma-separated value, got {value!r}")
    for i, item in enumerate(value):
        _WIDTH(f"{name}[{i}]", item)


_POSITIVE = base.integer(1)
_WIDTH = base.integer(4)
_SIGMA = base.sigma
FIELD_CHECKS: dict[str, base.Check] = {
    "dataset": base.text,
    "data_root": base.text,
    "num_train": base.integer(2),
    "subset_seed": base.seed,
    "grid_points": base.integer(2),
    "grid_sigma_min": _SIGMA,
    "grid_sigma_max": _SIGMA,
    "num_probes": _POSITIVE,
    "probe_seed": base.seed,
    "num_stages": _POSITIVE,
    "stage_boundaries": base.tuple_of(_SIGMA, min_len=0),
    "model_preset": base.model_preset,
    "single_channels": _WIDTH,
    "encoder_channels": _WIDTH,
    "decoder_channels": _channels,
    "eval_steps": base.tuple_of(_POSITIVE),
    "batch_size": _POSITIVE,
    "learning_rate": base.number(0, lo_open=True),
    "lr_warmup_images": base.integer(0),
    "seed": base.seed,
    "num_samples": base.integer(2),
    "sample_seed_start": base.seed,
    "sampler_steps": _POSITIVE,
    "loss_eval_images": _POSITIVE,
    "loss_eval_seed": base.seed,
    "fid_weights": base.text,
    "torch_threads": base.integer(0),
}


def _quick() -> MultistageConfig:
    return MultistageConfig()


def _paper() -> MultistageConfig:
    """CIFAR-10 from a local folder (``--set data_root=...``) with the paper's widths and boundaries;
    the DP's boundaries are computed and reported beside them. A GPU-scale run."""
    return MultistageConfig(
        dataset="cifar10",
        num_train=50000,
        grid_points=60,
        num_probes=256,
        stage_boundaries=PAPER_BOUNDARIES,
        model_preset="ddpmpp-cifar",
        single_channels=128,
        encoder_channels=128,
        decoder_channels=(192, 128, 16),
        eval_steps=(50000, 100000, 200000),
        batch_size=128,
        learning_rate=1e-3,
        lr_warmup_images=10_000_000,
        num_samples=10000,
        loss_eval_images=4096,
    )


def _tiny() -> MultistageConfig:
    return MultistageConfig(
        num_train=64,
        grid_points=8,
        num_probes=16,
        single_channels=8,
        encoder_channels=8,
        decoder_channels=(8, 8, 4),
        eval_steps=(3, 6),
        batch_size=16,
        lr_warmup_images=0,
        num_samples=32,
        sampler_steps=3,
        loss_eval_images=32,
    )


PRESETS: dict[str, Callable[[], MultistageConfig]] = {
    "quick": _quick,
    "default": _quick,
    "paper": _paper,
    "tiny": _tiny,
}
CONFIG_CLASS = MultistageConfig


# ----------------------------------------------------------------------------- the study


class _Study:
    def __init__(self, config: MultistageConfig, out, device: str, progress: bool):
        self.c = config
        self.out = Path(out)
        self.ws = Workspace(out)
        self.device = device
        self.progress = progress

    def run(self) -> dict:
        c = self.c
        pool = _stack.load_dataset(c.dataset, c.data_root)
        c.validate(pool.shape[0])
        self.ws.bind_config(c)  # after the data and the config checked against it
        train, _ = _stack.subset(pool, c.num_train, c.subset_seed)
        stages = self.stage_division(train)
        boundaries = list(c.stage_boundaries) or stages["dp_boundaries"]
        reference = self.reference_statistics(pool)
        evaluations = {
            model: [self.train_and_evaluate(model, steps, boundaries, train, reference) for steps in c.eval_steps]
            for model in MODELS
        }
        results = {
            "experiment": NAME,
            "config": dataclasses.asdict(c),
            "stages": stages,
            "training_boundaries": boundaries,
            "evaluations": evaluations,
            "quality_floor": reference["floor"],
            "cost": self.cost_rows(evaluations),
            "machine": _machine(),
        }
        self.figures(stages, evaluations, reference["floor"])
        atomic_write_csv(self.out / "cost.csv", results["cost"])
        results = json.loads(json_dumps(results))
        atomic_write_json(self.out / "results.json", results)
        return results

    # stage division ------------------------------------------------------------
    def stage_division(self, train: torch.Tensor) -> dict:
        from diffcore.analysis import contiguous_segmentation, denoiser_similarity, stage_boundaries

        c = self.c
        spec = {
            "dataset": c.dataset,
            "num_train": c.num_train,
            "subset_seed": c.subset_seed,
            "grid": [c.grid_sigma_min, c.grid_sigma_max, c.grid_points],
            "num_probes": c.num_probes,
            "probe_seed": c.probe_seed,
            "num_stages": c.num_stages,
        }

        def produce(tmp: Path, work: Path) -> dict:
            gen = torch.Generator().manual_seed(c.probe_seed)
            rows = torch.randint(train.shape[0], (c.num_probes,), generator=gen)
            probes = train[rows].to(self.device)
            noise = torch.randn(probes.shape, generator=gen).to(self.device)
            sigmas = c.sigma_grid()
            start = time.perf_counter()
            similarity = denoiser_similarity(probes, noise, train.to(self.device), sigmas.tolist())
            segmentation = contiguous_segmentation(similarity, c.num_stages)
            result = {
                "sigmas": sigmas.tolist(),
                "similarity": similarity.tolist(),
                "segment_starts": list(segmentation.starts),
                "cost": segmentation.cost,
                "dp_boundaries": stage_boundaries(sigmas.tolist(), segmentation),
                "paper_boundaries": list(PAPER_BOUNDARIES) if c.num_stages == 3 else None,
                "seconds": time.perf_counter() - start,
            }
            atomic_write_json(tmp / "stages.json", result)
            return {"dp_boundaries": result["dp_boundaries"]}

        unit = self.ws.run_unit("stages", "division", spec, produce)
        return json.loads(unit.file("stages.json").read_text())

    # quality reference -----------------------------------------------------------
    def extractor(self):
        from diffcore import metrics

        if self.c.dataset == "digits":
            return metrics.digits_features(self.device)
        if self.c.fid_weights:
            return metrics.inception_features(self.c.fid_weights, self.device)
        return None

    def reference_statistics(self, pool: torch.Tensor) -> dict:
        """Feature statistics of the whole pool, and the floor: the distance of num_samples real
        images (a seeded draw) to the pool, what a perfect model's samples of that size would score."""
        from diffcore import metrics

        extractor = self.extractor()
        if extractor is None:
            return {"stats": None, "floor": None}
        stats = metrics.feature_statistics(pool, extractor, device=self.device)
        rows = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(12345))[: self.c.num_samples]
        floor = metrics.frechet_distance(stats, pool[rows], extractor=extractor, device=self.device)
        return {"stats": stats, "floor": floor, "extractor": extractor}

    # training and evaluation -------------------------------------------------------
    def model_spec(self, model: str, boundaries: list[float]) -> dict:
        c = self.c
        if model == "single":
            return {"name": "ddpmpp", "preset": c.model_preset, "model_channels": c.single_channels}
        return {
            "name": "multistage",
            "preset": c.model_preset,
            "model_channels": c.encoder_channels,
            "sigma_boundaries": [float(b) for b in boundaries],
            "decoder_channels": list(c.decoder_channels),
        }

    def train_and_evaluate(
        self, model: str, steps: int, boundaries: list[float], train: torch.Tensor, reference: dict
    ) -> dict:
        from diffcore import train as trainer

        c = self.c
        model_spec = self.model_spec(model, boundaries)
        spec = {
            "model": model_spec,
            "steps": steps,
            "dataset": c.dataset,
            "num_train": c.num_train,
            "subset_seed": c.subset_seed,
            "batch_size": c.batch_size,
            "lr": c.learning_rate,
            "lr_warmup_images": c.lr_warmup_images,
            "seed": c.seed,
            "num_samples": c.num_samples,
            "sampler_steps": c.sampler_steps,
            "loss_eval": [c.loss_eval_images, c.loss_eval_seed],
            **({"fid_weights_sha256": base.file_digest(c.fid_weights)} if c.fid_weights else {}),
        }
        run_dir = self.out / "train" / model  # shared by the eval points: each resumes the last

        def produce(tmp: Path, work: Path) -> dict:
            request = {
                "train_steps": steps,
                "batch_size": c.batch_size,
                "learning_rate": c.learning_rate,
                "lr_warmup_images": c.lr_warmup_images,
                "seed": c.seed,
            }
            config = _stack.training_request(
                request,
                run_dir,
                self.device,
                self.progress,
                model=model_spec,
                data={**_stack.data_spec(c.dataset, c.data_root), "subset": c.num_train, "subset_seed": c.subset_seed},
                checkpoint_every=max(steps // 2, 1),
                log_every=max(min(50, steps // 2), 1),
            )
            wall, cpu = time.perf_counter(), time.process_time()
            result = trainer.train_from_config(config, resume="auto")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            trained_steps = steps - (result.resumed_from_step or 0)
            denoiser = trainer.load_trained_model(result.checkpoint, which="ema").to(self.device).eval()
            evaluation = {
                "steps": steps,
                "images": steps * c.batch_size,
                "trained_steps": trained_steps,
                "train_wall_s": wall,
                "train_cpu_s": cpu,
                "train_img_per_s": trained_steps * c.batch_size / wall if trained_steps else None,
                "train_img_per_cpu_s": trained_steps * c.batch_size / cpu if trained_steps else None,
                "final_train_loss": result.final_loss,
                **self.cost(denoiser),
                "stage_loss": self.stage_loss(denoiser, train, boundaries),
            }
            evaluation.update(self.quality(denoiser, reference, tmp))
            atomic_write_json(tmp / "evaluation.json", evaluation)
            return {"fd": evaluation.get("frechet_distance")}

        unit = self.ws.run_unit("models", f"{model}-{steps}", spec, produce)
        evaluation = json.loads(unit.file("evaluation.json").read_text())
        log.info(
            "%s at %d steps: %s", model, steps, {k: evaluation.get(k) for k in ("frechet_distance", "train_img_per_s")}
        )
        return evaluation

    def cost(self, denoiser) -> dict:
        """Parameters (all, and those one denoiser call uses per stage) and FLOPs per sample."""
        from torch.utils.flop_counter import FlopCounterMode

        from diffcore.models import count_parameters

        network = denoiser.model
        per_stage = (
            network.stage_parameter_counts()
            if hasattr(network, "stage_parameter_counts")
            else [count_parameters(network)]
        )
        shape = (network.in_channels, network.img_resolution, network.img_resolution)
        with FlopCounterMode(display=False) as counter:
            self.sample(denoiser, [0], shape)
        return {
            "parameters": count_parameters(network),
            "parameters_per_call": per_stage,
            "flops_per_sample": int(counter.get_total_flops()),
            "denoiser_calls_per_sample": 2 * self.c.sampler_steps - 1,
        }

    def sample(self, denoiser, seeds, shape):
        c = self.c
        return _stack.sample(denoiser, seeds, shape, steps=c.sampler_steps, device=self.device, progress=False)

    def stage_loss(self, denoiser, train: torch.Tensor, boundaries: list[float]) -> list[dict]:
        """EDM-weighted loss ``lambda(sigma) |D(x0 + sigma n) - x0|^2`` (pixel mean) on fixed draws
        (training images, EDM's log-normal sigmas, noise; the same for both models), per stage."""
        c = self.c
        gen = torch.Generator().manual_seed(c.loss_eval_seed)
        x0 = train[torch.randint(train.shape[0], (c.loss_eval_images,), generator=gen)]
        sigma = (torch.randn(c.loss_eval_images, generator=gen) * 1.2 - 1.2).exp()
        noise = torch.randn(x0.shape, generator=gen)
        losses = []
        with torch.no_grad():
            for rows in torch.arange(c.loss_eval_images).split(256):
                x, s = (
                    (x0[rows] + sigma[rows, None, None, None] * noise[rows]).to(self.device),
                    sigma[rows].to(self.device),
                )
                error = (denoiser(x, s) - x0[rows].to(self.device)).square().flatten(1).mean(1)
                losses.append((denoiser.loss_weight(s) * error).cpu())
        losses = torch.cat(losses)
        stage = torch.bucketize(sigma.double(), torch.tensor(boundaries, dtype=torch.float64), right=True)
        edges = [0.0] + list(boundaries) + [None]  # None: unbounded above (results are strict JSON)
        return [
            {
                "stage": k,
                "sigma_range": [edges[k], edges[k + 1]],
                "count": int((stage == k).sum()),
                "loss": float(losses[stage == k].mean()) if (stage == k).any() else None,
            }
            for k in range(len(boundaries) + 1)
        ]

    def quality(self, denoiser, reference: dict, tmp: Path) -> dict:
        from diffcore import metrics

        c = self.c
        seeds = list(range(c.sample_seed_start, c.sample_seed_start + c.num_samples))
        network = denoiser.model
        shape = (network.in_channels, network.img_resolution, network.img_resolution)
        wall, cpu = time.perf_counter(), time.process_time()
        samples = self.sample(denoiser, seeds, shape)
        out = {"sampling_wall_s": time.perf_counter() - wall, "sampling_cpu_s": time.process_time() - cpu}
        torch.save(samples[:64].clone(), tmp / "samples.pt")
        if reference["stats"] is None:
            return out
        out["frechet_distance"] = metrics.frechet_distance(
            reference["stats"], samples, extractor=reference["extractor"], device=self.device
        )
        if c.dataset == "digits":
            with torch.no_grad():
                probs = torch.softmax(metrics.digits_classifier(self.device).logits(samples.to(self.device)), 1).cpu()
            histogram = torch.bincount(probs.argmax(1), minlength=10).double() / probs.shape[0]
            entropy = -(histogram[histogram > 0] * histogram[histogram > 0].log()).sum() / math.log(10)
            out.update(classifier_confidence=float(probs.max(1).values.mean()), class_entropy=float(entropy))
        return out

    # report ------------------------------------------------------------------------
    def cost_rows(self, evaluations: dict) -> list[dict]:
        rows = []
        for model, points in evaluations.items():
            last = points[-1]
            rows.append(
                {
                    "model": model,
                    "parameters": last["parameters"],
                    "parameters_per_call": "/".join(str(p) for p in last["parameters_per_call"]),
                    "mflops_per_sample": last["flops_per_sample"] / 1e6,
                    "train_img_per_s": _mean(p["train_img_per_s"] for p in points),
                    "train_img_per_cpu_s": _mean(p["train_img_per_cpu_s"] for p in points),
                    "sampling_ms_per_sample": 1e3 * last["sampling_wall_s"] / self.c.num_samples,
                    "sampling_cpu_ms_per_sample": 1e3 * last["sampling_cpu_s"] / self.c.num_samples,
                    "frechet_distance": last.get("frechet_distance"),
                }
            )
        return rows

    def figures(self, stages: dict, evaluations: dict, floor) -> None:
        import matplotlib.pyplot as plt

        from diffcore.experiments import plotting  # noqa: F401  (sets the Agg backend)

        sigmas = np.log10(stages["sigmas"])
        half = (sigmas[-1] - sigmas[0]) / (2 * max(len(sigmas) - 1, 1))  # cells centred on the grid
        edges = [sigmas[0] - half, sigmas[-1] + half]
        fig, ax = plt.subplots(figsize=(5.2, 4.4))
        image = ax.imshow(np.array(stages["similarity"]), origin="lower", cmap="viridis", extent=edges + edges)
        fig.colorbar(image, ax=ax, label="mean cosine of centred D_emp outputs")
        for value in stages["dp_boundaries"]:
            ax.axvline(math.log10(value), color="white", lw=1.2)
            ax.axhline(math.log10(value), color="white", lw=1.2)
        for value in stages.get("paper_boundaries") or []:
            ax.axvline(math.log10(value), color="red", lw=1, ls="--")
        ax.set_xlabel("log10 sigma")
        ax.set_ylabel("log10 sigma")
        ax.set_title(
            "Empirical-denoiser similarity; DP boundaries (white)\npaper's EDM CIFAR-10 boundaries (red, dashed)",
            fontsize=8,
        )
        atomic_save_figure(fig, self.out / "similarity.png")

        if all(p.get("frechet_distance") is not None for points in evaluations.values() for p in points):
            fig, ax = plt.subplots(figsize=(5, 3.4))
            for model, points in evaluations.items():
                ax.plot([p["images"] for p in points], [p["frechet_distance"] for p in points], "o-", label=model)
            if floor is not None:
                ax.axhline(floor, color="gray", ls=":", label=f"real images ({self.c.num_samples})")
            ax.set_xlabel("training images")
            ax.set_ylabel("Frechet distance (digits features)" if self.c.dataset == "digits" else "FID")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
            fig.tight_layout()
            atomic_save_figure(fig, self.out / "quality.png")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _machine() -> dict:
    import os
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(load) if load else None,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def run(config: MultistageConfig, out, *, hooks=None, device: str = "auto", progress: bool = True) -> dict:
    """Run (or resume) the study into ``out``: results.json, cost.csv, similarity.png, quality.png."""
    return base.run_study(
        STUDY,
        config,
        out,
        lambda given, resolved, part: _Study(config, out, resolved, progress),
        hooks=hooks,
        device=device,
    )


STUDY = base.Study(NAME, MultistageConfig, takes_hooks=False)


def run_preset(preset: str, out, overrides=(), **kwargs) -> dict:
    return run(config_from_preset(PRESETS, preset, overrides), out, **kwargs)
