"""Helpers the benchmarks share: peer ratios and GPU-synchronized timing.

Each benchmark times diffcore and its peer in the same run. Use ``record_ratio`` to store the
ratio and achieved throughput in ``extra_info``; ``bench/compare.py`` compares saved runs.
Set DIFFCORE_BENCH_QUICK=1 for small shapes (a smoke run of every benchmark in seconds).
(bench/ is on sys.path when pytest runs the benchmarks: import as ``from benchutil import ...``.)
"""
from __future__ import annotations

import os

import torch

QUICK = os.environ.get("DIFFCORE_BENCH_QUICK", "0") == "1"

# peer timings of this session, keyed by (group, case): filled by the peer benchmark, read by ours
_PEER_SECONDS: dict[tuple[str, str], float] = {}


def synchronize(device) -> None:
    """Wait for queued GPU work so that wall-clock timing is honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_timed(benchmark, fn, device="cpu", rounds=3, warmup_rounds=1):
    """Time ``fn`` with pytest-benchmark, synchronizing the GPU after each call."""

    def call():
        out = fn()
        synchronize(device)
        return out

    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def record_ratio(benchmark, group: str, case: str, role: str, flops: float | None = None,
                 nbytes: float | None = None) -> None:
    """Store throughput and, for role 'diffcore', the speed ratio against the peer timed earlier
    in this session for the same (group, case): ``speedup = peer_time / diffcore_time``."""
    seconds = benchmark.stats.stats.min
    info = benchmark.extra_info
    info["role"], info["case"] = role, case
    if flops:
        info["gflops"] = flops / seconds / 1e9
    if nbytes:
        info["gbytes_per_s"] = nbytes / seconds / 1e9
    if role == "peer":
        _PEER_SECONDS[(group, case)] = seconds
    elif (group, case) in _PEER_SECONDS:
        info["speedup_vs_peer"] = _PEER_SECONDS[(group, case)] / seconds


def peer_seconds(group: str, case: str) -> float | None:
    """The peer's time recorded earlier in this session for (group, case), or None."""
    return _PEER_SECONDS.get((group, case))
