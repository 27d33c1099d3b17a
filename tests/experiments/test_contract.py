"""The study contract as code: studies sit on shared floors and never import one another."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from diffcore.experiments import EXPERIMENTS

_PACKAGE = Path(importlib.util.find_spec("diffcore").origin).parent


def _imported_modules(path: Path) -> set[str]:
    """Every ``diffcore...`` module a file imports (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("diffcore")}


def _file_of(module: str) -> Path:
    return _PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_no_study_imports_another_study(name):
    own = EXPERIMENTS[name]
    others = set(EXPERIMENTS.values()) - {own}
    crossing = _imported_modules(_file_of(own)) & others
    assert not crossing, f"{own} imports the studies {sorted(crossing)}; move what they share down a floor"


@pytest.mark.parametrize("shared", ["_stack", "hooks", "base", "_vector", "plotting"])
def test_shared_modules_import_no_study(shared):
    studies = set(EXPERIMENTS.values())
    crossing = _imported_modules(_PACKAGE / "experiments" / f"{shared}.py") & studies
    assert not crossing, f"experiments/{shared}.py imports the studies {sorted(crossing)}"
