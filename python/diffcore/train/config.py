"""Training configuration: one frozen dataclass, JSON round-trip, and the resume compatibility check."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffcore._files import load_json

LOSSES = ("edm", "vp", "ddpm")
PRECISIONS = ("fp32", "fp16", "bf16")
AUGMENTATIONS = ("none", "xflip", "edm")
OPTIMIZERS = ("adam", "sgd")

# Fields that may change between a run and its resume (they do not change the trained weights).
RESUMABLE_CHANGES = frozenset(
    {"steps", "checkpoint_every", "keep_checkpoints", "keep_steps", "log_every", "progress", "out_dir", "device"}
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    data:  dataset spec for ``diffcore.data.load_dataset`` (``name``, fields, ``subset``, ``subset_seed``).
    model: model spec for ``diffcore.train.build_model`` (``name`` plus keyword arguments).
    steps: optimizer steps in total; ``batch_size`` is the global batch (split across ranks).
    optimizer: adam (default; ``betas``, ``adam_eps``) or sgd (plain gradient descent on the
        minibatch gradient, no momentum: the step is ``lr`` times the gradient).
    lr, lr_warmup_images: learning rate, linearly ramped up over the first images (EDM style).
    lr_decay_images: 0 (constant after the warm-up) or the image count at which a cosine decay of
        the learning rate from ``lr`` (at the end of the warm-up) reaches 0.
    ema_halflife_images, ema_rampup_ratio: EMA half-life in images, optionally capped at
        ``ratio * images_seen`` early in training (EDM's ema_halflife_kimg / ema_rampup_ratio).
    checkpoint_every, keep_checkpoints: a checkpoint every so many steps (and at the last), of which
        the ``keep_checkpoints`` newest are kept.
    keep_steps: steps at which a checkpoint is also written and never pruned (e.g. log-spaced steps
        for a study of the training dynamics); steps beyond ``steps`` are never reached.
    grad_clip: max global gradient norm (0 = no clipping).
    precision: fp32 | fp16 | bf16 (autocast; fp16 only on CUDA, with a gradient scaler).
    class_conditional: pass one-hot labels ``[B, num_classes]`` as ``class_labels`` to the model.
    augment: none | xflip (dataset x-flips) | edm (EDM's non-leaky pipeline at probability
        ``augment_p``, diffcore.train.augment; the model needs ``augment_dim = 9``).
    label_dropout: with class_conditional, the probability that a sample's label is replaced by the
        all-zero "null" label, so one model learns the conditional and the unconditional denoiser
        (classifier-free guidance; drawn from the run's noise generator for the global batch).
    """

    data: Mapping[str, Any] = field(default_factory=lambda: {"name": "digits"})
    model: Mapping[str, Any] = field(default_factory=lambda: {"name": "ddpmpp"})
    loss: str = "edm"
    loss_options: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_warmup_images: int = 10_000
    lr_decay_images: int = 0
    ema_halflife_images: float = 500_000.0
    ema_rampup_ratio: float | None = 0.05
    grad_clip: float = 0.0
    precision: str = "fp32"
    compile: bool = False
    augment: str = "none"
    augment_p: float = 0.12
    class_conditional: bool = False
    label_dropout: float = 0.0
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/train"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    keep_steps: tuple[int, ...] = ()
    log_every: int = 50
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "data", dict(self.data))
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "loss_options", dict(self.loss_options))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "keep_steps", tuple(self.keep_steps))
        self.validate()

    def validate(self) -> None:
        _choice("loss", self.loss, LOSSES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("augment", self.augment, AUGMENTATIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "ema_halflife_images"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= float(self.augment_p) <= 1:
            raise ValueError(f"augment_p must lie in [0, 1], got {self.augment_p}")
        if not 0.0 <= float(self.label_dropout) < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in self.keep_steps):
            raise ValueError(f"keep_steps must be positive integers, got {list(self.keep_steps)}")
        if len(set(self.keep_steps)) != len(self.keep_steps):
            raise ValueError(f"keep_steps must be distinct, got {list(self.keep_steps)}")
        if self.lr_warmup_images < 0 or self.grad_clip < 0 or self.lr_decay_images < 0:
            raise ValueError("lr_warmup_images, lr_decay_images and grad_clip must be >= 0")
        if self.lr_decay_images and self.lr_decay_images <= self.lr_warmup_images:
            raise ValueError(
                f"lr_decay_images ({self.lr_decay_images}) must exceed lr_warmup_images ({self.lr_warmup_images})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= 2**32 - 1:
            raise ValueError(
                f"seed: expected an integer in [0, 2**32 - 1] (torch's generator keeps 32 bits), got {self.seed!r}"
            )
        if self.loss_options.get("target", "clean") != "clean" and (self.augment != "none" or self.class_conditional):
            raise ValueError(
                f"loss_options target={self.loss_options['target']!r}: the empirical target is the "
                "posterior mean over the unaugmented, unconditional training set; it needs "
                "augment='none' and class_conditional=False"
            )
        if "name" not in self.data or "name" not in self.model:
            raise ValueError("data and model specs need a 'name'")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["keep_steps"] = list(self.keep_steps)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config fields: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path) -> TrainConfig:
        return cls.from_dict(load_json(path, what="training config"))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore=RESUMABLE_CHANGES) -> list[str]:
    """Keys whose values differ between two config dicts (JSON-normalized), ``ignore`` excepted."""
    saved = json.loads(json.dumps(saved))
    current = json.loads(json.dumps(current))
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [k for k in keys if saved.get(k) != current.get(k)]
