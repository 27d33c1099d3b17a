"""Model construction from a config: ``build_model({"name": ..., **kwargs})``.

Register a factory with ``register_model("name", factory)`` (or as a decorator); a spec may also
name any importable factory as ``"package.module:callable"``. Built in: ``"ddpmpp"``, the
EDM-preconditioned DDPM++ UNet of ``diffcore.models`` (``{"name": "ddpmpp", "preset":
"ddpmpp-cifar", "model_channels": 64}`` is UNet-64 at 32x32), imported when first built, and
``"multistage"``, ``diffcore.models.multistage_denoiser`` (shared encoder, one decoder per sigma
interval: ``{"name": "multistage", "sigma_boundaries": [2.5103, 7.6577], "decoder_channels":
[192, 128, 16]}``).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

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
    """The denoiser a spec names: ``{"name": <registered name or "module:callable">, **kwargs}``.

    The model must follow the preconditioned-denoiser contract
    ``forward(x [B, ...], sigma [B], class_labels [B, C] | None) -> x0_hat [B, ...]``.
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"model spec needs a 'name' string, got {name!r}")
    if name in _REGISTRY:
        factory = _REGISTRY[name]
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import model factory {name!r}: {error}") from error
    else:
        known = ", ".join(registered_models()) or "none registered"
        raise ValueError(f"unknown model {name!r}; registered: {known} (or use 'package.module:callable')")
    model = factory(**spec)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _ddpmpp(preset: str = "ddpmpp-cifar", **kwargs) -> torch.nn.Module:
    """``diffcore.models.denoiser_preset(preset, **kwargs)``: the preconditioned DDPM++ UNet."""
    try:
        from diffcore.models import denoiser_preset
    except ImportError as error:
        raise ValueError("model 'ddpmpp' needs diffcore.models.denoiser_preset (the DDPM++ UNet), "
                         f"which this installation lacks: {error}") from error
    return denoiser_preset(preset, **kwargs)


register_model("ddpmpp", _ddpmpp)


def _multistage(**kwargs) -> torch.nn.Module:
    """``diffcore.models.multistage_denoiser(**kwargs)``: the preconditioned multi-stage UNet."""
    from diffcore.models.multistage import multistage_denoiser
    return multistage_denoiser(**kwargs)


register_model("multistage", _multistage)
