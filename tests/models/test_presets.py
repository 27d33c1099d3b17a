"""Named presets and parameter counts."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from diffcore.models import (
    PRESETS,
    EDMPrecond,
    UNet,
    VEPrecond,
    VPPrecond,
    count_parameters,
    denoiser_preset,
    unet_config,
    unet_preset,
)

# EDM's DDPM++ CIFAR-10 network (model_channels=128) is reported as about 56M parameters.
EDM_DDPMPP_CIFAR_PARAMS = 56e6


def meta_unet(name, **overrides) -> UNet:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return unet_preset(name, **overrides)


def test_ddpmpp_cifar_parameter_count_matches_edm():
    count = count_parameters(meta_unet("ddpmpp-cifar"))
    assert abs(count - EDM_DDPMPP_CIFAR_PARAMS) / EDM_DDPMPP_CIFAR_PARAMS < 0.02
    assert count == 55_732_739  # the exact count of this layout (regression guard)


def test_parameter_count_scales_with_width_squared():
    counts = {w: count_parameters(meta_unet("ddpmpp-cifar", model_channels=w)) for w in (32, 64, 128, 256)}
    for small, big in ((32, 64), (64, 128), (128, 256)):
        assert 3.9 < counts[big] / counts[small] < 4.05


def test_count_parameters_trainable_only():
    net = meta_unet("ddpmpp-digits")
    total = count_parameters(net)
    net.map_layer0.weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == total - net.map_layer0.weight.numel()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_keeps_its_resolution(name):
    net = meta_unet(name, model_channels=8)
    assert net.img_resolution == PRESETS[name].img_resolution
    assert net.config.model_channels == 8


# SHA-256 (first 16 hex digits) of each preset's fields as sorted JSON. A preset is named by its key in
# model specs, run folders and checkpoints, so its values must not drift when the table is edited.
PRESET_DIGESTS = {
    "ddpmpp-cifar": "0f20f2c042d3035e",
    "ddpmpp-64": "61370040246eb80b",
    "ddpmpp-28": "286741672d0de5c9",
    "ddpmpp-16": "456e46daa1c5748b",
    "ddpmpp-digits": "c6ac78d12a6f1eea",
    "ddpmpp-digits-light": "46338ca6112ef95c",
}


def test_preset_values_are_unchanged():
    digests = {
        name: hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:16]
        for name, config in PRESETS.items()
    }
    assert digests == PRESET_DIGESTS


def test_overrides_and_unknown_names():
    assert unet_config("ddpmpp-cifar", model_channels=64).model_channels == 64
    assert unet_config("ddpmpp-cifar").dropout == 0.13
    with pytest.raises(ValueError, match="name: unknown UNet preset"):
        unet_config("ddpmpp-cifar10")
    with pytest.raises(TypeError):
        unet_config("ddpmpp-cifar", width=64)


def test_denoiser_preset_wrappers():
    for precond, cls in (("edm", EDMPrecond), ("vp", VPPrecond), ("ve", VEPrecond)):
        with torch.device("meta"):
            d = denoiser_preset("ddpmpp-digits", precond=precond, model_channels=8)
        assert isinstance(d, cls) and isinstance(d.model, UNet)
    with torch.device("meta"):
        d = denoiser_preset("ddpmpp-digits", precond_kwargs={"sigma_data": 1.0}, model_channels=8, label_dim=10)
    assert d.sigma_data == 1.0 and d.label_dim == 10
    with pytest.raises(ValueError, match="precond"):
        denoiser_preset("ddpmpp-digits", precond="iddpm")


def test_digits_preset_runs_on_the_embedded_digits():
    from diffcore.data.digits import load_digits

    images, labels = load_digits()
    torch.manual_seed(0)
    d = denoiser_preset("ddpmpp-digits", model_channels=8, label_dim=10).eval()
    out = d(images[:4], 1.0, labels[:4])
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()
