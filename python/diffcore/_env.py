"""Every ``DIFFCORE_*`` environment variable diffcore reads, in one place (listed in the README).

Build time (read by CMake through pyproject.toml):
    DIFFCORE_CUDA        AUTO (default) | ON | OFF: compile the CUDA kernels.
    DIFFCORE_CUDA_ARCHS  CUDA architectures, default "80;90".
Run time:
    DIFFCORE_BACKEND     force one backend for every op called with backend="auto":
                         reference | cpu | cuda | triton.
    DIFFCORE_PROGRESS    unset: progress bars on a terminal, periodic log lines otherwise;
                         0: neither; 1: bars even when output is not a terminal.
Benchmarks (bench/):
    DIFFCORE_BENCH_QUICK 1 runs every benchmark at small shapes (a smoke run in seconds).
"""
from __future__ import annotations

import os

BACKEND_VAR = "DIFFCORE_BACKEND"
PROGRESS_VAR = "DIFFCORE_PROGRESS"

RUNTIME_VARIABLES = {
    BACKEND_VAR: "force one backend (reference, cpu, cuda, triton) for every op called with backend='auto'",
    PROGRESS_VAR: "unset: bars on a terminal, log lines otherwise; 0: no progress; 1: bars always",
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
