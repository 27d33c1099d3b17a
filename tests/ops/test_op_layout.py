"""Every op has the same shape: a private module ``diffcore.ops._<op>`` with ``BACKENDS`` and a
``RUNNERS`` table keyed by every implemented backend, CPU host code in ``_<op>_cpu`` and CUDA
launchers in ``_<op>_cuda``; ``diffcore.ops`` exports the functions."""

from __future__ import annotations

import importlib

import pytest

import diffcore.ops

OPS = {
    "attention": ("attention", "attention_and_jvp"),
    "empirical_denoise": ("empirical_denoise", "empirical_denoise_with_logz"),
    "knn": ("knn",),
    "local_denoise": ("local_denoise", "wiener_masks"),
    "sampler_step": ("sampler_step",),
}


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


def test_the_sampler_uses_only_the_public_ops_api():
    """diffcore.sampler reaches the fused step through ``diffcore.ops`` and ``diffcore.ops.steps``,
    never through a private ops module (``diffcore.ops._<op>``)."""
    import ast
    from pathlib import Path

    import diffcore.ops.steps
    import diffcore.sampler

    assert set(diffcore.ops.steps.__all__) <= set(dir(diffcore.ops.steps))
    for path in sorted(Path(diffcore.sampler.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            private = [m for m in modules if m.startswith("diffcore.ops._")]
            assert not private, f"{path.name} imports the private {private}; use diffcore.ops.steps"
