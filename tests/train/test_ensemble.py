"""Ensembles (diffcore.train.ensemble): K light digits UNets in one stacked computation against the
same models trained alone, the single-model checkpoint format, bitwise resume, stacked sampling."""

from __future__ import annotations

import json

import pytest
import torch

from diffcore.train import TrainConfig, load_checkpoint, load_trained_model, train_from_config
from diffcore.train.checkpoint import list_checkpoints
from diffcore.train.ensemble import EnsembleTrainer, check_members, sample_ensemble, train_ensemble


def _member(tmp_path, name: str, n: int, seed: int, **changes) -> TrainConfig:
    """A width-8 light digits UNet (the quick preset's architecture, no dropout) on N digits."""
    base = dict(
        data={"name": "digits", "subset": n, "subset_seed": 0},
        model={"name": "ddpmpp", "preset": "ddpmpp-digits-light", "model_channels": 8},
        steps=100,
        batch_size=16,
        lr=2e-3,
        lr_warmup_images=320,
        ema_halflife_images=500,
        ema_rampup_ratio=0.5,
        seed=seed,
        device="cpu",
        out_dir=str(tmp_path / name),
        checkpoint_every=50,
        keep_checkpoints=2,
        log_every=1,
        progress=False,
    )
    base.update(changes)
    return TrainConfig(**base)


def _losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_members_match_training_alone(tmp_path):
    """Same batches, noise and initial weights; only the stacked forward/backward reassociates
    sums: loss curves agree to 1e-4 relative over 100 steps, weights and samples closely."""
    members = [_member(tmp_path, "a", 16, 0, lr_decay_images=1600), _member(tmp_path, "b", 64, 5, lr_decay_images=1600)]
    results = train_ensemble(members)
    alone = [train_from_config(c.replace(out_dir=str(tmp_path / f"alone-{k}"))) for k, c in enumerate(members)]
    for k, (ens, single) in enumerate(zip(results, alone)):
        a, b = _losses(tmp_path / ("a", "b")[k]), _losses(tmp_path / f"alone-{k}")
        assert len(a) == len(b) == 100
        worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
        assert worst < 1e-4, f"member {k}: loss curves differ by {worst:.2e} relative"
        # Adam moves a weight by about lr per step whatever the gradient's size, so a near-zero
        # gradient whose sign flips under reassociation moves it by up to ~lr (2e-3) once; seen:
        # 1.2e-5 at most over 100 steps (1 of 48 elements of a bias) -- allowed: 5% of lr
        for p, q in zip(ens.ema_model.parameters(), single.ema_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    # samples from shared seeds: 12 Heun steps through weights that agree to ~1e-6; the ODE map is
    # Lipschitz over this short path, so sample differences stay far below one 8-bit pixel level
    # (2/255 = 0.008) -- the test allows 1e-3
    models = [r.ema_model for r in results]
    stacked = sample_ensemble(models, range(100, 116), (1, 8, 8), steps=12)
    from diffcore import sampler

    for k, single in enumerate(alone):
        ref = sampler.sample(single.ema_model.eval(), seeds=range(100, 116), shape=(1, 8, 8), steps=12)
        assert (stacked[k] - ref).abs().max() < 1e-3


def test_member_checkpoints_have_the_single_model_format(tmp_path):
    members = [
        _member(tmp_path, "a", 16, 0, steps=10, checkpoint_every=10),
        _member(tmp_path, "b", 32, 1, steps=10, checkpoint_every=10),
    ]
    train_ensemble(members)
    single = train_from_config(members[0].replace(out_dir=str(tmp_path / "single")))
    ens = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1][1])
    ref = load_checkpoint(single.checkpoint)
    assert set(ens.tensors) == set(ref.tensors) and set(ens.documents) == set(ref.documents)
    for group in ("model", "ema", "optimizer"):
        assert {k: (v.shape, v.dtype) for k, v in ens.tensors[group].items()} == {
            k: (v.shape, v.dtype) for k, v in ref.tensors[group].items()
        }, group
    assert ens.documents["optimizer"] == ref.documents["optimizer"]
    model = load_trained_model(tmp_path / "b")  # a member loads alone
    assert model(torch.zeros(2, 1, 8, 8), torch.ones(2)).shape == (2, 1, 8, 8)
    resumed = train_from_config(members[1].replace(steps=15))  # and resumes alone
    assert resumed.resumed_from_step == 10 and resumed.step == 15


def test_ensemble_resume_is_bitwise(tmp_path):
    def configs(folder, steps):
        return [
            _member(tmp_path / folder, "a", 16, 0, steps=steps, checkpoint_every=10, log_every=5),
            _member(tmp_path / folder, "b", 48, 2, steps=steps, checkpoint_every=10, log_every=5),
        ]

    full = train_ensemble(configs("full", 30))
    train_ensemble(configs("split", 20))
    resumed = EnsembleTrainer(configs("split", 30))
    assert resumed.step == 20
    second = resumed.run()
    for f, s in zip(full, second):
        for p, q in zip(f.model.parameters(), s.model.parameters()):
            assert torch.equal(p, q)
        for p, q in zip(f.ema_model.parameters(), s.ema_model.parameters()):
            assert torch.equal(p, q)
        a, b = load_checkpoint(f.checkpoint), load_checkpoint(s.checkpoint)
        for key, value in a.tensors["optimizer"].items():
            assert torch.equal(value, b.tensors["optimizer"][key]), key


def test_members_must_agree(tmp_path):
    a = _member(tmp_path, "a", 16, 0)
    with pytest.raises(ValueError, match="differs from configs\\[0\\] in lr"):
        check_members([a, _member(tmp_path, "b", 16, 1, lr=1e-3)])
    with pytest.raises(ValueError, match="own out_dir"):
        check_members([a, a.replace(seed=4)])
    with pytest.raises(ValueError, match="at least one"):
        check_members([])


def test_ensemble_keeps_chosen_steps(tmp_path):
    """Every member keeps a checkpoint at each of ``keep_steps`` (pruning spares them)."""
    configs = [
        _member(tmp_path, name, n, seed, steps=12, checkpoint_every=5, keep_checkpoints=1, keep_steps=(2, 4, 8))
        for name, n, seed in (("a", 16, 0), ("b", 32, 1))
    ]
    train_ensemble(configs)
    for name in ("a", "b"):
        assert [s for s, _ in list_checkpoints(tmp_path / name / "checkpoints")] == [2, 4, 8, 12]
