"""Helpers the benchmarks share: peer ratios and GPU-synchronized timing.

Each benchmark times diffcore and its peer in the same run. Use ``record_ratio`` to store the
ratio and achieved throughput in ``extra_info``; ``bench/compare.py`` compares saved runs.
Set DIFFCORE_BENCH_QUICK=1 for small shapes (a smoke run of every benchmark in seconds).
(bench/ is on sys.path when pytest runs the benchmarks: import as ``from benchutil import ...``.)
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import time

import torch

QUICK = os.environ.get("DIFFCORE_BENCH_QUICK", "0") == "1"

# peer timings of this session, keyed by (group, case): filled by the peer benchmark, read by ours
_PEER_SECONDS: dict[tuple[str, str], float] = {}
# instruction-set caps that make a bf16 CPU stand in for an AVX2-only one (docs/knn.md)
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE",
                     "FAISS_OPT_LEVEL", "DIFFCORE_CPU_SCREEN")


def cpu_screen_info() -> dict:
    """CPU kind, screening precisions chosen for empirical_denoise (``screen_precision``) and knn
    (``knn_screen_precision``, with the int8 levels of its training rows) and why, caps in force."""
    from diffcore import _cpu_caps

    choice = _cpu_caps.screen_choice()
    return {"cpu_kind": choice.caps.kind, "screen_precision": choice.precision, "screen_reason": choice.reason,
            "knn_screen_precision": choice.knn_precision, "knn_screen_reason": choice.knn_reason,
            "int8_levels": choice.int8_levels,
            "isa_caps": {name: os.environ[name] for name in ISA_CAP_VARIABLES if name in os.environ}}


@functools.lru_cache(maxsize=1)
def fp32_gemm_gflops() -> float:
    """torch's fp32 GEMM rate on this machine now (1024 x 4096 x 3072, best of 3): the ceiling of an
    fp32 screening pass, measured in the same run as the benchmarks that quote it."""
    a, b = torch.randn(1024, 3072), torch.randn(4096, 3072)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        torch.mm(a, b.t())
        best = min(best, time.perf_counter() - start)
    return 2.0 * 1024 * 4096 * 3072 / best / 1e9


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
    info["load_average_1min"] = os.getloadavg()[0]
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


def record_cpu_screen(benchmark, flops: float | None = None) -> None:
    """For a CPU benchmark of knn / empirical_denoise: CPU kind, screening path chosen and why, and
    the achieved rate as a fraction of torch's fp32 GEMM rate measured in this run."""
    info = benchmark.extra_info
    info.update(cpu_screen_info())
    if flops:
        info["fp32_gemm_gflops"] = fp32_gemm_gflops()
        info["fraction_of_fp32_gemm"] = flops / benchmark.stats.stats.min / 1e9 / info["fp32_gemm_gflops"]


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so large buffers are unmapped on free
        return libc
    except OSError:
        return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mb(fn) -> float | None:
    """Peak resident growth of one call of ``fn`` in MB (None where /proc cannot be used)."""
    libc = _libc()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)  # give freed heap pages back, so that reusing them counts as growth
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident set
        before = _status_kb("VmRSS")
        fn()
        peak = _status_kb("VmHWM")
    except (OSError, KeyError):
        return None
    return max(0, peak - before) / 1024.0
