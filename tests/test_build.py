"""The build: the extension imports without a GPU, says what it contains, and the CUDA sources
compile wherever nvcc exists (CI has nvcc but no GPU)."""

from __future__ import annotations

import os
import shutil

import pytest

import diffcore
from diffcore._ext import extension


def test_extension_imports_and_reports_build():
    ext = extension()
    info = ext.build_info()
    assert set(info) >= {"cuda_mode", "cuda", "cuda_version", "cuda_archs", "openmp", "compiler", "ops"}
    assert diffcore.build_info() == dict(info)
    # cuda_available() must not raise on a machine without a GPU or driver.
    assert ext.cuda_available() in (True, False)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernels_were_compiled_when_nvcc_is_present():
    """DIFFCORE_CUDA=AUTO (the default) compiles the CUDA kernels when nvcc is found, and the
    statically linked cudart lets the module import here without a GPU."""
    info = extension().build_info()
    if info["cuda_mode"] == "OFF":
        pytest.skip("built with DIFFCORE_CUDA=OFF")
    assert info["cuda"] is True, "nvcc is on PATH but _C was built without CUDA kernels"
    archs = info["cuda_archs"].split(",")
    assert archs and all(archs), info["cuda_archs"]
    requested = os.environ.get("DIFFCORE_CUDA_ARCHS")  # set for the build and the test, it must match
    if requested:
        assert archs == requested.replace(";", ",").split(","), (info["cuda_archs"], requested)


def test_import_does_not_touch_cuda(monkeypatch):
    """Importing diffcore and its ops must not query CUDA (it breaks test collection elsewhere)."""
    import importlib
    import sys

    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or False)
    for name in [m for m in sys.modules if m == "diffcore" or m.startswith("diffcore.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.import_module("diffcore")
    importlib.import_module("diffcore.ops")
    assert calls == []


def test_every_binding_takes_keyword_arguments_only():
    """A swapped positional integer would silently corrupt memory: every binding of _C that takes
    arguments takes them by name (pybind11 signature ``(*, ...)``) and refuses positional calls."""
    ext = extension()
    bindings = [
        name
        for name in dir(ext)
        if not name.startswith("_") and callable(getattr(ext, name)) and name not in ("build_info", "cuda_available")
    ]
    assert len(bindings) >= 13, bindings
    for name in bindings:
        signature = getattr(ext, name).__doc__.splitlines()[0]
        assert signature.startswith(f"{name}(*, "), signature
    with pytest.raises(TypeError):
        ext.knn_cuda(0, 0, "float32", 1, 1, 1, 1, 1, 0, 0, 0, 0, 0)


def test_multiprocessor_count_is_asked_of_the_device():
    ext = extension()
    if not ext.build_info()["cuda"]:
        with pytest.raises(RuntimeError, match="without CUDA"):
            ext.cuda_multiprocessor_count(device=0)
    elif ext.cuda_available():
        assert ext.cuda_multiprocessor_count(device=0) > 0
