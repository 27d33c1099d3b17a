"""diffcore.train: EDM/DDPM training with EMA, atomic resumable checkpoints and torchrun DDP.

Entry points: ``train_from_config(TrainConfig(...))``, ``main_train(argv)`` /
``add_train_arguments(parser)`` for the CLI, ``build_model(spec)`` / ``register_model`` for models.
"""

from diffcore.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffcore.train.cli import add_train_arguments, main_train, run_train_args
from diffcore.train.config import TrainConfig
from diffcore.train.ddp import DistributedContext, gather_by_seed, init_distributed, map_seeds, shard_seeds
from diffcore.train.ema import EMA
from diffcore.train.loss import DDPMLoss, EDMLoss, build_loss
from diffcore.train.registry import build_model, register_model, registered_models
from diffcore.train.trainer import BatchOrder, Trainer, TrainResult, load_trained_model, train_from_config

__all__ = [
    "BatchOrder",
    "CheckpointError",
    "DDPMLoss",
    "DistributedContext",
    "EDMLoss",
    "EMA",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "add_train_arguments",
    "build_loss",
    "build_model",
    "gather_by_seed",
    "init_distributed",
    "load_checkpoint",
    "load_trained_model",
    "main_train",
    "map_seeds",
    "register_model",
    "registered_models",
    "run_train_args",
    "save_checkpoint",
    "shard_seeds",
    "train_from_config",
]
