"""Public ops: input checks, backend dispatch and autograd.

Each op lives in ``diffcore/ops/<op>.py`` beside its reference ``diffcore/ref/<op>.py``, its
Triton kernel ``diffcore/kernels/<op>.py``, its C++/CUDA code ``csrc/<op>/``, its tests
``tests/ops/test_<op>.py`` and its benchmark ``bench/bench_<op>.py``. Every op takes
``backend="auto"`` or one of ``reference``, ``cpu``, ``cuda``, ``triton``.
"""
from __future__ import annotations

import importlib

# public name -> module under diffcore.ops (imported on first use)
_OPS = {
    "empirical_denoise": "empirical_denoise",
    "empirical_denoise_with_logz": "empirical_denoise",
    "knn": "knn",
    "attention": "attention",
    "sampler_step": "sampler_step",
}

__all__ = sorted(_OPS)


def __getattr__(name: str):
    module = _OPS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffcore.ops' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffcore.ops.{module}"), name)
