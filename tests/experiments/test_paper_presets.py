"""Paper presets against the papers' public code (docs/experiments.md, "Paper presets"), and the
training recipe (VP preconditioning, EDM augmentation) they pass to the trainer."""

from __future__ import annotations

import pytest

from diffcore.experiments import _stack, hidden_gaussian, reproducibility


def test_reproducibility_paper_preset_matches_the_public_code():
    c = reproducibility.PRESETS["paper"]()
    # --arch=ddpmpp --duration 50 --batch 128 --precond vp --model_channels 64 (and 128, 256); EDM's lr,
    # warm-up and augmentation defaults (--lr 10e-4, 10 Mimg, --augment 0.12)
    assert c.model_preset == "ddpmpp-cifar" and c.widths == (64, 128, 256)
    assert c.precond == "vp" and c.batch_size == 128 and c.learning_rate == 1e-3
    assert c.train_steps * c.batch_size == 50_000_000 and c.lr_warmup_images == 10_000_000
    assert c.augment_p == 0.12
    assert c.sizes == tuple(2**k for k in range(6, 15))
    assert c.num_samples == 10_000 and c.sample_seed_start == 100000 and c.sampler_steps == 18
    c.validate(50_000)


def test_hidden_gaussian_paper_preset_fits_with_four_samples_per_unknown():
    c = hidden_gaussian.PRESETS["paper"]()
    unknowns = 3 * 32 * 32 + 1  # one affine output row of a CIFAR-10 image
    assert c.distill_samples >= 4 * unknowns
    assert c.widths == (128,) and c.learning_rate == 1e-3 and c.augment_p == 0.12 and max(c.sizes) <= 50_000


def test_recipe_reaches_the_model_and_the_trainer():
    spec = {"model_preset": "ddpmpp-digits-light", "width": 8, **_stack.recipe_spec("vp", 0.12)}
    assert spec["precond"] == "vp" and spec["augment_p"] == 0.12
    model_spec = _stack.model_spec(spec)
    assert model_spec["precond"] == "vp" and model_spec["augment_dim"] == 9

    from diffcore.models import VPPrecond
    from diffcore.train import build_model

    model = build_model(model_spec)
    assert isinstance(model, VPPrecond) and model.model.augment_dim == 9
    # the default recipe adds nothing, so existing specs (and finished units) are unchanged
    assert _stack.recipe_spec("edm", 0.0) == {}
    assert "augment_dim" not in _stack.model_spec({"model_preset": "ddpmpp-digits-light", "width": 8})
    with pytest.raises(ValueError, match="precond"):
        _stack.recipe_spec("ve", 0.0)
    with pytest.raises(ValueError, match="augment_p"):
        _stack.recipe_spec("edm", 1.5)
