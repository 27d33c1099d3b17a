"""Fixtures of the closed-form denoiser tests."""

from __future__ import annotations

import pytest

from diffcore import _env


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny ops: one intra-op thread avoids barrier waits on a loaded shared machine; restored after."""
    with _env.torch_threads(1):
        yield
