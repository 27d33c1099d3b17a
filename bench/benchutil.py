"""Helpers the benchmarks share: peer ratios and GPU-synchronized timing.

Each benchmark of diffcore times its peer inside the same test (``record_ratio(..., peer=fn)``), so
the ratio ``speedup_vs_peer`` does not depend on which tests ran before or in what order; the peer
benchmarks still run on their own for their absolute times. ``record_ratio`` also stores the
achieved throughput in ``extra_info``; ``bench/compare.py`` compares saved runs.
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

# peer timings of this session, keyed by (group, case): filled by the peer benchmarks, for extra
# (not compared) ratios such as knn's speedup_vs_faiss
_PEER_SECONDS: dict[tuple[str, str], float] = {}
# instruction-set caps that make a bf16 CPU stand in for an AVX2-only one (docs/knn.md)
ISA_CAP_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "OPENBLAS_CORETYPE",
    "FAISS_OPT_LEVEL",
    "DIFFCORE_CPU_SCREEN",
)


def cpu_screen_info() -> dict:
    """CPU kind, screening precisions chosen for empirical_denoise (``screen_precision``) and knn
    (``knn_screen_precision``, with the int8 levels of its training rows) and why, caps in force."""
    from diffcore import _cpu_caps

    choice = _cpu_caps.screen_choice()
    return {
        "cpu_kind": choice.caps.kind,
        "screen_precision": choice.precision,
        "screen_reason": choice.reason,
        "knn_screen_precision": choice.knn_precision,
        "knn_screen_reason": choice.knn_reason,
        "int8_levels": choice.int8_levels,
        "isa_caps": {name: os.environ[name] for name in ISA_CAP_VARIABLES if name in os.environ},
    }


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


def best_seconds(fn, device="cpu", rounds=3, warmup_rounds=1) -> float:
    """The shortest of ``rounds`` timed calls of ``fn`` after ``warmup_rounds`` untimed ones (the
    GPU synchronized after each): how ``run_timed``'s minimum is taken, for a peer timed inside a
    diffcore benchmark."""
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    for _ in range(warmup_rounds):
        fn()
        synchronize(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def record_ratio(
    benchmark,
    group: str,
    case: str,
    role: str,
    flops: float | None = None,
    nbytes: float | None = None,
    peer=None,
    device="cpu",
    peer_rounds: int = 3,
    peer_warmup_rounds: int = 1,
    no_peer_reason: str | None = None,
) -> None:
    """Store throughput and, for role ``diffcore``, ``speedup_vs_peer = peer_time / diffcore_time``
    with the peer ``peer()`` timed here, in the same test (``best_seconds``). A diffcore benchmark
    without a peer is an error (the ratio is what ``bench/compare.py`` guards) unless it says why
    there is none (``no_peer_reason``, e.g. the peer would not fit in memory)."""
    if role not in ("peer", "diffcore"):
        raise ValueError(f"role: expected 'peer' or 'diffcore', got {role!r}")
    if role == "diffcore" and no_peer_reason is not None:
        benchmark.extra_info["no_peer"] = no_peer_reason
    elif role == "diffcore" and peer is None:
        raise ValueError(f"{group} {case}: a diffcore benchmark must time its peer (record_ratio(..., peer=fn))")
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
    if role == "peer" or no_peer_reason is not None:
        return
    peer_time = best_seconds(peer, device, peer_rounds, peer_warmup_rounds)
    info["peer_seconds"] = peer_time
    info["speedup_vs_peer"] = peer_time / seconds


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


def interleaved_best(peer_fn, fn, rounds: int = 15, threads: int | None = None, warmup: bool = True) -> dict:
    """Best times of ``peer_fn`` and ``fn`` over ``rounds`` rounds that alternate them (peer, then
    ours, each round), after one warm-up call of each (none with ``warmup=False``), so that both see
    the same load: wall time (``peer_wall``, ``wall``) and the process's CPU time (``peer_cpu``,
    ``cpu``: user + system of all its threads). On a loaded machine the CPU time is the figure to
    trust (a descheduled thread stretches the wall time, not the CPU time; with 2 threads it also
    counts OpenMP spin-waiting).
    ``threads``: torch's thread count for the measurement (restored after)."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    best = {"peer_wall": float("inf"), "wall": float("inf"), "peer_cpu": float("inf"), "cpu": float("inf")}
    try:
        if warmup:
            peer_fn(), fn()
        for _ in range(rounds):
            for name, call in (("peer_", peer_fn), ("", fn)):
                wall, cpu = time.perf_counter(), time.process_time()
                call()
                best[name + "cpu"] = min(best[name + "cpu"], time.process_time() - cpu)
                best[name + "wall"] = min(best[name + "wall"], time.perf_counter() - wall)
    finally:
        torch.set_num_threads(saved)
    return best


def record_interleaved(benchmark, peer_fn, fn, rounds: int = 15) -> None:
    """Time ``fn`` with pytest-benchmark (``rounds`` rounds) and the peer against it in the same test,
    interleaved (:func:`interleaved_best`), with the torch threads in force and with one thread.
    extra_info: ``speedup_vs_peer`` (wall, this test's threads), ``speedup_vs_peer_cpu`` (CPU time),
    the same with ``_1thread``, the best times, and the 1-minute load average before and after."""
    info = benchmark.extra_info
    info["load_average_before"] = os.getloadavg()
    many = interleaved_best(peer_fn, fn, rounds)
    one = interleaved_best(peer_fn, fn, rounds, threads=1)
    run_timed(benchmark, fn, rounds=rounds)
    for suffix, best in (("", many), ("_1thread", one)):
        info.update(
            {
                f"peer_seconds{suffix}": best["peer_wall"],
                f"diffcore_seconds{suffix}": best["wall"],
                f"peer_cpu_seconds{suffix}": best["peer_cpu"],
                f"diffcore_cpu_seconds{suffix}": best["cpu"],
                f"speedup_vs_peer{suffix}": best["peer_wall"] / best["wall"],
                f"speedup_vs_peer_cpu{suffix}": best["peer_cpu"] / best["cpu"],
            }
        )
    info.update(threads=torch.get_num_threads(), load_average_after=os.getloadavg(), role="diffcore")


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
