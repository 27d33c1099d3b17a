"""Model construction from a config: ``build_model({"name": ..., **kwargs})``.

Register a factory with ``register_model("name", factory)`` (or as a decorator), in code. A spec
only ever names a registered factory: a run folder's ``config.json`` is data a user may have been
handed, so a name in it is never imported or called as ``module:callable``. Built in: ``"ddpmpp"``, the
EDM-preconditioned DDPM++ UNet of ``diffcore.models`` (``{"name": "ddpmpp", "preset":
"ddpmpp-cifar", "model_channels": 64}`` is UNet-64 at 32x32), imported when first built, and
``"multistage"``, ``diffcore.models.multistage_denoiser`` (shared encoder, one decoder per sigma
interval: ``{"name": "multistage", "sigma_boundaries": [2.5103, 7.6577], "decoder_channels":
[192, 128, 16]}``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

ModelFactory = Callable[..., torch.nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str, factory: ModelFactory | None = None, *, overwrite: bool = False):
    """Register ``factory(**kwargs) -> nn.Module`` under ``name`` (usable as a decorator)."""

    def add(fn: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add(factory) if factory is not None else add


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(spec: Mapping[str, Any]) -> torch.nn.Module:
    """The denoiser a spec names: ``{"name": <a registered name>, **kwargs}``.

    The model must follow the preconditioned-denoiser contract
    ``forward(x [B, ...], sigma [B], class_labels [B, C] | None) -> x0_hat [B, ...]``.
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"model spec needs a 'name' string, got {name!r}")
    if name not in _REGISTRY:
        known = ", ".join(registered_models()) or "none registered"
        raise ValueError(
            f"model: unknown model name {name!r}; registered: {known} (a factory must be "
            "registered in code with diffcore.train.register_model, never named by a file)"
        )
    model = _REGISTRY[name](**spec)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _ddpmpp(preset: str = "ddpmpp-cifar", **kwargs) -> torch.nn.Module:
    """``diffcore.models.denoiser_preset(preset, **kwargs)``: the preconditioned DDPM++ UNet."""
    try:
        from diffcore.models import denoiser_preset
    except ImportError as error:
        raise ValueError(
            "model 'ddpmpp' needs diffcore.models.denoiser_preset (the DDPM++ UNet), "
            f"which this installation lacks: {error}"
        ) from error
    return denoiser_preset(preset, **kwargs)


register_model("ddpmpp", _ddpmpp)


def _multistage(**kwargs) -> torch.nn.Module:
    """``diffcore.models.multistage_denoiser(**kwargs)``: the preconditioned multi-stage UNet."""
    from diffcore.models.multistage import multistage_denoiser

    return multistage_denoiser(**kwargs)


register_model("multistage", _multistage)
