"""The private torch internals diffcore relies on, in one place.

Attention must know whether forward-mode AD or a torch.func gradient transform is active (to keep
or drop the probability matrix), must unwrap torch.func's gradient wrappers before a kernel reads
raw memory, and must run kernels with torch.func disabled; the EDM loss must know whether it runs
under vmap (an ensemble); k-NN screens with torch's int8 GEMM (``_int_mm``); the EMA updates use
the fused multi-tensor lerp (``_foreach_lerp_``). torch has no public API for these; every use
goes through this module (``scripts/check_guards.py`` enforces it), so that a torch release that
moves them breaks (or is adapted) here only. ``tests/ops/test_torch_compat.py`` checks each
function against the public behaviour it stands for, on whichever torch the suite runs with (the
supported range in pyproject.toml; CONTRIBUTING.md says how its ends are tested).
"""

from __future__ import annotations

from typing import overload

import torch
import torch.autograd.forward_ad as fwad
from torch._C import _functorch as _ft


def forward_ad_active() -> bool:
    """True inside a forward-AD level (torch.func.jvp / jacfwd / autograd.forward_ad). Where the
    private level counter is gone, False: callers then take the path that keeps nothing."""
    return getattr(fwad, "_current_level", -1) >= 0


def grad_transform_active() -> bool:
    """True when a torch.func.grad/vjp/jacrev transform is active. Where the private interpreter
    stack has moved, True (assume the worst: a gradient may flow)."""
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        return any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):
        return True


def vmap_batched(t: torch.Tensor | None) -> bool:
    """True for a tensor that carries a vmap batch axis at some functorch level."""
    while t is not None and _ft.is_functorch_wrapped_tensor(t):
        if _ft.is_batchedtensor(t):
            return True
        t = _ft.get_unwrapped(t)
    return False


@overload
def plain_tensor(t: torch.Tensor) -> torch.Tensor: ...
@overload
def plain_tensor(t: None) -> None: ...
@overload
def plain_tensor(t: torch.Tensor | None) -> torch.Tensor | None: ...
def plain_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """The plain tensor under torch.func's gradient wrappers, for kernels that read raw memory.

    Batched (vmap) wrappers are not unwrapped: dropping their batch axis would be wrong, so they
    raise instead.
    """
    if t is None:
        return None
    while _ft.is_functorch_wrapped_tensor(t):
        if _ft.is_batchedtensor(t):
            raise RuntimeError("attention: a kernel backend received a vmap-batched tensor")
        t = _ft.get_unwrapped(t)
    return t


def functorch_disabled():
    """Context in which torch.func transforms are off (kernels allocate and read plain tensors)."""
    return torch._C._DisableFuncTorch()


def has_int_mm() -> bool:
    """True when torch has its int8 x int8 -> int32 GEMM (``torch._int_mm``)."""
    return hasattr(torch, "_int_mm")


def int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a [M, K] int8 @ b [K, N] int8 -> [M, N] int32`` with exact integer sums (``torch._int_mm``)."""
    if out is None:
        return torch._int_mm(a, b)
    return torch._int_mm(a, b, out=out)


def foreach_lerp_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """In place, for every pair: ``target += weight * (source - target)`` (one fused multi-tensor
    kernel, ``torch._foreach_lerp_``)."""
    torch._foreach_lerp_(targets, sources, weight)
