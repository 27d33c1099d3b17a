"""diffcore: fused kernels and experiments for the science of diffusion-model generalization.

Subpackages (imported on demand, so ``import diffcore`` is cheap and never touches CUDA):
``ops`` (kernels with backend dispatch), ``ref`` (float64 references), ``sampler``, ``models``,
``denoisers``, ``data``, ``train``, ``analysis``, ``metrics``, ``experiments``.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"  # the one source of the version (pyproject.toml reads it; CHANGELOG.md)

_SUBPACKAGES = (
    "ops",
    "ref",
    "sampler",
    "models",
    "denoisers",
    "data",
    "train",
    "analysis",
    "metrics",
    "experiments",
    "kernels",
)


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"diffcore.{name}")
    raise AttributeError(f"module 'diffcore' has no attribute {name!r}")


def build_info() -> dict:
    """What the compiled extension contains (CUDA, OpenMP, registered ops); ``{}`` if not built."""
    from diffcore._ext import extension

    ext = extension(required=False)
    return dict(ext.build_info()) if ext is not None else {}
