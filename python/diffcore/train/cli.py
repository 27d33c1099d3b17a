"""``diffcore train``: argparse wiring around ``train_from_config``.

Wire into the main CLI with ``add_train_arguments(subparser)`` and
``subparser.set_defaults(func=run_train_args)``; or run ``python -m diffcore.train ...``
(also under ``torchrun --nproc_per_node=N -m diffcore.train ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path

from diffcore import _folder
from diffcore._files import FileReadError, load_json
from diffcore.train.config import TrainConfig

log = logging.getLogger(__name__)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (a config file plus overrides)."""
    parser.add_argument("--config", help="JSON file with TrainConfig fields")
    parser.add_argument("--out-dir", help="run folder (checkpoints, metrics.jsonl, config.json)")
    parser.add_argument(
        "--resume", default="auto", help="'auto' (latest checkpoint if any), 'never', or a checkpoint folder"
    )
    parser.add_argument("--data", type=json.loads, help='dataset spec as JSON, e.g. \'{"name": "digits"}\'')
    parser.add_argument("--subset", type=int, help="train on the nested subset of this size")
    parser.add_argument("--subset-seed", type=int, help="seed of the nested subset")
    parser.add_argument("--model", type=json.loads, help='model spec as JSON, e.g. \'{"name": "ddpmpp"}\'')
    parser.add_argument("--loss", choices=("edm", "ddpm"))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto | cpu | cuda")
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A ``TrainConfig`` from ``--config`` (if given) with the command-line overrides applied."""
    values = _read_config_file(args.config) if args.config else {}
    for field in (
        "out_dir",
        "data",
        "model",
        "loss",
        "steps",
        "batch_size",
        "lr",
        "precision",
        "compile",
        "seed",
        "device",
        "checkpoint_every",
        "log_every",
    ):
        value = getattr(args, field, None)
        if value is not None:
            values[field] = value
    if args.subset is not None or args.subset_seed is not None:
        data = dict(values.get("data", {"name": "digits"}))
        if args.subset is not None:
            data["subset"] = args.subset
        if args.subset_seed is not None:
            data["subset_seed"] = args.subset_seed
        values["data"] = data
    if args.no_progress:
        values["progress"] = False
    return TrainConfig.from_dict(values)


def _read_config_file(path: str) -> dict:
    try:
        values = load_json(path, what="--config")
    except FileReadError as error:
        raise ValueError(str(error)) from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of TrainConfig fields")
    return values


def _claim_run_folder(out_dir: str):
    """Hold the run folder (lock, kind "train"; see diffcore._folder) on the main process only."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return _folder.claim_folder(out_dir, "train", argument="--out-dir", adopt=_earlier_train_run)


def _earlier_train_run(root: Path) -> bool:
    """Whether ``root`` (no run record) is a training run of an earlier diffcore version: a
    ``checkpoints/step_*`` folder whose manifest is in diffcore's checkpoint format. A folder that
    merely holds ``config.json``, ``metrics.jsonl`` or ``checkpoints/`` (a diffusers or Hugging
    Face model folder) is not one."""
    from diffcore.train.checkpoint import FORMAT

    return _folder.holds_manifest(root / "checkpoints", lambda m: isinstance(m, dict) and m.get("format") == FORMAT)


def run_train_args(args: argparse.Namespace) -> int:
    """Run training for parsed arguments (validated first, then the folder is claimed); returns
    the exit code."""
    from diffcore.train.trainer import train_from_config

    config = config_from_args(args)  # TrainConfig validates itself
    with _claim_run_folder(config.out_dir):
        result = train_from_config(config, resume=args.resume)
    log.info("finished at step %d (%d images); checkpoint %s", result.step, result.images_seen, result.checkpoint)
    return 0


def main_train(argv=None) -> int:
    """``diffcore train`` as a function: parse ``argv`` and train."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="diffcore train", description=__doc__))
    return run_train_args(parser.parse_args(argv))
