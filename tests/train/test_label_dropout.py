"""Label dropout (classifier-free guidance training): the null label, its rate, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcore.train import TrainConfig, ddp, train_from_config
from diffcore.train.trainer import Trainer


def _trainer(config: TrainConfig) -> Trainer:
    return Trainer(config, ddp.init_distributed("cpu"), resume="never")


@pytest.fixture
def conditional(tiny_config):
    return tiny_config.replace(
        class_conditional=True, batch_size=64, model={"name": "tiny_denoiser", "num_classes": 10}
    )


def test_dropped_labels_are_null_at_the_configured_rate(conditional, tmp_path):
    trainer = _trainer(conditional.replace(label_dropout=0.3, out_dir=str(tmp_path / "a")))
    dropped = kept = 0
    drawn = []
    for step in range(4):
        _, class_labels, _, _, _ = trainer._draw_batch(step)
        drawn.append(class_labels)
        _, labels = trainer.dataset.batch(trainer.order.indices(step))
        null = class_labels.sum(dim=1) == 0
        assert torch.equal(class_labels[~null], F.one_hot(labels, 10).float()[~null])
        dropped, kept = dropped + int(null.sum()), kept + int((~null).sum())
    # 256 Bernoulli(0.3) draws: mean 77, standard deviation 7.3
    assert 77 - 30 < dropped < 77 + 30 and dropped + kept == 256
    again = _trainer(conditional.replace(label_dropout=0.3, out_dir=str(tmp_path / "b")))
    assert all(torch.equal(again._draw_batch(step)[1], drawn[step]) for step in range(4))  # same seed, same labels


def test_no_dropout_draws_nothing_extra(conditional, tmp_path):
    """label_dropout = 0 keeps every label and the noise stream of runs made before the option."""
    plain = _trainer(conditional.replace(out_dir=str(tmp_path / "a")))
    x, class_labels, sigma, noise, _ = plain._draw_batch(0)
    assert bool((class_labels.sum(dim=1) == 1).all())
    fresh = torch.Generator().manual_seed(conditional.seed)
    expected_sigma = plain.loss_fn.sample_sigma(64, fresh, torch.device("cpu"))
    torch.testing.assert_close(sigma, expected_sigma, rtol=0, atol=0)
    torch.testing.assert_close(noise, torch.randn(noise.shape, generator=fresh), rtol=0, atol=0)
    assert plain.noise_generator.get_state().equal(fresh.get_state())


def test_label_dropout_validation_and_run(conditional):
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_dropout"):
            conditional.replace(label_dropout=bad)
    result = train_from_config(conditional.replace(label_dropout=0.2, steps=3, batch_size=8, log_every=3))
    assert result.step == 3 and result.final_loss == result.final_loss
