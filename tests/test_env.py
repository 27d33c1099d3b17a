"""diffcore._env: the documented DIFFCORE_* variables and the allocator settings of the command."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest

from diffcore import _env

README = Path(__file__).parents[1] / "README.md"


def test_every_variable_is_documented_in_the_readme():
    documented = set(re.findall(r"`(DIFFCORE_[A-Z0-9_]+)`", README.read_text()))
    declared = {**_env.RUNTIME_VARIABLES, **_env.BUILD_VARIABLES, **_env.BENCH_VARIABLES}
    assert set(declared) <= documented, sorted(set(declared) - documented)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_allocator_applies_on_glibc(monkeypatch):
    monkeypatch.delenv(_env.MALLOC_VAR, raising=False)
    assert _env.tune_allocator() is True


@pytest.mark.parametrize("value", ["0", "false", "no"])
def test_tune_allocator_can_be_turned_off(monkeypatch, value):
    monkeypatch.setenv(_env.MALLOC_VAR, value)
    assert _env.tune_allocator() is False
