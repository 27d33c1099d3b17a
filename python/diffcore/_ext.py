"""Loading of the compiled extension ``diffcore._C`` with a clear error when it is missing."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Literal, cast, overload

if TYPE_CHECKING:
    from diffcore._C import Extension


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("diffcore._C"), ""
    except ImportError as exc:  # not built, or built for another Python
        return None, str(exc)


@overload
def extension(required: Literal[True] = True) -> Extension: ...
@overload
def extension(required: bool) -> Extension | None: ...
def extension(required: bool = True) -> Extension | None:
    """The ``diffcore._C`` module, typed by its stub ``_C.pyi``. With ``required=False`` returns None
    when it is not built."""
    module, error = _load()
    if module is None:
        if not required:
            return None
        raise ImportError(
            "diffcore._C (the compiled kernels) could not be imported: "
            f"{error}. Install diffcore with `pip install .` (or "
            "`pip install --no-build-isolation -e .` for development) so that the extension is built."
        )
    return cast("Extension", module)


def has_extension() -> bool:
    """True when ``diffcore._C`` imports."""
    return extension(required=False) is not None


def has_cuda_kernels() -> bool:
    """True when ``_C`` was built with CUDA kernels (says nothing about a GPU being present)."""
    ext = extension(required=False)
    return bool(ext is not None and ext.build_info()["cuda"])


def dtype_name(dtype: object) -> str:
    """``torch.float32`` -> ``"float32"``: the dtype names ``_C`` accepts."""
    return str(dtype).removeprefix("torch.")
