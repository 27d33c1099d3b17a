"""The EDM loss's empirical (reduced-variance, "Stable Target Field") target: values against the
float64 reference, the threshold, the trainer's reference set, and the errors for bad options."""

from __future__ import annotations

import pytest
import torch
from tiny_model import Oracle

from diffcore.data import load_dataset
from diffcore.ref.empirical_denoise import empirical_denoise_ref
from diffcore.train import EDMLoss, TrainConfig
from diffcore.train.ddp import DistributedContext
from diffcore.train.loss import build_loss
from diffcore.train.trainer import Trainer


@pytest.fixture(scope="module")
def digits():
    return load_dataset({"name": "digits", "subset": 64, "subset_seed": 0}).all()


def _batch(digits, sigma):
    x0 = digits[:8]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    return x0, noise, torch.as_tensor(sigma, dtype=torch.float32)


def test_target_is_the_empirical_denoiser_above_the_threshold(digits):
    loss = build_loss("edm", {"target": "empirical", "target_sigma_min": 1.0})
    loss.set_reference(digits)
    x0, noise, sigma = _batch(digits, [0.05, 0.3, 0.99, 1.0, 2.0, 5.0, 20.0, 80.0])
    noisy = x0 + sigma.view(-1, 1, 1, 1) * noise
    target = loss.training_target(x0, noisy, sigma)
    high = sigma >= 1.0
    expected, _ = empirical_denoise_ref(noisy[high].double(), digits.double(), sigma[high].double())
    # float32 distances and softmax of 64 rows: weights to ~1e-6 relative, outputs in [-1, 1]
    torch.testing.assert_close(target[high].double(), expected, atol=2e-5, rtol=0)
    assert torch.equal(target[~high], x0[~high])  # below the threshold: the clean image, exactly
    # the loss regresses on that target with EDM's weight: an oracle that outputs it has zero loss
    assert torch.equal(loss(Oracle(target), x0, sigma, noise), torch.zeros(8))
    off = loss(Oracle(target + 0.1), x0, sigma, noise)
    torch.testing.assert_close(off, loss.weight(sigma) * 0.01)


def test_target_stays_float32_under_bf16_autocast(digits):
    loss = EDMLoss(target="empirical", target_sigma_min=0.0)
    loss.set_reference(digits)
    x0, noise, sigma = _batch(digits, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 80.0])
    noisy = x0 + sigma.view(-1, 1, 1, 1) * noise
    expected, _ = empirical_denoise_ref(noisy.double(), digits.double(), sigma.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_sample = loss(Oracle(expected.float()), x0, sigma, noise)
    # the oracle outputs the float64 target: the loss is float32 rounding of the target only (measured 4e-14)
    assert float((per_sample / loss.weight(sigma)).max()) < 1e-9


def test_empirical_target_has_lower_variance_and_the_same_mean(digits):
    """At a fixed noisy input, the clean target y drawn from the posterior over the training set has
    mean E(x, sigma) (the empirical target) and a large spread; the empirical target has none."""
    x = digits[3:4] + 6.0 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    mean, _ = empirical_denoise_ref(x.double(), digits.double(), 6.0)
    logits = -((x.double() - digits.double()) ** 2).flatten(1).sum(1) / (2 * 36.0)
    posterior = torch.softmax(logits, 0)
    spread = (posterior[:, None] * (digits.double().flatten(1) - mean.flatten(1)) ** 2).sum()
    # the clean target's expected squared distance to its mean: 18.5 here, 0.66 of |E|^2 = 28.2
    assert spread > 0.5 * (mean**2).sum()
    loss = EDMLoss(target="empirical", target_sigma_min=5.0)
    loss.set_reference(digits)
    target = loss.training_target(digits[3:4], x, torch.tensor([6.0]))
    torch.testing.assert_close(target.double(), mean, atol=2e-5, rtol=0)


def test_clean_target_is_unchanged(digits):
    x0, noise, sigma = _batch(digits, [0.1] * 4 + [10.0] * 4)
    loss = EDMLoss()
    assert not loss.needs_reference
    assert torch.equal(loss.training_target(x0, x0 + noise, sigma), x0)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"target": "posterior"}, "target: expected one of clean, empirical"),
        ({"target": "empirical", "target_sigma_min": -1.0}, "target_sigma_min: expected a finite number >= 0"),
        ({"target": "empirical", "target_sigma_min": float("nan")}, "target_sigma_min"),
        ({"target": "empirical", "target_sigma_min": "5"}, "target_sigma_min"),
        ({"target_sigma_min": 5.0}, "only target='empirical' uses it"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        build_loss("edm", options)


def test_missing_or_mismatched_reference_raises(digits):
    loss = EDMLoss(target="empirical", target_sigma_min=1.0)
    x0, noise, sigma = _batch(digits, [2.0] * 8)
    with pytest.raises(RuntimeError, match="set_reference"):
        loss.training_target(x0, x0 + noise, sigma)
    loss.set_reference(torch.zeros(5, 3, 8, 8))
    with pytest.raises(ValueError, match=r"reference: expected images of shape \[N, 1, 8, 8\]"):
        loss.training_target(x0, x0 + noise, sigma)
    with pytest.raises(ValueError, match="images: expected a non-empty training set"):
        loss.set_reference(torch.zeros(0, 1, 8, 8))


def test_ensembles_refuse_the_empirical_target(digits):
    """An ensemble shares one loss object across members (vmap): it must not use member 0's set."""
    loss = EDMLoss(target="empirical", target_sigma_min=1.0)
    loss.set_reference(digits)
    x0, noise, sigma = _batch(digits, [2.0] * 8)
    with pytest.raises(ValueError, match="not supported by ensembles"):
        torch.vmap(lambda a: loss.training_target(a, a, sigma))(torch.stack([x0, x0]))


@pytest.mark.parametrize("changes", [{"augment": "xflip"}, {"class_conditional": True}])
def test_config_refuses_augmentation_and_labels(changes):
    with pytest.raises(ValueError, match="needs augment='none' and class_conditional=False"):
        TrainConfig(loss_options={"target": "empirical", "target_sigma_min": 1.0}, **changes)


def test_trainer_uses_its_training_subset_as_reference(tiny_config):
    config = tiny_config.replace(loss_options={"target": "empirical", "target_sigma_min": 0.5})
    trainer = Trainer(config, DistributedContext(), resume="never")
    assert torch.equal(trainer.loss_fn.reference, trainer.dataset.all())
    assert trainer.loss_fn.reference.shape[0] == 64
    losses = [float(trainer.step_once()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
