"""Worker for the 2-process gloo test: train, then shard a seed list, and write what this rank saw.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_worker.py CONFIG [STEPS]``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import tiny_model  # noqa: F401  (registers the model "tiny_denoiser"; this folder is on sys.path)
import torch
from safetensors.torch import save_file

from diffcore.train import TrainConfig, init_distributed, map_seeds, shard_seeds, train_from_config


def main(config_path: str, steps: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    config = TrainConfig.from_json_file(config_path)
    if steps is not None:  # stop early (a later launch resumes)
        config = config.replace(steps=int(steps))
    context = init_distributed(config.device)
    result = train_from_config(config)  # reuses the process group initialized above
    out = Path(config.out_dir)
    save_file(
        {k: v.contiguous() for k, v in result.model.state_dict().items()}, str(out / f"rank{context.rank}.safetensors")
    )
    squares = map_seeds(
        lambda seed: {"seed": seed, "square": seed * seed, "rank": context.rank}, list(range(100, 107)), context
    )
    report = {
        "rank": context.rank,
        "world_size": context.world_size,
        "backend": context.backend,
        "step": result.step,
        "resumed_from_step": result.resumed_from_step,
        "my_seeds": shard_seeds(range(100, 107), context.rank, context.world_size),
        "gathered": squares,
    }
    (out / f"rank{context.rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Everything is written and the group destroyed: leave without the interpreter's teardown, where
    # a rank was once aborted ("terminate called without an active exception", torch 2.13 gloo,
    # CI 2026-12-01) after a successful run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
