"""``diffcore run multistage``: multi-stage models (shared encoder, one decoder per noise interval).

docs/papers.md section 9 (Zhang et al., CVPR 2024). The paper's claim: a multi-stage model reaches a
given sample quality with less training compute than one UNet for all noise levels (and than
separate models per stage). Three parts:

1. Stage division: the mean cosine similarity of the empirical optimal denoiser's (centred) outputs
   for the same ``(x0, n)`` at every pair of sigmas on a log grid (``diffcore.analysis.stages``), and
   the exact best split of the grid into K contiguous intervals (dynamic program, no solver).
   Figure ``similarity.png``; compared with the paper's EDM CIFAR-10 boundaries 2.5103 / 7.6577.
2. Width allocation, fixed before any model is trained (:func:`allocate_decoder_widths`): the
   paper's decoder widths relative to its encoder (192 / 128 / 16 on 128: ratios 1.5 / 1 / 0.125,
   lowest noise first, so the stages that need less capacity get narrower decoders) times one
   common factor, the largest for which the expected training FLOPs per image under the training
   noise law (the stage probabilities p_k of EDM's lognormal) do not exceed the single UNet's.
3. Quality against training compute for three models trained by diffcore.train on the same data,
   seed, batches and noise law: the single UNet; the multi-stage UNet
   (``diffcore.models.MultiStageUNet``); separate per-stage UNets (``SeparateStageUNets``, each of
   the single UNet's width). The stage models train one stage per batch, drawn with probability
   p_k, its sigmas from the lognormal truncated to the stage (the paper's ``EDMMultistageLoss``;
   ``EDMLoss(stage_boundaries=...)``), so the marginal noise law is EDM's for all three. At every
   ``eval_steps`` checkpoint: cumulative training CPU-seconds (process time) and training FLOPs
   (forward + backward per image counted by torch's FlopCounterMode for each stage, times the
   images; for the stage models the expectation over the stage law), Frechet distance of
   ``num_samples`` samples in the shipped digits network's feature space with a bootstrap interval
   over samples (paired across models: the same seeds and resamples), the per-stage EDM-weighted
   loss on ``loss_draws_per_stage`` stratified draws in every stage (bootstrap intervals), and
   sampling FLOPs per sample. Claims (``results["claims"]``, :func:`intervals.claim`) are decided
   on the paired FD intervals beside the compute ratios. Figures ``quality.png`` (FD against
   training FLOPs and CPU-seconds, per-stage losses), ``similarity.png``; ``cost.csv``.

Training noise: EDM's lognormal (``ln sigma ~ N(-1.2, 1.2^2)``) for every model; the sampler visits
[0.002, 80], where sigma > 10 carries 0.2% of the training draws: the per-stage losses are evaluated
where the models were trained (the lognormal restricted to each stage), FD on the whole sampler.

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
from diffcore.metrics import intervals

log = logging.getLogger(__name__)

NAME = "multistage"
PAPER_BOUNDARIES = (2.5103, 7.6577)  # EDM sigmas of the paper's three-stage CIFAR-10 model
PAPER_DECODER_RATIOS = (192 / 128, 128 / 128, 16 / 128)  # the paper's decoder widths / encoder width
MODELS = ("single", "multistage", "separate")


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
    stage_boundaries: tuple[float, ...] = ()  # sigmas the stage models use; () = the DP's
    # models: a UNet preset, the single UNet's width, the encoder's width, one decoder width per stage
    model_preset: str = "ddpmpp-digits-light"
    single_channels: int = 16
    encoder_channels: int = 16
    decoder_channels: tuple[int, ...] = ()  # lowest noise first; () = allocate_decoder_widths (3 stages)
    separate_channels: tuple[int, ...] = ()  # widths of the separate UNets; () = single_channels each
    # training (the same for every model: equal training images, the same noise law)
    eval_steps: tuple[int, ...] = (150, 300, 600, 1200)
    batch_size: int = 64
    learning_rate: float = 2e-3
    lr_warmup_images: int = 5000
    seed: int = 0
    # evaluation
    num_samples: int = 512
    sample_seed_start: int = 0
    sampler_steps: int = 18  # Heun: 2 * steps - 1 denoiser calls
    loss_draws_per_stage: int = 512  # stratified (x0, sigma, n) draws in every stage
    loss_eval_seed: int = 1
    fd_resamples: int = 1000  # bootstrap resamples of the samples for FD intervals
    fid_weights: str = ""  # non-digits data: local Inception-v3 weights for FID
    torch_threads: int = 1  # intra-op threads on the CPU (0: torch's default); the digits
    #                                    models are so small that one thread is fastest on a busy CPU

    def validate(self, pool_size: int | None = None) -> None:
        """Raise ConfigError naming the first field out of range."""
        base.check_fields(self, FIELD_CHECKS)
        if pool_size is not None and self.num_train > pool_size:
            raise base.ConfigError(f"num_train: expected at most the pool's {pool_size} images, got {self.num_train}")
        if not self.grid_sigma_min < self.grid_sigma_max:
            raise base.ConfigError(
                f"grid_sigma_min: expected grid_sigma_min < grid_sigma_max, "
                f"got {self.grid_sigma_min}, {self.grid_sigma_max}"
            )
        if self.num_stages > self.grid_points:
            raise base.ConfigError(
                f"num_stages: expected at most grid_points = {self.grid_points}, got {self.num_stages}"
            )
        if self.decoder_channels and len(self.decoder_channels) != self.num_stages:
            raise base.ConfigError(
                f"decoder_channels: expected () or {self.num_stages} integers >= 4 (one per stage), "
                f"got {self.decoder_channels!r}"
            )
        if not self.decoder_channels and self.num_stages != len(PAPER_DECODER_RATIOS):
            raise base.ConfigError(
                f"decoder_channels: the allocation rule has the paper's {len(PAPER_DECODER_RATIOS)} stage ratios; "
                f"give {self.num_stages} widths for num_stages = {self.num_stages}"
            )
        if self.separate_channels and len(self.separate_channels) != self.num_stages:
            raise base.ConfigError(
                f"separate_channels: expected () or {self.num_stages} integers >= 4, got {self.separate_channels!r}"
            )
        bounds = self.stage_boundaries
        if bounds and (len(bounds) != self.num_stages - 1 or list(bounds) != sorted(bounds)):
            raise base.ConfigError(
                f"stage_boundaries: expected () or {self.num_stages - 1} increasing sigmas > 0, got {bounds!r}"
            )
        if list(self.eval_steps) != sorted(self.eval_steps):
            raise base.ConfigError(f"eval_steps: expected increasing integers >= 1, got {self.eval_steps!r}")
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_samples)
        if self.dataset != "digits" and not self.fid_weights:
            log.warning("fid_weights: empty, so sample quality on %s is not measured", self.dataset)

    def sigma_grid(self) -> np.ndarray:
        return np.geomspace(self.grid_sigma_min, self.grid_sigma_max, self.grid_points)


def _channels(name: str, value) -> None:
    """() or one width >= 4 per stage; stages may share a width, so repeats are allowed (unlike base.tuple_of)."""
    if not isinstance(value, tuple):
        raise base.ConfigError(f"{name}: expected comma-separated integers >= 4 (or nothing), got {value!r}")
    for i, item in enumerate(value):
        _WIDTH(f"{name}[{i}]", item)


_WIDTH = base.integer(4)
_SIGMA = base.sigma
FIELD_CHECKS: dict[str, base.Check] = {
    "grid_points": base.integer(2),
    "grid_sigma_min": _SIGMA,
    "grid_sigma_max": _SIGMA,
    "num_probes": base.positive,
    "num_stages": base.positive,
    "stage_boundaries": base.tuple_of(_SIGMA, min_len=0),
    "single_channels": _WIDTH,
    "encoder_channels": _WIDTH,
    "decoder_channels": _channels,
    "separate_channels": _channels,
    "eval_steps": base.tuple_of(base.positive),
    "seed": base.seed,
    "num_samples": base.integer(2),  # a Frechet distance needs two samples
    "loss_draws_per_stage": base.integer(2),
    "loss_eval_seed": base.seed,
    "fd_resamples": base.integer(100),
    "fid_weights": base.text,
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
        loss_draws_per_stage=4096,
    )


def _tiny() -> MultistageConfig:
    return MultistageConfig(
        num_train=64,
        grid_points=8,
        num_probes=16,
        single_channels=8,
        encoder_channels=8,
        separate_channels=(8, 4, 4),
        eval_steps=(3, 6),
        batch_size=16,
        lr_warmup_images=0,
        num_samples=32,
        sampler_steps=3,
        loss_draws_per_stage=16,
        fd_resamples=100,
    )


PRESETS: dict[str, Callable[[], MultistageConfig]] = {
    "quick": _quick,
    "default": _quick,
    "paper": _paper,
    "tiny": _tiny,
}
CONFIG_CLASS = MultistageConfig


# ----------------------------------------------------------------------------- width allocation


def _width_of(value: float) -> int:
    """The nearest multiple of 4, at least 4 (GroupNorm: groups of 4 channels up to 32 groups)."""
    return max(4, 4 * round(value / 4))


def call_flops(denoiser, *, backward: bool, batch: int = 2) -> float:
    """FLOPs per image of one denoiser call (forward, or forward + backward of a squared-error loss
    when ``backward``), counted by torch's FlopCounterMode on ``batch`` images at sigma 1."""
    from torch.utils.flop_counter import FlopCounterMode

    network = denoiser.model
    shape = (batch, network.in_channels, network.img_resolution, network.img_resolution)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        if backward:
            denoiser(x, torch.ones(batch)).square().mean().backward()
        else:
            with torch.no_grad():
                denoiser(x, torch.ones(batch))
    denoiser.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


class FlopTable:
    """FLOPs per image of one call, cached by architecture: a UNet of width ``w``
    (:meth:`unet`), or the shared encoder with one decoder of width ``w`` (:meth:`decoder`). A
    multi-stage call in stage k costs ``decoder(w_k)`` whatever the other decoders (one decoder
    runs), a separate-models call ``unet(w_k)``."""

    def __init__(self, preset: str, encoder_channels: int, backward: bool):
        self.preset, self.encoder_channels, self.backward = preset, encoder_channels, backward
        self._cache: dict[tuple[str, int], float] = {}

    def unet(self, width: int) -> float:
        from diffcore.train import build_model

        key = ("unet", width)
        if key not in self._cache:
            model = build_model({"name": "ddpmpp", "preset": self.preset, "model_channels": width})
            self._cache[key] = call_flops(model, backward=self.backward)
        return self._cache[key]

    def decoder(self, width: int) -> float:
        from diffcore.models import multistage_denoiser

        key = ("decoder", width)
        if key not in self._cache:
            model = multistage_denoiser(
                self.preset, sigma_boundaries=(), decoder_channels=(width,), model_channels=self.encoder_channels
            )
            self._cache[key] = call_flops(model, backward=self.backward)
        return self._cache[key]


def allocate_decoder_widths(
    preset: str,
    encoder_channels: int,
    single_channels: int,
    probabilities: list[float],
    ratios: tuple[float, ...] = PAPER_DECODER_RATIOS,
) -> dict:
    """The decoder widths of the multi-stage model by the study's rule (fixed before training).

    Widths ``w_k = m4(s * r_k * encoder_channels)`` (``r``: the paper's decoder/encoder width
    ratios, lowest noise first; ``m4``: nearest multiple of 4, at least 4) for the largest ``s``
    (``w_0`` in steps of 4) with ``sum_k p_k F(w_k) <= F_single``: expected forward FLOPs per
    training image under the training noise law (``p_k``: the stage probabilities) at most the
    single UNet's. Returns ``{"widths", "scale", "expected_flops", "single_flops", "stage_flops",
    "next_widths", "next_expected_flops", "rule"}`` (``next_*``: the first candidate over budget).
    """
    table = FlopTable(preset, encoder_channels, backward=False)
    single_flops = table.unet(single_channels)
    chosen = None
    first = 4
    while True:
        scale = first / (ratios[0] * encoder_channels)
        widths = [_width_of(scale * r * encoder_channels) for r in ratios]
        flops = [table.decoder(w) for w in widths]
        expected = sum(p * f for p, f in zip(probabilities, flops))
        candidate = {"widths": widths, "scale": scale, "expected_flops": expected, "stage_flops": flops}
        if expected > single_flops or first > 8 * max(encoder_channels, single_channels):
            break
        chosen = candidate
        first += 4
    if chosen is None:
        raise base.ConfigError(
            f"decoder_channels: even the narrowest decoders {widths} cost more FLOPs per training image than the "
            f"single UNet of width {single_channels}; give decoder_channels explicitly"
        )
    return {
        **chosen,
        "single_flops": single_flops,
        "stage_probabilities": list(probabilities),
        "next_widths": candidate["widths"],
        "next_expected_flops": candidate["expected_flops"],
        "rule": "paper ratios 1.5/1/0.125 x the largest common scale with expected forward FLOPs per "
        "training image <= the single UNet's",
    }


# ----------------------------------------------------------------------------- the study


def training_loss(boundaries: list[float]):
    """The stage models' loss: EDM's, one stage per batch (``EDMLoss(stage_boundaries=...)``)."""
    from diffcore.train.loss import EDMLoss

    return EDMLoss(stage_boundaries=tuple(boundaries))


def stratified_stage_draws(
    train: torch.Tensor, boundaries: list[float], per_stage: int, seed: int, p_mean: float = -1.2, p_std: float = 1.2
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per stage k: ``(x0 [n, C, H, W], sigma [n], noise [n, C, H, W])`` with sigma from the training
    lognormal restricted to stage k, stratified: ``u_i = (i + U_i) / n`` mapped through the
    truncated inverse CDF, so every stage gets ``per_stage`` draws spread over its whole mass."""
    gen = torch.Generator().manual_seed(seed)
    loss = training_loss(boundaries)
    probabilities = loss.stage_probabilities()
    out = []
    low = 0.0
    edges = [0.0, *boundaries, math.inf]
    for k, mass in enumerate(probabilities):
        u = torch.arange(per_stage, dtype=torch.float64) + torch.rand(per_stage, generator=gen, dtype=torch.float64)
        cdf = (low + mass * u / per_stage).clamp(1e-300, 1 - 1e-16)
        sigma = (torch.special.ndtri(cdf) * p_std + p_mean).exp().clamp(edges[k], edges[k + 1]).float()
        x0 = train[torch.randint(train.shape[0], (per_stage,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        out.append((x0, sigma, noise))
        low += mass
    return out


def _frechet_from_features(features: np.ndarray, ref_mean: np.ndarray, ref_sqrt: np.ndarray, ref_trace: float) -> float:
    """FD (Heusel et al. 2017, Eq. 6) of feature rows ``[n, F]`` to a reference ``N(mu_r, S_r)``:
    ``|mu - mu_r|^2 + Tr S + Tr S_r - 2 sum sqrt(eig(S_r^1/2 S S_r^1/2))`` (as diffcore.metrics)."""
    mean = features.mean(0)
    centred = features - mean
    cov = centred.T @ centred / (features.shape[0] - 1)
    eig = np.linalg.eigvalsh(ref_sqrt @ cov @ ref_sqrt)
    return float(
        ((mean - ref_mean) ** 2).sum() + np.trace(cov) + ref_trace - 2.0 * np.sqrt(np.clip(eig, 0, None)).sum()
    )


class _Study:
    def __init__(self, config: MultistageConfig, out, device: str, progress: bool):
        self.c = config
        self.out = Path(out)
        self.ws = base.Workspace(out)
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
        probabilities = training_loss(boundaries).stage_probabilities()
        allocation = self.allocation(boundaries, probabilities)
        reference = self.reference_statistics(pool)
        evaluations = {}
        for model in MODELS:
            evaluations[model] = [
                self.train_and_evaluate(model, steps, boundaries, allocation, train, reference)
                for steps in c.eval_steps
            ]
            _cumulate(evaluations[model], allocation["training_flops"][model]["per_image"])
        quality = self.quality_intervals(evaluations, reference)
        results = {
            "experiment": NAME,
            "config": dataclasses.asdict(c),
            "stages": stages,
            "training_boundaries": boundaries,
            "stage_probabilities": probabilities,
            "allocation": allocation,
            "evaluations": evaluations,
            "quality_floor": quality.pop("floor"),
            "claims": self.claims(evaluations, quality),
            "cost": self.cost_rows(evaluations),
            "machine": _machine(),
        }
        self.figures(stages, evaluations, results["quality_floor"])
        base.atomic_write_csv(self.out / "cost.csv", results["cost"])
        results = json.loads(base.json_dumps(results))
        base.atomic_write_json(self.out / "results.json", results)
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
            base.atomic_write_json(tmp / "stages.json", result)
            return {"dp_boundaries": result["dp_boundaries"]}

        unit = self.ws.run_unit("stages", "division", spec, produce)
        return json.loads(unit.file("stages.json").read_text())

    def allocation(self, boundaries: list[float], probabilities: list[float]) -> dict:
        """The decoder widths (the config's, or :func:`allocate_decoder_widths`'), the separate
        UNets' widths, and the training FLOPs per image of every model (forward + backward); a unit."""
        c = self.c
        spec = {
            "preset": c.model_preset,
            "single_channels": c.single_channels,
            "encoder_channels": c.encoder_channels,
            "decoder_channels": list(c.decoder_channels),
            "separate_channels": list(c.separate_channels),
            "stage_probabilities": list(probabilities),
        }

        def produce(tmp: Path, work: Path) -> dict:
            if c.decoder_channels:
                decoders = {"widths": list(c.decoder_channels), "rule": "given in the config"}
            else:
                decoders = allocate_decoder_widths(c.model_preset, c.encoder_channels, c.single_channels, probabilities)
            separate = list(c.separate_channels or [c.single_channels] * c.num_stages)
            table = FlopTable(c.model_preset, c.encoder_channels, backward=True)
            per_stage = {
                "single": [table.unet(c.single_channels)] * c.num_stages,
                "multistage": [table.decoder(w) for w in decoders["widths"]],
                "separate": [table.unet(w) for w in separate],
            }
            training = {  # forward + backward FLOPs per training image; stage models: expectation over p_k
                model: {"per_stage": flops, "per_image": sum(p * f for p, f in zip(probabilities, flops))}
                for model, flops in per_stage.items()
            }
            result = {"decoder": decoders, "separate_widths": separate, "training_flops": training}
            base.atomic_write_json(tmp / "allocation.json", result)
            return {"widths": decoders["widths"]}

        unit = self.ws.run_unit("allocation", "widths", spec, produce)
        return json.loads(unit.file("allocation.json").read_text())

    # quality reference -----------------------------------------------------------
    def extractor(self):
        from diffcore import metrics

        if self.c.dataset == "digits":
            return metrics.digits_features(self.device)
        if self.c.fid_weights:
            return metrics.inception_features(self.c.fid_weights, self.device)
        return None

    def reference_statistics(self, pool: torch.Tensor) -> dict:
        """Feature statistics of the whole pool, and the floor's features: num_samples real images
        (a seeded draw), what a perfect model's samples of that size would score."""
        from diffcore import metrics

        extractor = self.extractor()
        if extractor is None:
            return {"stats": None, "extractor": None}
        stats = metrics.feature_statistics(pool, extractor, device=self.device)
        rows = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(12345))[: self.c.num_samples]
        with torch.no_grad():
            floor_features = extractor(pool[rows].to(self.device)).double().cpu().numpy()
        return {"stats": stats, "extractor": extractor, "floor_features": floor_features}

    # training and evaluation -------------------------------------------------------
    def model_spec(self, model: str, boundaries: list[float], allocation: dict) -> dict:
        c = self.c
        if model == "single":
            return {"name": "ddpmpp", "preset": c.model_preset, "model_channels": c.single_channels}
        if model == "multistage":
            return {
                "name": "multistage",
                "preset": c.model_preset,
                "model_channels": c.encoder_channels,
                "sigma_boundaries": [float(b) for b in boundaries],
                "decoder_channels": list(allocation["decoder"]["widths"]),
            }
        return {
            "name": "multistage",
            "preset": c.model_preset,
            "shared_encoder": False,
            "sigma_boundaries": [float(b) for b in boundaries],
            "decoder_channels": list(allocation["separate_widths"]),
        }

    def train_and_evaluate(
        self, model: str, steps: int, boundaries: list[float], allocation: dict, train: torch.Tensor, reference: dict
    ) -> dict:
        from diffcore import train as trainer

        c = self.c
        model_spec = self.model_spec(model, boundaries, allocation)
        loss_options = {} if model == "single" else {"stage_boundaries": [float(b) for b in boundaries]}
        spec = {
            "model": model_spec,
            "loss_options": loss_options,
            "steps": steps,
            "dataset": c.dataset,
            "num_train": c.num_train,
            "subset_seed": c.subset_seed,
            "batch_size": c.batch_size,
            "lr": c.learning_rate,
            "lr_warmup_images": c.lr_warmup_images,
            "seed": c.seed,
            "num_samples": c.num_samples,
            "sample_seed_start": c.sample_seed_start,
            "sampler_steps": c.sampler_steps,
            "loss_eval": [c.loss_draws_per_stage, c.loss_eval_seed],
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
                loss_options=loss_options,
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
                **self.cost_once(model_spec, denoiser),
                "stage_loss": self.stage_loss(denoiser, train, boundaries, tmp),
            }
            evaluation.update(self.quality(denoiser, reference, tmp))
            base.atomic_write_json(tmp / "evaluation.json", evaluation)
            return {"fd": evaluation.get("frechet_distance")}

        unit = self.ws.run_unit("models", f"{model}-{steps}", spec, produce)
        evaluation = json.loads(unit.file("evaluation.json").read_text())
        evaluation["unit"] = str(unit.path.relative_to(self.out))
        log.info(
            "%s at %d steps: %s", model, steps, {k: evaluation.get(k) for k in ("frechet_distance", "train_img_per_s")}
        )
        return evaluation

    def cost_once(self, model_spec: dict, denoiser) -> dict:
        """:meth:`cost` of the architecture ``model_spec``, computed once per run (it depends on the
        architecture only, not on the weights: every checkpoint of a model has the same; counting
        the FLOPs of one sample under FlopCounterMode took about 0.75 CPU-s per checkpoint)."""
        cache = self.__dict__.setdefault("_cost_cache", {})
        key = json.dumps(model_spec, sort_keys=True)
        if key not in cache:
            cache[key] = self.cost(denoiser)
        return dict(cache[key])

    def cost(self, denoiser) -> dict:
        """Parameters (all, and those one denoiser call uses per stage) and sampling FLOPs per sample."""
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

    def stage_loss(self, denoiser, train: torch.Tensor, boundaries: list[float], tmp: Path) -> list[dict]:
        """EDM-weighted loss ``lambda(sigma) |D(x0 + sigma n) - x0|^2`` (pixel mean) per stage on
        :func:`stratified_stage_draws` (the same draws for every model and checkpoint), with a
        bootstrap interval over the draws; the per-draw losses are kept (``stage_loss.pt``) for
        paired differences between models."""
        c = self.c
        draws = stratified_stage_draws(train, boundaries, c.loss_draws_per_stage, c.loss_eval_seed)
        edges = [0.0] + list(boundaries) + [None]  # None: unbounded above (results are strict JSON)
        rows, per_draw = [], []
        with torch.no_grad():
            for k, (x0, sigma, noise) in enumerate(draws):
                losses = []
                for part in torch.arange(x0.shape[0]).split(256):
                    x = (x0[part] + sigma[part, None, None, None] * noise[part]).to(self.device)
                    s = sigma[part].to(self.device)
                    error = (denoiser(x, s) - x0[part].to(self.device)).square().flatten(1).mean(1)
                    losses.append((denoiser.loss_weight(s) * error).cpu())
                values = torch.cat(losses).double()
                per_draw.append(values)
                rows.append(
                    {
                        "stage": k,
                        "sigma_range": [edges[k], edges[k + 1]],
                        "count": int(values.numel()),
                        "loss": intervals.bootstrap_interval(values.numpy()).as_dict(),
                    }
                )
        torch.save(torch.stack(per_draw), tmp / "stage_loss.pt")
        return rows

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
        with torch.no_grad():
            features = reference["extractor"](samples.to(self.device)).double().cpu()
        torch.save(features, tmp / "features.pt")  # for the paired bootstrap across models
        out["frechet_distance"] = metrics.frechet_distance(reference["stats"], features)
        if c.dataset == "digits":
            with torch.no_grad():
                probs = torch.softmax(metrics.digits_classifier(self.device).logits(samples.to(self.device)), 1).cpu()
            histogram = torch.bincount(probs.argmax(1), minlength=10).double() / probs.shape[0]
            entropy = -(histogram[histogram > 0] * histogram[histogram > 0].log()).sum() / math.log(10)
            out.update(classifier_confidence=float(probs.max(1).values.mean()), class_entropy=float(entropy))
        return out

    # intervals and claims ------------------------------------------------------------
    def quality_intervals(self, evaluations: dict, reference: dict) -> dict:
        """FD intervals by bootstrap over samples (the same resampled seeds for every model and
        checkpoint: one generator seed), written into each evaluation as ``frechet_interval``;
        returns the features for the paired claims and the floor's interval."""
        from diffcore.metrics.frechet import sqrt_psd

        c = self.c
        if reference["stats"] is None:
            return {"floor": None, "features": {}}
        stats = reference["stats"]
        ref_mean = stats.mean.double().numpy()
        ref_cov = stats.covariance.double()
        ref_sqrt, ref_trace = sqrt_psd(ref_cov).numpy(), float(ref_cov.trace())

        def fd_of(features: np.ndarray) -> Callable[[np.ndarray], float]:
            return lambda rows: _frechet_from_features(features[rows.astype(int)], ref_mean, ref_sqrt, ref_trace)

        self._fd_of = fd_of
        index = np.arange(c.num_samples, dtype=np.float64)
        features = {}
        for model, points in evaluations.items():
            for point in points:
                feats = torch.load(self.out / point["unit"] / "features.pt").numpy()
                features[(model, point["steps"])] = feats
                point["frechet_interval"] = intervals.bootstrap_interval(
                    index, fd_of(feats), resamples=c.fd_resamples
                ).as_dict()
        floor = intervals.bootstrap_interval(index, fd_of(reference["floor_features"]), resamples=c.fd_resamples)
        self._features = features
        return {"floor": floor.as_dict()}

    def paired_difference(self, a: tuple[str, int], b: tuple[str, int]) -> intervals.Interval:
        """FD(a) - FD(b) with a bootstrap interval over the shared sample seeds (paired)."""
        fa, fb = self._fd_of(self._features[a]), self._fd_of(self._features[b])
        index = np.arange(self.c.num_samples, dtype=np.float64)
        return intervals.bootstrap_interval(index, lambda rows: fa(rows) - fb(rows), resamples=self.c.fd_resamples)

    def claims(self, evaluations: dict, quality: dict) -> dict:
        """The paper's claim on the digits, decided on paired FD intervals beside compute ratios.

        ``<model>_less_compute_for_quality`` (FLOPs axis) and ``..._less_cpu_for_quality`` (CPU-seconds):
        at the last checkpoint (equal training images) the model's FD is clearly below the single
        UNet's (paired interval of the difference below 0) while its cumulative training compute is
        at most the single UNet's (FLOPs are counted exactly; CPU-seconds are measured, so their
        ratio is decided on an interval: :meth:`cpu_claim`); then it reaches the single UNet's final quality with less
        compute. ``reaches_single_final_at``: the first checkpoint whose FD is not clearly above the
        single UNet's final FD (interval of the difference reaching 0 or below), with its compute
        as a fraction of the single UNet's final compute."""
        if not getattr(self, "_features", None):
            return {}
        last = self.c.eval_steps[-1]
        single = evaluations["single"][-1]
        out = {}
        for model in ("multistage", "separate"):
            points = evaluations[model]
            final = points[-1]
            diff = self.paired_difference((model, last), ("single", last))
            flops_ratio = final["train_flops"] / single["train_flops"]
            cpu_ratio = final["train_cpu_s_cumulative"] / single["train_cpu_s_cumulative"]
            reach = None
            for point in points:
                d = self.paired_difference((model, point["steps"]), ("single", last))
                if d.low <= 0:
                    reach = {
                        "steps": point["steps"],
                        "fd_difference": d.as_dict(),
                        "flops_fraction": point["train_flops"] / single["train_flops"],
                        "cpu_fraction": point["train_cpu_s_cumulative"] / single["train_cpu_s_cumulative"],
                    }
                    break
            better = intervals.clearly_below(diff, intervals.Interval(0.0, 0.0, 0.0))
            out[f"{model}_less_compute_for_quality"] = intervals.claim(
                better and flops_ratio <= 1.0,
                fd_difference=diff,
                train_flops_ratio=flops_ratio,
                reaches_single_final_at=reach,
            )
            out[f"{model}_less_cpu_for_quality"] = self.cpu_claim(
                better, diff, cpu_ratio, points, evaluations["single"]
            )
        diff = self.paired_difference(("multistage", last), ("separate", last))
        out["multistage_better_than_separate"] = intervals.claim(
            intervals.clearly_below(diff, intervals.Interval(0.0, 0.0, 0.0)), fd_difference=diff
        )
        sampling = evaluations["multistage"][-1]["flops_per_sample"] / single["flops_per_sample"]
        out["multistage_cheaper_sampling"] = intervals.claim(sampling < 1.0, sampling_flops_ratio=sampling)
        out["stage_loss_difference"] = self.stage_loss_differences(evaluations)
        return out

    def cpu_claim(self, better: bool, diff: intervals.Interval, cpu_ratio: float, points: list, single: list) -> dict:
        """The CPU-seconds claim, decided on an interval: each stretch of training between two
        checkpoints is one measurement of the CPU-seconds per training image; the ratio of the
        model's to the single UNet's (geometric means, :func:`intervals.ratio_interval`) must lie
        at or below 1 with its whole interval, beside the FD difference clearly below 0. A
        ratio whose interval reaches above 1 is not "less CPU" (process time moves with the load
        of the machine, so the point ratio alone could flip between runs)."""
        per_image = [self._cpu_per_image(p) for p in (points, single)]
        if min(len(costs) for costs in per_image) < 2:
            return intervals.claim(
                False,
                fd_difference=diff,
                train_cpu_ratio=cpu_ratio,
                reason="fewer than two trained stretches with CPU-seconds (resumed from finished units?)",
            )
        ratio = intervals.ratio_interval(*per_image)
        return intervals.claim(
            better and ratio.high <= 1.0,
            fd_difference=diff,
            train_cpu_ratio=cpu_ratio,
            cpu_per_image_ratio=ratio,
        )

    def _cpu_per_image(self, points: list) -> list[float]:
        """CPU-seconds per training image of each checkpoint's stretch that trained in this run."""
        return [
            p["train_cpu_s"] / (p["trained_steps"] * self.c.batch_size)
            for p in points
            if p.get("trained_steps") and p["train_cpu_s"] > 0
        ]

    def stage_loss_differences(self, evaluations: dict) -> dict:
        """Per stage, loss(model) - loss(single) at the last checkpoint, paired over the draws."""
        single = torch.load(self.out / evaluations["single"][-1]["unit"] / "stage_loss.pt").numpy()
        out = {}
        for model in ("multistage", "separate"):
            other = torch.load(self.out / evaluations[model][-1]["unit"] / "stage_loss.pt").numpy()
            out[model] = [
                intervals.bootstrap_interval(
                    np.stack([other[k], single[k]], 1), lambda a: float((a[:, 0] - a[:, 1]).mean())
                ).as_dict()
                for k in range(single.shape[0])
            ]
        return out

    # report ------------------------------------------------------------------------
    def cost_rows(self, evaluations: dict) -> list[dict]:
        rows = []
        for model, points in evaluations.items():
            last = points[-1]
            fd = last.get("frechet_interval") or {}
            rows.append(
                {
                    "model": model,
                    "parameters": last["parameters"],
                    "parameters_per_call": "/".join(str(p) for p in last["parameters_per_call"]),
                    "train_mflops_per_image": last["train_flops"] / last["images"] / 1e6,
                    "train_img_per_cpu_s": last["images"] / last["train_cpu_s_cumulative"],
                    "train_cpu_s": last["train_cpu_s_cumulative"],
                    "sampling_mflops_per_sample": last["flops_per_sample"] / 1e6,
                    "sampling_cpu_ms_per_sample": 1e3 * last["sampling_cpu_s"] / self.c.num_samples,
                    "frechet_distance": fd.get("value"),
                    "frechet_low": fd.get("low"),
                    "frechet_high": fd.get("high"),
                }
            )
        return rows

    def figures(self, stages: dict, evaluations: dict, floor) -> None:
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter

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
        base.atomic_save_figure(fig, self.out / "similarity.png")

        if not all(p.get("frechet_interval") for points in evaluations.values() for p in points):
            return
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for model, points in evaluations.items():
            fd = np.array([[p["frechet_interval"][k] for k in ("value", "low", "high")] for p in points])
            for ax, key, scale in ((axes[0], "train_flops", 1e-12), (axes[1], "train_cpu_s_cumulative", 1.0)):
                x = np.array([p[key] for p in points]) * scale
                (line,) = ax.plot(x, fd[:, 0], "o-", label=model)
                ax.fill_between(x, fd[:, 1], fd[:, 2], color=line.get_color(), alpha=0.2)
            loss = np.array([[s["loss"][k] for k in ("value", "low", "high")] for s in points[-1]["stage_loss"]])
            offset = {"single": -0.2, "multistage": 0.0, "separate": 0.2}[model]
            axes[2].errorbar(
                np.arange(len(loss)) + offset,
                loss[:, 0],
                yerr=[loss[:, 0] - loss[:, 1], loss[:, 2] - loss[:, 0]],
                fmt="o",
                capsize=3,
                label=model,
            )
        for ax, label in ((axes[0], "training TFLOPs (forward + backward)"), (axes[1], "training CPU-seconds")):
            if floor is not None:
                ax.axhline(floor["value"], color="gray", ls=":", label=f"real images ({self.c.num_samples})")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("Frechet distance (digits features)" if self.c.dataset == "digits" else "FID")
            ax.legend(fontsize=7)
        axes[0].set_title("FD (95% bootstrap band over samples) against training FLOPs", fontsize=9)
        axes[1].set_title("CPU-seconds: process time, one thread", fontsize=9)
        axes[2].set_xticks(range(self.c.num_stages))
        axes[2].set_xlabel("stage (lowest noise first)")
        axes[2].set_ylabel("EDM-weighted loss (95% interval)")
        axes[2].set_title(f"per-stage loss at {self.c.eval_steps[-1]} steps", fontsize=9)
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        base.atomic_save_figure(fig, self.out / "quality.png")


def _cumulate(points: list[dict], flops_per_image: float) -> None:
    """Cumulative training CPU-seconds and FLOPs at each checkpoint (``train_cpu_s`` is the time
    of the steps trained since the previous checkpoint; FLOPs are images x FLOPs per image, for
    the stage models the expectation over the stage law)."""
    total = 0.0
    for point in points:
        total += point["train_cpu_s"]
        point["train_cpu_s_cumulative"] = total
        point["train_flops"] = point["images"] * flops_per_image


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


# Writes results.json, cost.csv, similarity.png, quality.png into the run folder.
STUDY = base.Study(
    NAME, MultistageConfig, takes_hooks=False, presets=PRESETS, make=base.standard_make(_Study, hooks=False)
)
run, run_preset = STUDY.run, STUDY.run_preset
