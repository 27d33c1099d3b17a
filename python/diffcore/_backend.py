"""Backend selection shared by every op.

Each op names the backends it implements and, per device type, the order in which ``auto`` tries
them. ``auto`` takes the first one that is usable for the tensors' device; ``DIFFCORE_BACKEND``
overrides ``auto`` globally. Asking for a backend that cannot run on the given device is an error
that names the backend and the device, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import torch

from diffcore import _env
from diffcore._ext import extension

BACKENDS = ("reference", "cpu", "cuda", "triton")


class BackendUnusable(RuntimeError, ValueError):
    """A backend asked for (``backend=``, ``DIFFCORE_BACKEND``) that cannot run on the tensors'
    device: a bad setting, shown by the CLI as one line naming it (also a RuntimeError, as before)."""


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    """True when the triton package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unusable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got device {device}"
        return None if extension(required=False) is not None else "diffcore._C is not built"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got device {device}"
        ext = extension(required=False)
        if ext is None:
            return "diffcore._C is not built"
        if not ext.build_info()["cuda"]:
            return "diffcore._C was built without CUDA kernels (DIFFCORE_CUDA=OFF or no nvcc)"
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed (pip install 'diffcore[triton]')"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return (
            f"backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported; got device {device}"
        )
    return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'"


@dataclass(frozen=True)
class OpBackends:
    """The backends an op implements and the order ``auto`` tries them in, per device type.

    ``auto_order`` lists only backends verified against the reference on that device type: a
    CUDA kernel that has not yet run on a GPU stays out of it (it can still be asked for by name).
    """

    op: str
    implemented: tuple[str, ...]
    auto_order: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def resolve(self, requested: str, device: torch.device) -> str:
        """The backend to run for ``requested`` ('auto' or a name) on ``device``."""
        requested = (requested or "auto").lower()
        if requested == "auto":
            forced = _env.forced_backend()
            if forced is not None:
                return self._check(forced, device, source=f"{_env.BACKEND_VAR}={forced}")
            for name in self.auto_order.get(device.type, ()):
                if name in self.implemented and why_unusable(name, device) is None:
                    return name
            return self._check("reference", device, source="auto")
        return self._check(requested, device, source=f"backend={requested!r}")

    def _check(self, name: str, device: torch.device, source: str) -> str:
        if name not in BACKENDS:
            raise ValueError(f"{self.op}: {source}: unknown backend; expected 'auto' or one of {', '.join(BACKENDS)}")
        if name not in self.implemented:
            raise ValueError(
                f"{self.op}: {source}: this op has no {name!r} backend (it has {', '.join(self.implemented)})"
            )
        reason = why_unusable(name, device)
        if reason is not None:
            raise BackendUnusable(f"{self.op}: {source}: {reason}")
        return name
