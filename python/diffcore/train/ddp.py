"""Distributed data parallel through torchrun: gloo on the CPU, NCCL on CUDA.

``torchrun --nproc_per_node=N -m diffcore.train --config run.json`` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_distributed`` reads them. Without WORLD_SIZE the
run is a single process and nothing is initialized. ``shard_seeds`` / ``gather_by_seed`` split
sampling and evaluation work by seed across ranks and merge the results on every rank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``, and whether
    ``torch.distributed`` was initialized by us (``owns_group``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceUnavailable(RuntimeError, ValueError):
    """A device asked for that this machine does not have: a bad setting (shown by the CLI as one
    line), also a RuntimeError as before."""


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cuda' gets the local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device: {device!r} requested but CUDA is not available on this machine (use 'cpu' or 'auto')"
            )
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str = "auto") -> DistributedContext:
    """Initialize the process group from torchrun's environment (single process when WORLD_SIZE
    is unset or 1). Backend: NCCL when the device is CUDA, gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and "RANK" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={world_size} is set but RANK is not: start the processes with torchrun "
            "(it sets both), or unset WORLD_SIZE"
        )
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistributedContext(device=resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if dist.is_initialized():
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), local_rank, resolved, dist.get_backend(), owns_group=False
        )
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    log.info("initialized %s process group: rank %d of %d on %s", backend, rank, world_size, resolved)
    return DistributedContext(rank, world_size, local_rank, resolved, backend, owns_group=True)


def shutdown_distributed(context: DistributedContext) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if context.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; unchanged when not distributed)."""
    value = value.detach().clone()
    if context.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= context.world_size
    return value


def all_gather_objects(obj: Any, context: DistributedContext) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not context.distributed:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_seeds(seeds: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's seeds: ``seeds[rank::world_size]`` (balanced to within one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(seeds)[rank::world_size]


def gather_by_seed(local_results: dict[int, Any], seeds: Iterable[int], context: DistributedContext) -> list[Any]:
    """Merge every rank's ``{seed: result}`` and return the results in the order of ``seeds``
    (on every rank). Raises if a seed has no result or two ranks produced the same seed."""
    merged: dict[int, Any] = {}
    for part in all_gather_objects(dict(local_results), context):
        duplicate = set(part) & set(merged)
        if duplicate:
            raise RuntimeError(f"seeds computed on more than one rank: {sorted(duplicate)[:5]}")
        merged.update(part)
    seeds = list(seeds)
    missing = [s for s in seeds if s not in merged]
    if missing:
        raise RuntimeError(f"no result for seeds {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return [merged[s] for s in seeds]


def map_seeds(fn: Callable[[int], Any], seeds: Sequence[int], context: DistributedContext) -> list[Any]:
    """Run ``fn(seed)`` for this rank's share of ``seeds`` and return all results in seed order."""
    local = {seed: fn(seed) for seed in shard_seeds(seeds, context.rank, context.world_size)}
    return gather_by_seed(local, seeds, context)
