"""Every op has the same shape: a private module ``diffcore.ops._<op>`` with ``BACKENDS`` and a
``RUNNERS`` table keyed by every implemented backend, CPU host code in ``_<op>_cpu`` and CUDA
launchers in ``_<op>_cuda``; ``diffcore.ops`` exports the functions."""
from __future__ import annotations

import importlib

import pytest

import diffcore.ops

OPS = {"attention": ("attention", "attention_and_jvp"),
       "empirical_denoise": ("empirical_denoise", "empirical_denoise_with_logz"),
       "knn": ("knn",),
       "local_denoise": ("local_denoise", "wiener_masks"),
       "sampler_step": ("sampler_step",)}


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_module_shape(op):
    module = importlib.import_module(f"diffcore.ops._{op}")
    for suffix in ("cpu", "cuda"):
        importlib.import_module(f"diffcore.ops._{op}_{suffix}")
    assert set(module.RUNNERS) == set(module.BACKENDS.implemented)
    for name in OPS[op]:
        assert getattr(diffcore.ops, name) is getattr(module, name)
        assert callable(getattr(diffcore.ops, name))


@pytest.mark.parametrize("op", sorted(OPS))
def test_auto_on_cuda_takes_only_verified_backends(op):
    """No GPU kernel (CUDA C++ or Triton) has run on a GPU yet: auto on CUDA tensors must not pick
    one (README: auto picks only verified backends)."""
    module = importlib.import_module(f"diffcore.ops._{op}")
    assert module.BACKENDS.auto_order["cuda"] == ("reference",)
