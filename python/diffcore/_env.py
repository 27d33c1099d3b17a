"""Every ``DIFFCORE_*`` environment variable diffcore reads, in one place (listed in the README).

Build time (read by CMake through pyproject.toml):
    DIFFCORE_CUDA        AUTO (default) | ON | OFF: compile the CUDA kernels.
    DIFFCORE_CUDA_ARCHS  CUDA architectures, default "80;90".
Run time:
    DIFFCORE_BACKEND     force one backend for every op called with backend="auto":
                         reference | cpu | cuda | triton.
    DIFFCORE_PROGRESS    0 disables progress bars everywhere (default 1).
    DIFFCORE_LOCK_WAIT   seconds a run waits for an output folder another run holds (default 0).
Benchmarks (bench/):
    DIFFCORE_BENCH_QUICK 1 runs every benchmark at small shapes (a smoke run in seconds).
"""
from __future__ import annotations

import os

BACKEND_VAR = "DIFFCORE_BACKEND"
PROGRESS_VAR = "DIFFCORE_PROGRESS"

RUNTIME_VARIABLES = {
    BACKEND_VAR: "force one backend (reference, cpu, cuda, triton) for every op called with backend='auto'",
    PROGRESS_VAR: "0 disables progress bars everywhere (default 1)",
    "DIFFCORE_LOCK_WAIT": "seconds a run waits for an output folder another run holds (default 0: exit)",
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


def progress_enabled(progress: bool = True) -> bool:
    """Combine a call's ``progress`` flag with DIFFCORE_PROGRESS."""
    return bool(progress) and os.environ.get(PROGRESS_VAR, "1").strip() not in ("0", "false", "no")


class torch_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous count restored after
    (``n = 0``: unchanged). The one helper for pinning torch's intra-op threads."""

    def __init__(self, n: int):
        self.n, self.before = int(n), None

    def __enter__(self) -> "torch_threads":
        import torch

        if self.n > 0:
            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> bool:
        import torch

        if self.before is not None:
            torch.set_num_threads(self.before)
        return False
