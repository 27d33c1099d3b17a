"""The training loop: EDM/DDPM loss, Adam with warm-up, EMA, clipping, autocast, DDP, exact resume.

Determinism: the data order is a stream of per-epoch permutations drawn from (seed, epoch), so the
global batch of step s depends only on (seed, s); sigma, noise and flips come from one generator
seeded with ``seed`` and drawn for the whole global batch (every rank draws the same and keeps its
slice), so the trained weights do not depend on how the batch is split; each rank's global RNGs
(torch, numpy, python; used e.g. by dropout) are seeded with ``seed + rank`` and saved in every
checkpoint. Resuming restores all of it, so an interrupted and resumed CPU run ends with bitwise
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffcore import _folder
from diffcore._checks import check_state_dict_values
from diffcore._progress import Progress
from diffcore.data.registry import load_dataset
from diffcore.train import ddp
from diffcore.train.augment import AugmentPipe
from diffcore.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    flatten_optimizer_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    unflatten_optimizer_state,
    write_file_atomic,
)
from diffcore.train.config import TrainConfig, config_differences
from diffcore.train.ema import EMA
from diffcore.train.loss import build_loss, lr_at
from diffcore.train.registry import build_model

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer``: Adam of ``config`` or plain SGD (no momentum, no weight decay), with the
    multi-tensor (foreach) update on every device: on the CPU torch would otherwise loop over
    parameters one small tensor at a time (about 13 ops per parameter)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.0, foreach=True)
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.adam_eps, foreach=True)


class BatchOrder:
    """Global batch indices per step from a stream of per-epoch permutations of ``range(n)``:
    epoch e's permutation comes from ``numpy.random.default_rng([seed, e])``; step s takes
    stream positions ``[s B, (s + 1) B)`` (a batch may straddle two epochs)."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        self.num_items, self.batch_size, self.seed = int(num_items), int(batch_size), int(seed)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """``[B]`` int64 dataset indices of the global batch of ``step``."""
        parts, position, needed = [], step * self.batch_size, self.batch_size
        while needed:
            epoch, offset = divmod(position, self.num_items)
            take = min(needed, self.num_items - offset)
            parts.append(self.permutation(epoch)[offset : offset + take])
            position, needed = position + take, needed - take
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def epoch_of(self, step: int) -> tuple[int, int]:
        """(epoch, offset within it) of the first sample of ``step``."""
        return divmod(step * self.batch_size, self.num_items)


@dataclass
class TrainResult:
    """What a run produced: the trained and EMA models (unwrapped), where it stopped and wrote."""

    model: torch.nn.Module
    ema_model: torch.nn.Module
    step: int
    images_seen: int
    out_dir: Path
    checkpoint: Path | None
    resumed_from_step: int | None
    final_loss: float | None


class Trainer:
    """One training run for a ``TrainConfig`` on a ``DistributedContext`` (see module docstring)."""

    def __init__(self, config: TrainConfig, context: ddp.DistributedContext, resume: str = "auto"):
        self.config, self.context = config, context
        self.device = context.device
        self.out_dir = Path(config.out_dir)
        self.checkpoints_dir = self.out_dir / CHECKPOINTS_DIR
        for path in (self.checkpoints_dir, self.out_dir / METRICS_FILE, self.out_dir / "config.json"):
            _folder.check_inside(self.out_dir, path, "out_dir")  # never write or prune through a link
        self._check_runtime_options()
        self.local_batch = config.batch_size // context.world_size
        self.dataset = load_dataset(config.data).to(self.device)
        self.order = BatchOrder(len(self.dataset), config.batch_size, config.seed)
        self.loss_fn = build_loss(config.loss, config.loss_options)
        if getattr(self.loss_fn, "needs_reference", False):  # the whole training set, on every rank
            self.loss_fn.set_reference(self.dataset.all())
        self.augment_pipe = AugmentPipe(p=config.augment_p) if config.augment == "edm" else None

        torch.manual_seed(config.seed)  # same initial weights on every rank
        self.model = build_model(config.model).to(self.device)
        self.ema = EMA(self.model, config.ema_halflife_images, config.ema_rampup_ratio)
        self.optimizer = make_optimizer(self.model.parameters(), config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.noise_generator = torch.Generator(self.device).manual_seed(config.seed)
        self._seed_global_rngs(config.seed + context.rank)
        self.step = 0
        self.resumed_from_step = self._resume(resume)
        self.train_model = self._wrap(self.model)

    # ---- setup ---------------------------------------------------------------------------
    def _check_runtime_options(self) -> None:
        config, context = self.config, self.context
        if config.batch_size % context.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the world size {context.world_size}")
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device (use 'bf16' or 'fp32' on the CPU)")

    @staticmethod
    def _seed_global_rngs(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.config.compile:
            model = torch.compile(model)
        return model

    # ---- checkpoints ---------------------------------------------------------------------
    def _resume(self, resume: str) -> int | None:
        existing = list_checkpoints(self.checkpoints_dir)
        if resume == "never":
            if existing:
                raise CheckpointError(
                    f"{str(self.checkpoints_dir)!r} already holds checkpoints (latest step {existing[-1][0]}); "
                    "resume with resume='auto' or choose another out_dir"
                )
            path = None
        elif resume == "auto":
            path = latest_checkpoint(self.checkpoints_dir)
        else:
            path = Path(resume)
        if path is None:
            self._reset_metrics(None)
            return None
        self._load(path)
        self._reset_metrics(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return self.step

    def _load(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        saved = checkpoint.documents.get("config")
        if saved is not None:  # fields added later, at their defaults (checkpoints written before them)
            saved = {"lr_decay_images": 0, **saved}
        if saved is None or "state" not in checkpoint.documents:
            raise CheckpointError(f"checkpoint {str(path)!r} has no config.json or state.json")
        differences = config_differences(saved, self.config.to_dict())
        if differences:
            detail = "; ".join(
                f"{k}: checkpoint {saved.get(k)!r} vs now {self.config.to_dict().get(k)!r}" for k in differences
            )
            raise CheckpointError(f"config does not match checkpoint {str(path)!r}: {detail}")
        state = checkpoint.documents["state"]
        if state["world_size"] != self.context.world_size:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written by {state['world_size']} ranks, "
                f"this run has {self.context.world_size}"
            )
        if state["step"] > self.config.steps:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is at step {state['step']}, beyond steps={self.config.steps}"
            )
        for which in ("model", "ema"):
            check_state_dict_values(
                checkpoint.tensors.get(which, {}), self.model.state_dict(), f"checkpoint {str(path)!r} ({which})"
            )
        try:
            self.model.load_state_dict(checkpoint.tensors["model"])
            self.ema.load_state_dict(checkpoint.tensors["ema"])
            self.optimizer.load_state_dict(
                unflatten_optimizer_state(checkpoint.tensors["optimizer"], checkpoint.documents["optimizer"])
            )
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model/optimizer: {error}") from error
        rng = checkpoint.tensors["rng"]
        restore_rng_state(rng, state["rng"][self.context.rank], prefix=f"rank{self.context.rank}.")
        self.noise_generator.set_state(rng["noise_generator"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    def save(self) -> Path | None:
        """Write the checkpoint of the current step (rank 0 writes; every rank contributes RNG state)."""
        rank_rng = capture_rng_state(prefix=f"rank{self.context.rank}.")
        gathered = ddp.all_gather_objects(rank_rng, self.context)
        path = None
        if self.context.is_main:
            rng_tensors = {"noise_generator": self.noise_generator.get_state()}
            for tensors, _ in gathered:
                rng_tensors.update(tensors)
            optimizer_tensors, optimizer_meta = flatten_optimizer_state(self.optimizer.state_dict())
            epoch, offset = self.order.epoch_of(self.step)
            state = {
                "step": self.step,
                "images_seen": self.step * self.config.batch_size,
                "data_position": {"epoch": epoch, "offset": offset, "num_items": len(self.dataset)},
                "world_size": self.context.world_size,
                "rng": [doc for _, doc in gathered],
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "torch_version": torch.__version__,
            }
            path = save_checkpoint(
                self.checkpoints_dir,
                self.step,
                tensors={
                    "model": self.model.state_dict(),
                    "ema": self.ema.state_dict(),
                    "optimizer": optimizer_tensors,
                    "rng": rng_tensors,
                },
                documents={"config": self.config.to_dict(), "optimizer": optimizer_meta, "state": state},
            )
            prune_checkpoints(self.checkpoints_dir, self.config.keep_checkpoints, self.config.keep_steps)
            log.info("checkpoint step %d -> %s", self.step, path)
        ddp.barrier(self.context)
        return path

    # ---- metrics -------------------------------------------------------------------------
    def _reset_metrics(self, keep_through_step: int | None) -> None:
        """Start the metrics log afresh, or keep the lines up to the resumed step."""
        if not self.context.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_file_atomic(self.out_dir / "config.json", self.config.to_json().encode())
        path = self.out_dir / METRICS_FILE
        kept = []
        if keep_through_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= keep_through_step:
                        kept.append(line)
                except (ValueError, KeyError):  # a line cut by a kill
                    continue
        write_file_atomic(path, "".join(line + "\n" for line in kept).encode())

    def _log_metrics(self, record: dict) -> None:
        if self.context.is_main:
            with open(self.out_dir / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # ---- one step ------------------------------------------------------------------------
    def _draw_batch(self, step: int):
        """This rank's ``(x, class_labels, sigma, noise)`` for ``step`` (noise drawn globally)."""
        B, rank, b = self.config.batch_size, self.context.rank, self.local_batch
        indices = self.order.indices(step)
        sample_shape = self.dataset.sample_shape
        sigma = self.loss_fn.sample_sigma(B, self.noise_generator, self.device)
        noise = torch.randn((B, *sample_shape), generator=self.noise_generator, device=self.device)
        local = slice(rank * b, (rank + 1) * b)
        x, labels = self.dataset.batch(indices[local])
        if self.config.augment == "xflip":
            flips = torch.rand(B, generator=self.noise_generator, device=self.device)[local] < 0.5
            x = torch.where(flips.reshape((-1,) + (1,) * (x.ndim - 1)), x.flip(-1), x)
        class_labels = None
        if self.config.class_conditional:
            class_labels = F.one_hot(labels, self.dataset.num_classes).to(torch.float32)
            if self.config.label_dropout > 0:  # the all-zero null label, for classifier-free guidance
                draw = torch.rand(B, generator=self.noise_generator, device=self.device)[local]
                class_labels = class_labels * (draw >= self.config.label_dropout)[:, None].to(torch.float32)
        augment = {}
        if self.augment_pipe is not None:  # parameters drawn for the global batch, this rank's slice applied
            draws = self.augment_pipe.draw(B, self.noise_generator, self.device)
            x, augment["augment_labels"] = self.augment_pipe.apply(x, {k: v[local] for k, v in draws.items()})
        return x, class_labels, sigma[local], noise[local], augment

    def _set_lr(self, step: int, optimizer=None) -> None:
        """The learning rate of ``step`` (warm-up, decay) into the optimizer's param groups."""
        config = self.config
        lr = lr_at((step + 1) * config.batch_size, config.lr, config.lr_warmup_images, config.lr_decay_images)
        for group in (optimizer or self.optimizer).param_groups:
            group["lr"] = lr

    def autocast(self):
        """The autocast context of ``config.precision`` (a no-op for fp32)."""
        dtype = _AUTOCAST_DTYPES.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _train_step(self, step: int) -> torch.Tensor:
        config = self.config
        x, class_labels, sigma, noise, augment = self._draw_batch(step)
        images_after = (step + 1) * config.batch_size
        self._set_lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.train_model, x, sigma, noise, class_labels, **augment).mean()
        self.scaler.scale(loss).backward()
        if config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model, config.batch_size, images_after)
        return loss.detach()

    def step_once(self) -> torch.Tensor:
        """One optimizer step (no logging, no checkpoint); returns this rank's loss (a tensor)."""
        loss = self._train_step(self.step)
        self.step += 1
        return loss

    # ---- loop ----------------------------------------------------------------------------
    def run(self, progress=None) -> TrainResult:
        """Train to ``config.steps`` (logging, checkpoints). ``progress``: a
        :class:`diffcore._progress.Progress` to advance by one per step instead of this run's own
        bar / log lines (a study counting the steps of all its models)."""
        config, context = self.config, self.context
        own = progress is None
        if own:
            progress = Progress(
                config.steps,
                f"train {self.out_dir.name}",
                "steps",
                initial=self.step,
                enabled=config.progress and context.is_main,
            )
        checkpoint = None
        loss_sum, loss_count, last_loss = torch.zeros((), device=self.device), 0, None
        window_start, window_step = time.perf_counter(), self.step
        self.model.train()
        try:
            while self.step < config.steps:
                loss_sum += self.step_once()
                loss_count += 1
                progress.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    mean_loss = ddp.all_reduce_mean(loss_sum / loss_count, context).item()
                    images_per_s = self._log_window(mean_loss, window_start, window_step)
                    if own:
                        progress.note(f"loss {mean_loss:.4f}, {images_per_s:.0f} img/s")
                    last_loss = mean_loss
                    loss_sum, loss_count = torch.zeros((), device=self.device), 0
                    window_start, window_step = time.perf_counter(), self.step
                if self.checkpoint_due():
                    checkpoint = self.save()
        finally:
            if own:
                progress.close()
        if checkpoint is None and context.is_main:
            checkpoint = latest_checkpoint(self.checkpoints_dir)
        return self.result(checkpoint, last_loss)

    def checkpoint_due(self) -> bool:
        """Whether the current step gets a checkpoint: every ``checkpoint_every`` steps, the last
        step, and the ``keep_steps``."""
        config = self.config
        return self.step % config.checkpoint_every == 0 or self.step == config.steps or self.step in config.keep_steps

    def _log_window(self, mean_loss: float, window_start: float, window_step: int) -> float:
        """Check the window's mean loss and append it to metrics.jsonl; returns images/s."""
        if not np.isfinite(mean_loss):
            raise FloatingPointError(
                f"training diverged: the loss is {mean_loss} at step {self.step} "
                f"({self.out_dir}); lower the learning rate (lr={self.config.lr}) or "
                f"the loss options ({self.config.loss_options or 'defaults'})"
            )
        elapsed = time.perf_counter() - window_start
        images_per_s = (self.step - window_step) * self.config.batch_size / max(elapsed, 1e-9)
        self._log_metrics(
            {
                "step": self.step,
                "images": self.step * self.config.batch_size,
                "loss": mean_loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": images_per_s,
                "time": time.time(),
            }
        )
        return images_per_s

    def result(self, checkpoint: Path | None, last_loss: float | None) -> TrainResult:
        return TrainResult(
            self.model,
            self.ema.ema_model,
            self.step,
            self.step * self.config.batch_size,
            self.out_dir,
            checkpoint,
            self.resumed_from_step,
            last_loss,
        )


def train_from_config(config: TrainConfig, resume: str = "auto") -> TrainResult:
    """Train (or resume) the run ``config`` describes; works as-is under torchrun.

    ``resume``: 'auto' (continue from the latest checkpoint in ``out_dir/checkpoints`` if any;
    a corrupted one raises), 'never' (raise if checkpoints exist), or a checkpoint folder path.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    context = ddp.init_distributed(config.device)
    try:
        result = Trainer(config, context, resume).run()
    except BaseException:
        if context.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    ddp.shutdown_distributed(context)
    return result


def load_trained_model(path, which: str = "ema") -> torch.nn.Module:
    """The model of a checkpoint folder (or a run folder: its latest checkpoint), built from the
    saved model spec; ``which`` is 'ema' or 'model'. Returned in eval mode on the CPU."""
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        found = latest_checkpoint(path / CHECKPOINTS_DIR)
        if found is None:
            raise CheckpointError(f"no checkpoint under {str(path)!r}")
        path = found
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    checkpoint = load_checkpoint(path)
    config = checkpoint.documents.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no config.json with a model spec; it was not written by diffcore.train"
        )
    if which not in checkpoint.tensors:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {which}.safetensors")
    model = build_model(config["model"])
    check_state_dict_values(checkpoint.tensors[which], model.state_dict(), f"checkpoint {str(path)!r} ({which})")
    try:
        model.load_state_dict(checkpoint.tensors[which])
    except RuntimeError as error:  # missing keys, unexpected keys, wrong shapes
        detail = " ".join(str(error).split())
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {which}.safetensors does not fit the model of its config.json: {detail[:300]}"
        ) from None
    return model.eval()
