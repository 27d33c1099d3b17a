"""The type stub ``diffcore/_C.pyi`` matches the built extension: same functions, same keyword
arguments in the same order, same argument and return types (read from pybind11's signatures)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import diffcore

STUB = Path(diffcore.__file__).with_name("_C.pyi")
# pybind11 spells a C++ integer argument "SupportsInt | SupportsIndex" (older releases: "int").
_PYBIND_TYPES = {
    "typing.SupportsInt | typing.SupportsIndex": "int",
    "typing.SupportsFloat | typing.SupportsIndex": "float",
    "typing.SupportsInt": "int",
    "typing.SupportsFloat": "float",
}
_STUB_RETURNS = {"BuildInfo": "dict"}


def _stub_signatures() -> dict[str, tuple[list[tuple[str, str]], str]]:
    """Name -> ([(keyword, type)], return type) of every method of the stub's ``Extension``."""
    tree = ast.parse(STUB.read_text())
    protocol = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Extension")
    out = {}
    for fn in protocol.body:
        if isinstance(fn, ast.FunctionDef):
            kwargs = [(a.arg, ast.unparse(a.annotation)) for a in fn.args.kwonlyargs]
            assert not fn.args.args[1:], f"{fn.name}: every argument of _C is keyword-only"
            out[fn.name] = (kwargs, _STUB_RETURNS.get(ast.unparse(fn.returns), ast.unparse(fn.returns)))
    return out


def _built_signature(function) -> tuple[list[tuple[str, str]], str]:
    first = function.__doc__.splitlines()[0]
    match = re.fullmatch(r"\w+\((.*)\) -> (.+)", first)
    assert match, f"unexpected pybind11 signature: {first}"
    params, returns = match.groups()
    kwargs = []
    for part in re.split(r", (?=\w+:)", params):
        if part in ("", "*"):
            continue
        name, kind = part.split(": ", 1)
        kwargs.append((name.removeprefix("*, "), _PYBIND_TYPES.get(kind, kind)))
    return kwargs, returns


def test_stub_matches_the_built_extension():
    ext = pytest.importorskip("diffcore._C")
    stub = _stub_signatures()
    built = {name for name in dir(ext) if not name.startswith("_")}
    assert built == set(stub), f"in _C only: {sorted(built - set(stub))}; in _C.pyi only: {sorted(set(stub) - built)}"
    for name, expected in stub.items():
        assert _built_signature(getattr(ext, name)) == expected, name


def test_module_level_names_cover_the_protocol():
    tree = ast.parse(STUB.read_text())
    aliases = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert aliases == set(_stub_signatures())
