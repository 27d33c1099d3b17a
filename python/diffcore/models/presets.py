"""Named UNet architectures and a builder for preconditioned denoisers.

``unet_preset("ddpmpp-cifar", model_channels=64)`` builds EDM's DDPM++ CIFAR-10 network at base
width 64 ("UNet-64"); any :class:`~diffcore.models.unet.UNetConfig` field can be overridden.
Presets marked "EDM" follow the configurations of the EDM repository (NVlabs/edm, train.py); the
others are diffcore's own choices for the smaller images it uses, not taken from a paper.
"""

from __future__ import annotations

from torch import nn

from diffcore.models.precond import EDMPrecond, Precond, VEPrecond, VPPrecond
from diffcore.models.unet import UNet, UNetConfig

# Each preset states only where it departs from UNetConfig's defaults (EDM's DDPM++ CIFAR-10); the
# two digits nets share the 8x8 one-channel geometry (levels 8, 4; attention only at the bottleneck).
_DIGITS = UNetConfig(img_resolution=8, in_channels=1, channel_mult=(1, 2), attn_resolutions=())

PRESETS: dict[str, UNetConfig] = {
    # EDM: DDPM++ for CIFAR-10 32x32 (about 56M parameters at model_channels=128).
    "ddpmpp-cifar": UNetConfig(),
    # EDM: DDPM++ for FFHQ / AFHQv2 64x64 (dropout 0.05 is FFHQ's; AFHQv2 used 0.25).
    "ddpmpp-64": UNetConfig(img_resolution=64, channel_mult=(1, 2, 2, 2), dropout=0.05),
    # diffcore: 28x28 one-channel (MNIST-like): levels 28, 14, 7; attention at 14 and the 7x7 bottleneck.
    "ddpmpp-28": UNetConfig(img_resolution=28, in_channels=1, model_channels=64, attn_resolutions=(14,), dropout=0.1),
    # diffcore: 16x16 three-channel: levels 16, 8, 4; attention at 8 and the 4x4 bottleneck.
    "ddpmpp-16": UNetConfig(img_resolution=16, model_channels=64, num_blocks=2, attn_resolutions=(8,), dropout=0.1),
    # diffcore: 8x8 one-channel (the embedded digits): levels 8, 4; attention at the 4x4 bottleneck.
    "ddpmpp-digits": _DIGITS.replace(model_channels=32, num_blocks=2, dropout=0.1),
    # diffcore: a light 8x8 digits net for CPU studies (the reproducibility study's quick preset):
    # levels 8, 4 with one block each, attention only at the 4x4 bottleneck, no dropout (dropout
    # regularizes, and the study wants small-N models free to memorize). About 0.18M parameters at
    # model_channels=16; one training step at batch 64 costs about 33 ms of one CPU core (0.7M and
    # 68 ms at 32).
    "ddpmpp-digits-light": _DIGITS.replace(model_channels=16, num_blocks=1, dropout=0.0),
}

PRECONDITIONERS: dict[str, type[Precond]] = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}


def unet_config(name: str, **overrides) -> UNetConfig:
    """The named :class:`UNetConfig` with ``overrides`` applied (unknown names raise)."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def unet_preset(name: str, **overrides) -> UNet:
    """Build the named UNet, e.g. ``unet_preset("ddpmpp-cifar", model_channels=64)``."""
    return UNet(unet_config(name, **overrides))


def denoiser_preset(name: str, *, precond: str = "edm", precond_kwargs: dict | None = None, **overrides) -> Precond:
    """A preconditioned denoiser ``D(x, sigma)`` around the named UNet.

    ``precond``: "edm" (default), "vp" or "ve"; ``precond_kwargs`` go to its constructor
    (e.g. ``{"sigma_data": 0.5}``); ``overrides`` go to the UNet config.
    """
    if precond not in PRECONDITIONERS:
        raise ValueError(f"precond: expected one of {sorted(PRECONDITIONERS)}, got {precond!r}")
    return PRECONDITIONERS[precond](unet_preset(name, **overrides), **(precond_kwargs or {}))


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (all, or only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
