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


def _typed_dict_fields(classes: dict[str, ast.ClassDef], name: str) -> list[tuple[str, str]]:
    """[(field, type)] of the stub's TypedDict ``name`` in order: its base's fields, then its own."""
    cls = classes[name]
    assert len(cls.bases) == 1, f"{name}: one base (mypy orders the fields of several bases otherwise than Python)"
    base = ast.unparse(cls.bases[0])
    inherited = [] if base == "TypedDict" else _typed_dict_fields(classes, base)
    own = [(f.target.id, ast.unparse(f.annotation)) for f in cls.body if isinstance(f, ast.AnnAssign)]
    return inherited + own


def _stub_signatures() -> dict[str, tuple[list[tuple[str, str]], str]]:
    """Name -> ([(keyword, type)], return type) of every method of the stub's ``Extension``; a method
    typed ``**kwargs: Unpack[SomeKeywords]`` takes that TypedDict's fields in order."""
    tree = ast.parse(STUB.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out = {}
    for fn in classes["Extension"].body:
        if isinstance(fn, ast.FunctionDef):
            kwargs = [(a.arg, ast.unparse(a.annotation)) for a in fn.args.kwonlyargs]
            assert not fn.args.args[1:] and not fn.args.vararg, f"{fn.name}: every argument of _C is keyword-only"
            if fn.args.kwarg is not None:
                unpacked = ast.unparse(fn.args.kwarg.annotation)
                keywords = unpacked.removeprefix("Unpack[").removesuffix("]")
                assert not kwargs and unpacked == f"Unpack[{keywords}]", f"{fn.name}: **kwargs: Unpack[TypedDict] only"
                kwargs = _typed_dict_fields(classes, keywords)
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
