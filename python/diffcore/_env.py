"""Every ``DIFFCORE_*`` environment variable diffcore reads, in one place (listed in the README).

Build time (read by CMake through pyproject.toml):
    DIFFCORE_CUDA        AUTO (default) | ON | OFF: compile the CUDA kernels.
    DIFFCORE_CUDA_ARCHS  CUDA architectures, default "80;90".
Run time:
    DIFFCORE_BACKEND     force one backend for every op called with backend="auto":
                         reference | cpu | cuda | triton.
    DIFFCORE_PROGRESS    unset: progress bars on a terminal, periodic log lines otherwise;
                         0: neither; 1: bars even when output is not a terminal.
    DIFFCORE_CPU_SCREEN  auto (default) | bf16 | fp32: precision of the screening GEMMs of the CPU
                         knn and empirical_denoise (auto: bf16 where bf16 matmul is native, else
                         fp32; see diffcore._cpu_caps). Read once per process.
    DIFFCORE_LOCK_WAIT   seconds a run waits for an output folder another run holds (default 0).
    DIFFCORE_SHARD       I/N: this process is shard I of N of a study (the CLI's --shard).
    DIFFCORE_MALLOC_TUNE 1 (default) | 0: whether the diffcore command and its worker processes
                         tell glibc's allocator to keep freed memory for reuse (tune_allocator).
Benchmarks (bench/):
    DIFFCORE_BENCH_QUICK 1 runs every benchmark at small shapes (a smoke run in seconds).
"""

from __future__ import annotations

import os

BACKEND_VAR = "DIFFCORE_BACKEND"
PROGRESS_VAR = "DIFFCORE_PROGRESS"
LOCK_WAIT_VAR = "DIFFCORE_LOCK_WAIT"
SHARD_VAR = "DIFFCORE_SHARD"
MALLOC_VAR = "DIFFCORE_MALLOC_TUNE"

RUNTIME_VARIABLES = {
    BACKEND_VAR: "force one backend (reference, cpu, cuda, triton) for every op called with backend='auto'",
    PROGRESS_VAR: "unset: bars on a terminal, log lines otherwise; 0: no progress; 1: bars always",
    "DIFFCORE_CPU_SCREEN": "auto (default), int8, bf16 or fp32: screening GEMM precision of the CPU knn and "
    "empirical_denoise (auto: knn in int8 where torch's int8 GEMM is probed exact; "
    "else bf16 where bf16 matmul is native, else fp32; int8 applies to knn only)",
    LOCK_WAIT_VAR: "seconds a run waits for an output folder another run holds (default 0: exit)",
    SHARD_VAR: "I/N: this process is shard I of N of a study (set by --shard; a plain run aggregates)",
    MALLOC_VAR: "1 (default) or 0: the diffcore command and its worker processes make glibc's allocator "
    "keep freed memory for reuse (trim threshold 256 MiB) instead of handing it back each step",
}
BENCH_VARIABLES = {
    "DIFFCORE_BENCH_QUICK": "1 runs every benchmark at small shapes (a smoke run in seconds)",
}
BUILD_VARIABLES = {
    "DIFFCORE_CUDA": "AUTO (default), ON or OFF: compile the CUDA kernels",
    "DIFFCORE_CUDA_ARCHS": "CUDA architectures to compile for, default '80;90'",
}


def forced_backend() -> str | None:
    """The backend named by DIFFCORE_BACKEND, or None when unset or empty."""
    value = os.environ.get(BACKEND_VAR, "").strip().lower()
    return value or None


def progress_requested(progress: bool = True) -> bool:
    """A call's ``progress`` flag combined with DIFFCORE_PROGRESS (``0`` turns progress off)."""
    return bool(progress) and os.environ.get(PROGRESS_VAR, "").strip().lower() not in ("0", "false", "no")


def progress_enabled(progress: bool = True) -> bool:
    """Whether to draw progress *bars*: progress requested, and stderr is a terminal (bar redraws
    would flood a log file) unless DIFFCORE_PROGRESS=1 forces them."""
    if not progress_requested(progress):
        return False
    if os.environ.get(PROGRESS_VAR, "").strip().lower() in ("1", "true", "yes"):
        return True
    return _stderr_is_terminal()


def _stderr_is_terminal() -> bool:
    import sys

    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


class torch_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous count restored after
    (``n = 0``: unchanged). The one helper for pinning torch's intra-op threads."""

    def __init__(self, n: int):
        self.n = int(n)
        self.before: int | None = None

    def __enter__(self) -> torch_threads:
        import torch

        if self.n > 0:
            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.before is not None:
            torch.set_num_threads(self.before)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD_BYTES = 256 << 20  # free memory kept at the top of the heap before handing it back
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks from this size up get their own mapping (glibc's dynamic maximum)


def tune_allocator() -> bool:
    """Make glibc's allocator keep up to 256 MiB of freed heap for reuse (``M_TRIM_THRESHOLD``) and
    serve blocks below 32 MiB from the heap (``M_MMAP_THRESHOLD``), unless DIFFCORE_MALLOC_TUNE=0.

    Why: a training step frees and allocates the same few-MiB activation tensors every step; with
    glibc's defaults the freed memory goes back to the OS and every step faults it in again (the
    quick reproducibility study's ensemble workers: 7.7 M page faults and 21 s of system time per
    run, 0.27 M and 1.6 s with these settings, same results; docs/experiments.md). Called by the
    ``diffcore`` command and its worker processes, not on import: it changes the whole process.
    Returns whether the settings were applied (False: turned off, or not glibc)."""
    if os.environ.get(MALLOC_VAR, "1").strip().lower() in ("0", "false", "no"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator keeps its defaults
        return False
    return (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
