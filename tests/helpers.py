"""Helpers shared by the tests (import ``from tests.helpers import ...``; conftest.py holds only
pytest hooks and fixtures)."""

from __future__ import annotations

import torch

from diffcore import _backend


def cpu_backends(implemented=("reference", "cpu", "triton")):
    """Backends a test can run on CPU tensors here (Triton through the interpreter, which
    tests/conftest.py turns on before triton is imported)."""
    return [b for b in implemented if _backend.why_unusable(b, torch.device("cpu")) is None]
