"""EDM's non-leaky augmentation: labels, identity where nothing is drawn, the geometry of each
transform against an analytic image, colour transforms, and the trainer option."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore.train import loss as losses
from diffcore.train.augment import AugmentPipe

SIZE = 32


def smooth_image(batch: int = 4, channels: int = 3) -> tuple[torch.Tensor, callable]:
    """A low-frequency analytic image and its formula f(x, y) in centred pixel coordinates."""

    def f(x, y):
        return 0.5 * torch.sin(0.15 * x + 0.05) * torch.cos(0.11 * y - 0.2)

    c = torch.arange(SIZE, dtype=torch.float64) - (SIZE - 1) / 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return f(x, y).float().expand(batch, channels, SIZE, SIZE).clone(), f


def only(name: str, **extra) -> AugmentPipe:
    off = {k: 0.0 for k in ("xflip", "yflip", "scale", "rotate", "aniso", "translate")}
    return AugmentPipe(p=1.0, **{**off, name: 1.0, **extra})


def expected_from_matrix(pipe, draws, f):
    """Output pixel p reads the analytic input at G_inv p (away from the borders)."""
    g = pipe.inverse_matrix(draws, SIZE, SIZE)
    c = torch.arange(SIZE, dtype=torch.float64) - (SIZE - 1) / 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    p = torch.stack([x, y, torch.ones_like(x)]).reshape(3, -1)
    q = g @ p  # [B, 3, H*W]
    return f(q[:, 0], q[:, 1]).reshape(-1, 1, SIZE, SIZE).float()


def test_edm_defaults_have_nine_labels_and_p_zero_changes_nothing():
    assert AugmentPipe().label_dim == 9  # EDM's augment_dim for --augment=0.12
    x, _ = smooth_image()
    out, labels = AugmentPipe(p=0.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and labels.shape == (4, 9) and not labels.any()


def test_images_with_zero_labels_are_unchanged_and_the_rest_are_not():
    x = torch.rand(256, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out, labels = AugmentPipe(p=0.12)(x, torch.Generator().manual_seed(2))
    untouched = ~labels.bool().any(dim=1)
    assert 0 < int(untouched.sum()) < 256
    assert torch.equal(out[untouched], x[untouched])
    assert (out[~untouched] - x[~untouched]).flatten(1).abs().amax(dim=1).min() > 0
    # x-flip is drawn for every image (multiplier 1e8): about half are flipped
    assert 80 < int(labels[:, 0].sum()) < 176


def test_augmentation_is_deterministic_and_a_slice_of_a_global_draw_matches():
    pipe = AugmentPipe(p=0.5)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    draws = pipe.draw(12, torch.Generator().manual_seed(4))
    again = pipe.draw(12, torch.Generator().manual_seed(4))
    assert all(torch.equal(draws[k], again[k]) for k in draws)
    whole, whole_labels = pipe.apply(torch.cat([x, x]), draws)
    half, half_labels = pipe.apply(x, {k: v[6:] for k, v in draws.items()})
    assert torch.equal(half, whole[6:]) and torch.equal(half_labels, whole_labels[6:])


@pytest.mark.parametrize("name", ["scale", "rotate", "aniso", "translate"])
def test_geometric_transform_matches_the_analytic_image(name):
    pipe = only(name)
    x, f = smooth_image(batch=8, channels=1)
    draws = pipe.draw(8, torch.Generator().manual_seed(5))
    out, labels = pipe.apply(x, draws)
    want = expected_from_matrix(pipe, draws, f)
    inner = slice(8, SIZE - 8)  # reflection padding differs from the analytic image at the borders
    err = (out - want)[..., inner, inner].abs().max()
    assert err < 1e-2, f"{name}: max interior error {err}"  # bicubic error; a wrong convention gives > 0.1
    assert labels.shape == (8, pipe.label_dim) and labels.abs().sum() > 0


def test_label_conventions():
    x, _ = smooth_image(batch=16, channels=1)
    pipe = only("translate")
    draws = pipe.draw(16, torch.Generator().manual_seed(6))
    _, labels = pipe.apply(x, draws)
    assert torch.equal(labels, draws["translate"])  # w_x, w_y; t = w * size * translate_std pixels
    pipe = only("rotate")
    draws = pipe.draw(16, torch.Generator().manual_seed(7))
    _, labels = pipe.apply(x, draws)
    a = draws["rotate"]
    assert torch.allclose(labels, torch.stack([a.cos() - 1, a.sin()], 1)) and a.abs().max() <= math.pi
    pipe = only("xflip")
    draws = pipe.draw(16, torch.Generator().manual_seed(8))
    out, labels = pipe.apply(x, draws)
    flipped = labels[:, 0] > 0
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])


def test_colour_transforms():
    x = torch.rand(32, 3, 4, 4, generator=torch.Generator().manual_seed(9)) * 2 - 1
    pipe = AugmentPipe(p=1.0, xflip=0, yflip=0, scale=0, rotate=0, aniso=0, translate=0, hue=1, saturation=1)
    draws = pipe.draw(32, torch.Generator().manual_seed(10))
    out, labels = pipe.apply(x, draws)
    assert labels.shape == (32, 3)
    # hue rotates about the grey axis: grey level and distance from the axis are kept before saturation
    hue_only = AugmentPipe(p=1.0, xflip=0, yflip=0, scale=0, rotate=0, aniso=0, translate=0, hue=1)
    rotated, _ = hue_only.apply(x, {"hue": draws["hue"]})
    torch.testing.assert_close(rotated.mean(1), x.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        (rotated - rotated.mean(1, keepdim=True)).norm(dim=1),
        (x - x.mean(1, keepdim=True)).norm(dim=1),
        atol=1e-5,
        rtol=0,
    )
    bright = AugmentPipe(p=1.0, xflip=0, yflip=0, scale=0, rotate=0, aniso=0, translate=0, brightness=1)
    shifted, labels = bright(x, torch.Generator().manual_seed(11))
    torch.testing.assert_close(shifted - x, (labels[:, 0] * 0.2).reshape(-1, 1, 1, 1).expand_as(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="3 channels"):
        pipe.apply(x[:, :1], draws)
    with pytest.raises(ValueError, match="p must lie"):
        AugmentPipe(p=1.5)


def test_vp_loss_draws_edm_vp_sigmas():
    loss = losses.build_loss("vp")
    sigma = loss.sample_sigma(4096, torch.Generator().manual_seed(0), "cpu")
    # sigma(t) for t in [1e-5, 1]: from ~sqrt(1e-6) to sqrt(exp(19.9 / 2 + 0.1) - 1) ~ 152
    assert sigma.min() > 9e-4 and sigma.max() < 153 and float(sigma.median()) > 1
    torch.testing.assert_close(loss.weight(sigma), 1 / sigma**2)


@pytest.mark.slow
def test_trainer_passes_augment_labels_to_the_model(tiny_config):
    from diffcore.train import train_from_config

    config = tiny_config.replace(
        model={"name": "ddpmpp", "preset": "ddpmpp-digits-light", "model_channels": 8, "augment_dim": 9},
        loss="vp",
        augment="edm",
        augment_p=0.5,
        steps=2,
        batch_size=8,  # the labels' batch below
    )
    seen = []
    import diffcore.models.unet as unet

    original = unet.UNet.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("augment_labels"))
        return original(self, *args, **kwargs)

    unet.UNet.forward = spy
    try:
        result = train_from_config(config)
    finally:
        unet.UNet.forward = original
    assert result.step == 2 and result.final_loss is not None and math.isfinite(result.final_loss)
    assert seen and all(labels is not None and labels.shape == (8, 9) for labels in seen)
