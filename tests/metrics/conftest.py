"""Fixtures of the metrics tests: the embedded digits and the stand-ins of standins.py."""

from __future__ import annotations

import pytest

from diffcore.data import load_digits


@pytest.fixture(scope="session")
def digits():
    images, _ = load_digits()
    return images
