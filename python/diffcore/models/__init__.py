"""diffcore.models: the DDPM++ UNet (EDM's SongUNet design) and preconditioning wrappers.

``denoiser_preset("ddpmpp-cifar", model_channels=64)`` gives an EDM-preconditioned denoiser
``D(x, sigma, class_labels=None)``; see docs/models.md.
"""

from diffcore.models.multistage import MultiStageUNet, SeparateStageUNets, multistage_denoiser
from diffcore.models.precond import EDMPrecond, Precond, VEPrecond, VPPrecond
from diffcore.models.presets import (
    PRECONDITIONERS,
    PRESETS,
    count_parameters,
    denoiser_preset,
    unet_config,
    unet_preset,
)
from diffcore.models.unet import UNet, UNetConfig
from diffcore.models.vector import MLPDenoiser, SubspaceDenoiser

__all__ = [
    "EDMPrecond",
    "MLPDenoiser",
    "MultiStageUNet",
    "SeparateStageUNets",
    "PRECONDITIONERS",
    "PRESETS",
    "Precond",
    "SubspaceDenoiser",
    "UNet",
    "UNetConfig",
    "VEPrecond",
    "VPPrecond",
    "count_parameters",
    "denoiser_preset",
    "multistage_denoiser",
    "unet_config",
    "unet_preset",
]
