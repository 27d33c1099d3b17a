#!/usr/bin/env python3
"""Project guards that a linter does not know (run by pre-commit, .ci/run and tests/test_guards.py).

- torch internals (``torch._C``, ``torch._functorch``, ``torch._int_mm``, ``torch._foreach_*``) are
  used only in ``python/diffcore/ops/_torch_compat.py``, so that a torch release that moves them is
  adapted in one place;
- ``matplotlib.use`` is called only in ``python/diffcore/experiments/plotting.py`` (the Agg backend
  is chosen once; every figure imports ``plt`` from there).

The check reads the syntax tree, so docstrings and comments that name these are fine. Tests are not
checked: ``tests/ops/test_torch_compat.py`` compares the compat functions with torch's own.

Usage: ``python scripts/check_guards.py [FILE ...]`` (default: every Python file of the package,
kernels/, bench/ and scripts/). Prints one line per finding and exits 1 when there is any.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("python", "kernels", "bench", "scripts")
TORCH_COMPAT = Path("python/diffcore/ops/_torch_compat.py")
PLOTTING = Path("python/diffcore/experiments/plotting.py")
PRIVATE_TORCH = ("_C", "_functorch", "_int_mm")
PRIVATE_TORCH_PREFIXES = ("_foreach_",)


def _private_torch_name(dotted: str) -> bool:
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] != "torch":
        return False
    return parts[1] in PRIVATE_TORCH or parts[1].startswith(PRIVATE_TORCH_PREFIXES)


def _dotted(node: ast.AST) -> str | None:
    """``torch._C._functorch`` for the attribute chain of that name; None for anything else."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(names)])
    return None


def _findings(tree: ast.AST, rel: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if rel != TORCH_COMPAT:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _private_torch_name(alias.name):
                        yield node.lineno, f"import {alias.name}: torch internals only in {TORCH_COMPAT}"
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                if _private_torch_name(node.module) or any(_private_torch_name(n) for n in names):
                    yield node.lineno, f"from {node.module} import ...: torch internals only in {TORCH_COMPAT}"
            elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
                dotted = _dotted(node)
                if dotted and _private_torch_name(dotted):
                    yield node.lineno, f"{dotted}: torch internals only in {TORCH_COMPAT}"
        if rel != PLOTTING and isinstance(node, ast.Call) and _dotted(node.func) == "matplotlib.use":
            yield node.lineno, f"matplotlib.use: the backend is chosen only in {PLOTTING} (import plt from there)"


def check_file(path: Path) -> list[str]:
    """Findings of one file as ``path:line: message``."""
    rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    tree = ast.parse(path.read_text(), filename=str(path))
    for parent in ast.walk(tree):  # report the outermost attribute of a chain once
        for child in ast.iter_child_nodes(parent):
            child.parent = parent  # type: ignore[attr-defined]
    return [f"{rel}:{line}: {message}" for line, message in sorted(set(_findings(tree, rel)))]


def default_files() -> list[Path]:
    return sorted(p for folder in CHECKED for p in (ROOT / folder).rglob("*.py") if "build" not in p.parts)


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] if argv else default_files()
    findings = [f for path in files if path.suffix == ".py" for f in check_file(path)]
    for finding in findings:
        print(finding)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
