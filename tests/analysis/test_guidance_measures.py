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
