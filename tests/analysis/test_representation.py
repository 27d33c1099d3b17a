"""Representation measures: probe, class SNR, hooks, MoLRG theory curve, curve shape."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore.analysis.representation import (
    class_snr,
    curve_shape,
    extract_features,
    feature_layers,
    linear_probe,
    molrg_representation_curve,
)
from diffcore.denoisers import MoLRGDenoiser
from diffcore.models import EDMPrecond, UNet
from tests.helpers import TINY_UNET_FIELDS


def _gaussian_classes(num_per_class: int, means: torch.Tensor, std: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    k, f = means.shape
    labels = torch.arange(k).repeat_interleave(num_per_class)
    feats = means[labels] + std * torch.randn(k * num_per_class, f, generator=g, dtype=torch.float64)
    return feats, labels


def test_probe_separates_separable_classes():
    means = 6.0 * torch.eye(5, 20, dtype=torch.float64)
    train_x, train_y = _gaussian_classes(20, means, 0.5, seed=0)
    test_x, test_y = _gaussian_classes(100, means, 0.5, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result.accuracy == 1.0 and result.train_accuracy == 1.0


def test_probe_is_at_chance_on_pure_noise():
    g = torch.Generator().manual_seed(2)
    train_x, test_x = torch.randn(300, 16, generator=g), torch.randn(2000, 16, generator=g)
    train_y, test_y = torch.randint(0, 10, (300,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y)
    # chance is 0.1; 2000 test points give a binomial standard deviation of 0.007
    assert abs(result.accuracy - 0.1) < 0.035


def test_probe_rejects_bad_input():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="test_features"):
        linear_probe(x, y, torch.randn(5, 4), torch.randint(0, 2, (5,)))
    with pytest.raises(ValueError, match="train_features"):
        linear_probe(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="finite"):
        linear_probe(x, y, torch.full((10, 3), float("nan")), y)


def test_class_snr_matches_closed_form_on_gaussian_classes():
    """Equal class sizes, means m_c, isotropic std s in F dimensions: the between-class energy per
    sample tends to mean_c |m_c - mean(m)|^2 and the within-class one to F s^2."""
    g = torch.Generator().manual_seed(4)
    means = torch.randn(4, 8, generator=g, dtype=torch.float64) * 2
    feats, labels = _gaussian_classes(20000, means, 1.5, seed=5)
    expected = float((means - means.mean(0)).square().sum(1).mean()) / (8 * 1.5**2)
    assert class_snr(feats, labels) == pytest.approx(expected, rel=0.03)


def test_class_snr_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="features"):
        class_snr(torch.randn(5, 2), torch.zeros(4, dtype=torch.long))


def _tiny_unet():
    torch.manual_seed(0)
    net = UNet(**{**TINY_UNET_FIELDS, "attn_resolutions": ()})
    return EDMPrecond(net).eval()


def test_hooks_leave_the_output_unchanged_and_pool():
    model = _tiny_unet()
    g = torch.Generator().manual_seed(0)
    images, noise = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    sigma = torch.full((6,), 0.5)
    with torch.no_grad():
        before = model(images + 0.5 * noise, sigma)
    feats = extract_features(model, images, noise, 0.5, ["bottleneck", "enc.8x8_block0"], batch_size=4)
    with torch.no_grad():
        after = model(images + 0.5 * noise, sigma)
    assert torch.equal(before, after)
    assert feats["bottleneck"].shape == (6, 16) and feats["enc.8x8_block0"].shape == (6, 8)
    flat = extract_features(model, images, noise, 0.5, ["bottleneck"], pooling="flatten")["bottleneck"]
    assert flat.shape == (6, 16 * 4 * 4)
    assert torch.allclose(flat.reshape(6, 16, 16).mean(-1), feats["bottleneck"], atol=1e-6)
    assert not any(module._forward_hooks for module in model.modules())


def test_unknown_layer_lists_the_layers():
    model = _tiny_unet()
    assert "bottleneck" in feature_layers(model) and "dec.4x4_in1" in feature_layers(model)
    images = torch.randn(3, 1, 8, 8)
    last = extract_features(model, images, images, 0.3, ["decoder_last", "dec.8x8_block1"])
    assert torch.equal(last["decoder_last"], last["dec.8x8_block1"])
    with pytest.raises(ValueError, match=r"no layer 'dec.nope'.*bottleneck"):
        extract_features(model, torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), 1.0, ["dec.nope"])
    with pytest.raises(ValueError, match="pooling"):
        extract_features(model, torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), 1.0, ["bottleneck"], pooling="max")


def test_molrg_theory_curve_is_unimodal_with_data_noise():
    """The paper's interplay: SNR rises (denoising removes the data noise) then falls (the class
    posterior flattens); the class confidence decreases from 1 towards 1/K."""
    den = MoLRGDenoiser.random(3, 48, 4, seed=0, noise_std=0.1)
    sigmas = [0.002 * (80 / 0.002) ** (i / 15) for i in range(16)]
    rows = molrg_representation_curve(den, sigmas, num=600, seed=0)
    shape = curve_shape(sigmas, [math.log(r["snr"]) for r in rows], tolerance=0.5)
    assert shape["shape"] == "unimodal" and 0.01 < shape["peak_sigma"] < 10
    confidence = [r["confidence"] for r in rows]
    assert confidence[0] > 0.99 and confidence[-1] < 0.5
    assert all(b <= a + 0.02 for a, b in zip(confidence, confidence[1:]))


def test_curve_shape_labels():
    s = [0.1, 1.0, 10.0, 100.0]
    assert curve_shape(s, [0.5, 0.8, 0.6, 0.2], 0.05)["shape"] == "unimodal"
    assert curve_shape(s, [0.9, 0.88, 0.6, 0.2], 0.05)["shape"] == "decreasing"
    assert curve_shape(s, [0.1, 0.2, 0.3, 0.4], 0.05)["shape"] == "increasing"
    with pytest.raises(ValueError, match="sigmas"):
        curve_shape([1.0, 0.5, 2.0], [1, 2, 3], 0.1)


def test_interval_shape_decides_on_intervals_not_point_values():
    from diffcore.analysis.representation import interval_shape
    from diffcore.metrics.intervals import Interval

    s = [0.1, 0.3, 1.0, 3.0]
    tight = lambda vs: [Interval(v, v - 0.01, v + 0.01) for v in vs]  # noqa: E731
    wide = lambda vs: [Interval(v, v - 0.1, v + 0.1) for v in vs]  # noqa: E731
    assert interval_shape(s, tight([0.50, 0.60, 0.55, 0.20]))["shape"] == "unimodal"
    # the same point values with intervals wider than the rise: no rise can be claimed
    shape = interval_shape(s, wide([0.50, 0.60, 0.55, 0.20]))
    assert shape["shape"] == "decreasing" and not shape["rises"] and shape["falls"]
    assert interval_shape(s, wide([0.50, 0.52, 0.51, 0.49]))["shape"] == "flat"
    assert interval_shape(s, tight([0.2, 0.3, 0.4, 0.5]))["shape"] == "increasing"
    with pytest.raises(ValueError, match="sigmas"):
        interval_shape([1.0, 0.5, 2.0], tight([1, 2, 3]))
