"""Input validation shared by ops, samplers and experiments. Every message names the argument."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    nonempty: bool = True,
) -> torch.Tensor:
    """Check that ``value`` is a tensor with the expected rank and dtype; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{name}: expected dtype {names}, got {str(value.dtype).removeprefix('torch.')}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(value.shape)}")
    return value


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise if ``value`` holds NaN or Inf (floating tensors only)."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = "NaN" if bool(torch.isnan(value).any()) else "Inf"
        raise ValueError(f"{name}: contains {bad}")
    return value


MAX_MAGNITUDE = 1e15
"""The largest |value| of queries and training rows that knn and empirical_denoise take, on every
backend: within it their CPU kernels' fp32 Gram products, squared norms and screening bounds stay
finite and inside the range their error bounds cover (the C++ kernels' kMaxMagnitude)."""


def refuse_magnitude(name: str, largest: float, values: torch.Tensor | None = None) -> None:
    """Raise for ``largest``, the largest |value| of ``name`` already reduced by the caller: a
    ValueError naming ``name`` above MAX_MAGNITUDE, and, when ``values`` is given and ``largest``
    is NaN or Inf, the error of :func:`check_finite` (which says which)."""
    if values is not None and not math.isfinite(largest):
        check_finite(name, values)
    if largest > MAX_MAGNITUDE:
        raise ValueError(f"{name}: expected values of magnitude <= {MAX_MAGNITUDE:g} (every backend), got {largest:g}")


def check_magnitude(name: str, values: torch.Tensor, *, nonfinite_later: bool = False) -> None:
    """Refuse values of magnitude above MAX_MAGNITUDE, from one reduction (integer and empty tensors
    pass: uint8 images always are within it). NaN / Inf raise as in :func:`check_finite`, or, with
    ``nonfinite_later``, are left to a later check of the caller's (e.g. of the result)."""
    if not values.is_floating_point() or values.numel() == 0:
        return
    magnitudes = values.detach().abs()
    if nonfinite_later:
        magnitudes = magnitudes.nan_to_num(nan=0.0, posinf=0.0)
    refuse_magnitude(name, float(magnitudes.max()), values)


def check_training_set(train: torch.Tensor, queries: torch.Tensor, queries_name: str) -> None:
    """A training set ``train`` [N, ...] with at least one row and the trailing shape of
    ``queries`` [B, ...]; ValueError naming ``train`` otherwise."""
    if train.shape[0] == 0 or train.numel() == 0:
        raise ValueError(f"train: expected at least one training row, got shape {tuple(train.shape)}")
    if tuple(train.shape[1:]) != tuple(queries.shape[1:]):
        raise ValueError(
            f"train: expected trailing shape {tuple(queries.shape[1:])} (that of {queries_name}), "
            f"got {tuple(train.shape[1:])} (train shape {tuple(train.shape)})"
        )


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Raise if the named tensors are not on one device; return that device."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")
    return first


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    """Raise unless ``value`` is an integer >= ``minimum``; return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def sigma_per_row(name: str, sigma, batch: int, device: torch.device) -> torch.Tensor:
    """``sigma`` as a float64 tensor of shape [batch]: from a scalar, a 0-d tensor or shape [batch].

    Raises if any value is NaN, infinite or not positive.
    """
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"{name}: expected a finite value > 0, got {sigma!r}")
        return torch.full((batch,), float(sigma), dtype=torch.float64, device=device)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{name}: expected a float or a tensor of shape [{batch}], got {type(sigma).__name__}")
    s = sigma.detach().to(device=device, dtype=torch.float64)
    if s.dim() == 0:
        s = s.expand(batch)
    elif s.dim() != 1 or s.shape[0] != batch:
        raise ValueError(f"{name}: expected a scalar or shape [{batch}], got shape {tuple(sigma.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    if not bool((s > 0).all()):
        raise ValueError(f"{name}: expected every value > 0, got min {float(s.min()):g}")
    return s.contiguous()


def check_state_dict_values(state, expected, source: str) -> None:
    """Refuse a loaded state dict whose tensors would be cast or are not finite: every tensor of
    ``state`` (a mapping name -> tensor) that ``expected`` (the module's own ``state_dict()``) also
    holds must have the module's dtype (``load_state_dict`` would silently cast int8, float16,
    float64 or complex values) and, when floating, hold no NaN or infinity. ValueError naming the
    tensor and ``source`` (the file)."""
    for name, value in state.items():
        want = expected.get(name)
        if want is None or not isinstance(value, torch.Tensor):
            continue  # unknown or missing keys: load_state_dict's own check names them
        if value.dtype != want.dtype:
            raise ValueError(
                f"{source}: tensor {name!r} has dtype {str(value.dtype).removeprefix('torch.')}, "
                f"the model's is {str(want.dtype).removeprefix('torch.')} (refused, not cast)"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source}: tensor {name!r} holds NaN or infinite values")
