"""Directions of the cfg study's measures on closed-form stand-ins (seconds): the coverage of the
data's feature space and the Gaussian-vs-empirical comparison can each come out either way."""

from __future__ import annotations

import torch

from diffcore.analysis.guidance import feature_coverage, transition_curves
from diffcore.denoisers import ClassGaussians, EmpiricalDenoiser
from diffcore.metrics import intervals


def test_feature_coverage_separates_a_collapsed_and_a_shifted_sample_from_a_faithful_one():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 6, generator=g)
    faithful = feature_coverage(real, torch.randn(300, 6, generator=g))
    collapsed = feature_coverage(real, 0.1 * torch.randn(300, 6, generator=g))
    shifted = feature_coverage(real, torch.randn(300, 6, generator=g) + 3.0)
    assert intervals.clearly_below(collapsed["coverage"], faithful["coverage"])
    assert intervals.clearly_below(shifted["precision"], faithful["precision"])
    assert intervals.clearly_below(shifted["density"], faithful["density"])


def _data(classes=4, per_class=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, 1, 3, 3, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = centres[labels] + 0.5 * torch.randn(labels.shape[0], 1, 3, 3, generator=g)
    return images, labels


class _Net:
    """``net(x, sigma, one_hot)`` from per-class denoisers (one-hot rows) and an unconditional one."""

    def __init__(self, conditional, unconditional):
        self.conditional, self.unconditional = conditional, unconditional

    def __call__(self, x, sigma, one_hot):
        if one_hot is None:
            return self.unconditional(x, sigma)
        labels = one_hot.argmax(1)
        out = torch.empty_like(x)
        for cls in labels.unique().tolist():
            rows = labels == cls
            out[rows] = self.conditional(cls)(x[rows], sigma)
        return out


def test_ratio_to_the_empirical_baseline_fails_for_a_memorizing_net_and_holds_for_a_linear_one():
    images, labels = _data()
    k = int(labels.max()) + 1
    gaussians = ClassGaussians.fit(images.double(), labels, k)
    empirical = [EmpiricalDenoiser(images[labels == c]) for c in range(k)]
    memorizing = _Net(lambda c: empirical[c], EmpiricalDenoiser(images))
    linear = _Net(
        lambda c: lambda x, s: gaussians.conditional_denoiser(torch.full((x.shape[0],), c))(x.double(), s).float(),
        lambda x, s: gaussians.unconditional(x.double(), s).float(),
    )
    sigmas = [0.3]
    kwargs = dict(samples_per_class=16, seed=0, device="cpu")
    mem = transition_curves(memorizing, gaussians, images, labels, sigmas, **kwargs)[0]
    lin = transition_curves(linear, gaussians, images, labels, sigmas, **kwargs)[0]
    assert mem["ratio_conditional_low"] > 1.0  # closer to the memorizing baseline: the comparison can fail
    assert lin["ratio_conditional_high"] < 1e-3
    assert mem["dist_conditional_empirical"] < 1e-4


def _class_gaussians(seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(40)
    scales = torch.rand(3, 1, 2, 3, generator=g) + 0.2  # per-class, per-pixel spreads: distinct covariances
    centres = 1.5 * torch.randn(3, 1, 2, 3, generator=g)
    images = centres[labels] + scales[labels] * torch.randn(120, 1, 2, 3, generator=g)
    return ClassGaussians.fit(images.double(), labels, 3)


def test_jacobian_cpc_guidance_is_the_gaussians_cpc_term_and_its_top_k_part():
    from diffcore.analysis.guidance import JacobianCPCGuidance

    gaussians = _class_gaussians()
    labels = torch.tensor([0, 1, 2, 1])
    g = torch.Generator().manual_seed(2)
    x = 2.0 * torch.randn(4, 1, 2, 3, generator=g, dtype=torch.float64)
    anchors = torch.stack([gaussians.conditional[int(c)].mean for c in labels]).reshape(x.shape)
    cond, uncond = gaussians.conditional_denoiser(labels), gaussians.unconditional
    for sigma in (0.3, 2.0):
        split = gaussians.split(x, sigma, labels)
        full = JacobianCPCGuidance(cond, uncond, anchors)(x, sigma)
        torch.testing.assert_close(full, split.positive + split.negative, rtol=1e-9, atol=1e-9)
        top = JacobianCPCGuidance(cond, uncond, anchors, rank=2, method="subspace", iters=200, tol=1e-10)(x, sigma)
        for b, cls in enumerate(labels.tolist()):
            values, vectors = gaussians.contrastive_components(cls, sigma)
            keep = values.abs().argsort(descending=True)[:2]
            v = vectors[:, keep]
            expected = v @ (values[keep] * (v.T @ (x[b] - anchors[b]).flatten()))
            torch.testing.assert_close(top[b].flatten(), expected, rtol=1e-5, atol=1e-6)
        # the rank-2 term is a strict part of the full one (the baseline it differs from)
        assert float((full - top).norm()) > 1e-3 * float(full.norm())


def test_at_equal_accuracy_interpolates_between_the_bracketing_strengths():
    from diffcore.analysis.guidance import at_equal_accuracy

    def point(w, acc, fd):
        return {"w": w, "accuracy": {"value": acc}, "frechet": {"value": fd, "low": fd - 1, "high": fd + 2}, "div": w}

    curve = [point(2.0, 0.99, 40.0), point(0.0, 0.8, 100.0), point(1.0, 0.9, 60.0)]  # unsorted on purpose
    out = at_equal_accuracy(curve, 0.95, ("frechet", "div"))
    assert out["between"] == [1.0, 2.0]
    assert abs(out["fraction"] - 5 / 9) < 1e-12 and abs(out["w"] - (1 + 5 / 9)) < 1e-12
    assert abs(out["frechet"]["value"] - (60 - 20 * 5 / 9)) < 1e-9
    assert abs(out["frechet"]["low"] - (out["frechet"]["value"] - 1)) < 1e-9
    assert abs(out["div"] - out["w"]) < 1e-12
    assert at_equal_accuracy(curve, 0.995, ("frechet",)) is None  # never reached: None, not an extrapolation
    falling = [point(0.0, 0.9, 10.0), point(1.0, 0.7, 30.0)]
    assert abs(at_equal_accuracy(falling, 0.8, ("frechet",))["frechet"]["value"] - 20.0) < 1e-9
