"""Test setup: Triton interpreter on CPU-only machines, and skips for unavailable hardware.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffcore import _backend  # noqa: E402
from diffcore._ext import extension  # noqa: E402


def _import_installed_kernels_package() -> None:
    """The repository's ``kernels/`` folder (shipped as ``diffcore.kernels``) shadows the Hugging Face
    ``kernels`` package, which transformers >= 5 requires and diffusers then imports, whenever Python
    runs from the repository root (``python -m pytest`` puts it first on ``sys.path``). Import the
    installed package first, with the root off the path, so that diffusers finds it; nothing in
    diffcore imports a top-level ``kernels``."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        if "kernels" not in sys.modules and importlib.util.find_spec("kernels") is not None:
            import kernels  # noqa: F401
    except ImportError:
        pass  # a broken optional package: the diffusers tests will say so
    finally:
        sys.path[:] = saved


_import_installed_kernels_package()


def _cuda_ext_ready() -> bool:
    ext = extension(required=False)
    return bool(HAS_GPU and ext is not None and ext.build_info()["cuda"] and ext.cuda_available())


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    skip_cuda_ext = pytest.mark.skip(reason="needs diffcore._C built with CUDA and a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "cuda_ext" in item.keywords and not _cuda_ext_ready():
            item.add_marker(skip_cuda_ext)
        if "triton" in item.keywords and not _backend.triton_installed():
            item.add_marker(skip_triton)


@pytest.fixture
def device() -> torch.device:
    """The device GPU-capable tests run on: CUDA when present, else CPU."""
    return torch.device("cuda" if HAS_GPU else "cpu")


def _force_screen(value, monkeypatch):
    from diffcore import _cpu_caps

    monkeypatch.setenv(_cpu_caps.SCREEN_VAR, value)
    _cpu_caps.screen_choice.cache_clear()
    yield value
    _cpu_caps.screen_choice.cache_clear()


@pytest.fixture(params=["bf16", "fp32"])
def forced_screen(request, monkeypatch):
    """Runs a test with DIFFCORE_CPU_SCREEN forced to each float screening precision (bf16, fp32):
    both CPU paths run on any machine (bf16 is slow, but correct, where it is not native)."""
    yield from _force_screen(request.param, monkeypatch)


@pytest.fixture(params=["int8", "bf16", "fp32"])
def forced_knn_screen(request, monkeypatch):
    """DIFFCORE_CPU_SCREEN forced to each of knn's screening precisions (int8, bf16, fp32)."""
    yield from _force_screen(request.param, monkeypatch)


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) when a read blocks for 20 s, e.g. on a FIFO."""
    import signal

    def expire(signum, frame):
        raise TimeoutError("blocked: the read hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
