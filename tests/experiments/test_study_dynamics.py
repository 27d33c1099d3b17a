"""The dynamics study (issue 31): memorization ratio, tau definitions, log-log fit, checkpoint
selection, and resume of the sweep after a kill (reduced configs, real stack)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffcore.experiments import dynamics
from diffcore.experiments.base import ConfigError, config_from_preset, json_dumps
from diffcore.train import ensemble

# ----------------------------------------------------------------------------- the memorization ratio


def test_memorization_ratio_on_copies_and_novel_points():
    """Copies (exact and slightly noisy) of training images are memorized; a point halfway between
    two training images (d1 = d2) and a point far from all are not."""
    train = torch.zeros(4, 1, 2, 2)
    for i in range(4):
        train[i].view(-1)[i] = 4.0  # four orthogonal images, pairwise distance 4 sqrt(2)
    near = train[2].clone()
    near.view(-1)[0] += 0.1  # d1 = 0.1, d2 ~ 5.66: ratio ~ 0.018
    halfway = 0.5 * (train[0] + train[1])  # d1 = d2: ratio 1
    far = torch.full((1, 2, 2), 40.0)  # d1 ~ d2: ratio ~ 0.9
    edge = train[3].clone()
    edge.view(-1)[3] += 1.5  # d1 = 1.5, d2 = sqrt(5.5^2 + 16) = 6.80: ratio 0.22 < 1/3
    samples = torch.stack([train[0], train[1], near, halfway, far, edge])
    memorized, ratio = dynamics.memorized_mask(samples, train, 1.0 / 3.0)
    assert memorized.tolist() == [True, True, True, False, False, True]
    assert ratio[0] == 0 and ratio[1] == 0
    assert ratio[3] == pytest.approx(1.0)
    assert ratio[5] == pytest.approx(1.5 / math.sqrt(5.5**2 + 16), rel=1e-5)
    # the threshold is the decision: at 0.2 the edge sample no longer counts
    assert dynamics.memorized_mask(samples, train, 0.2)[0].tolist() == [True, True, True, False, False, False]


# ----------------------------------------------------------------------------- tau definitions


def test_tau_mem_interpolates_in_log_time():
    steps = [10, 100, 1000, 10000]
    crossing = dynamics.tau_mem(steps, [0.0, 0.1, 0.3, 0.9], level=0.2)
    assert crossing.status == "crossed"
    assert crossing.tau == pytest.approx(10**2.5)  # halfway between 0.1 and 0.3, halfway in log time
    assert dynamics.tau_mem(steps, [0.5, 0.6, 0.7, 0.9], 0.2) == dynamics.Crossing(10.0, "at_first")
    assert dynamics.tau_mem(steps, [0.0, 0.05, 0.1, 0.15], 0.2) == dynamics.Crossing(None, "never")


def test_tau_mem_recovers_the_midpoint_of_a_sigmoid_in_log_time():
    """f(t) = 1 / (1 + (tau / t)^4) reaches 1/2 at tau; dense log-spaced checkpoints recover it."""
    for tau in (300.0, 3000.0):
        steps = dynamics.log_spaced_steps(10, 100_000, 40)
        values = [1.0 / (1.0 + (tau / t) ** 4) for t in steps]
        assert dynamics.tau_mem(steps, values, 0.5).tau == pytest.approx(tau, rel=0.02)


def test_tau_gen_is_the_first_step_within_a_factor_of_the_minimum():
    steps = [10, 100, 1000, 10000]
    frechet = [100.0, 20.0, 10.0, 12.0]  # minimum 10; level 15 lies halfway between 20 and 10
    crossing = dynamics.tau_gen(steps, frechet, factor=1.5)
    assert crossing.status == "crossed" and crossing.tau == pytest.approx(10**2.5)
    # a later rise (memorization) does not move it; a curve good from the start crosses at the first step
    assert dynamics.tau_gen(steps, [100.0, 20.0, 10.0, 50.0], 1.5).tau == pytest.approx(10**2.5)
    assert dynamics.tau_gen(steps, [11.0, 10.0, 10.0, 10.0], 1.5) == dynamics.Crossing(10.0, "at_first")


# ----------------------------------------------------------------------------- the log-log fit


@pytest.mark.parametrize("slope", [1.0, 0.0, 0.5])
def test_loglog_fit_recovers_a_known_slope(slope):
    n = np.array([16, 32, 64, 128, 256], dtype=float)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.02, n.size))
    fitted, intercept = dynamics.loglog_fit(n, 7.0 * n**slope * noise)
    assert fitted == pytest.approx(slope, abs=0.05)
    assert math.exp(intercept) == pytest.approx(7.0, rel=0.2)
    exact, _ = dynamics.loglog_fit(n, 7.0 * n**slope)
    assert exact == pytest.approx(slope, abs=1e-12)
    with pytest.raises(ValueError, match="two distinct sizes"):
        dynamics.loglog_fit([16, 16], [1.0, 2.0])


# ----------------------------------------------------------------------------- checkpoint selection


def test_log_spaced_steps():
    steps = dynamics.log_spaced_steps(25, 4000, 12)
    assert steps[0] == 25 and steps[-1] == 4000 and len(set(steps)) == 12 and steps == sorted(steps)
    ratios = np.diff(np.log(steps))
    assert np.allclose(ratios, ratios.mean(), rtol=0.05)  # even in log time
    assert dynamics.log_spaced_steps(1, 10, 10) == list(range(1, 11))  # collisions move up by one
    for bad in ((0, 10, 3), (10, 10, 3), (1, 10, 11), (1, 10, 1)):
        with pytest.raises(ValueError):
            dynamics.log_spaced_steps(*bad)


def test_config_errors_name_the_field():
    for field, value in (("first_checkpoint", 24), ("lr_sweep_n", 64), ("mem_level", 0)):
        with pytest.raises(ConfigError, match=field):
            config_from_preset(dynamics.PRESETS, "tiny", [f"{field}={value}"])


def test_presets_validate_and_long_extends_quick():
    quick, long = (config_from_preset(dynamics.PRESETS, name) for name in ("quick", "long"))
    assert long.train_steps == 20 * quick.train_steps and long.widths == quick.widths
    assert quick.lr_sweep_rates[-1] / quick.lr_sweep_rates[0] >= 30  # the issue: a range wide enough
    with pytest.raises(ConfigError, match="lr_sweep_optimizer"):
        config_from_preset(dynamics.PRESETS, "tiny", ["lr_sweep_optimizer=rmsprop"])


# ----------------------------------------------------------------------------- the learning-rate sweep's optimizer


def test_sgd_sweep_trains_every_rate_and_adam_reuses_the_base_rate():
    adam = config_from_preset(dynamics.PRESETS, "tiny", ["lr_sweep_rates=0.0001,0.001,0.01"])
    names = [g.name for g in dynamics.groups(adam)]
    assert names == ["w4", "lr0.0001", "lr0.01"]  # 0.001 is the size sweep's model
    sgd = config_from_preset(dynamics.PRESETS, "tiny", ["lr_sweep_rates=0.0001,0.001,0.01", "lr_sweep_optimizer=sgd"])
    lr_groups = [g for g in dynamics.groups(sgd) if g.sweep == "lr"]
    assert [g.name for g in lr_groups] == ["lr0.0001-sgd", "lr0.001-sgd", "lr0.01-sgd"]
    assert {m.optimizer for g in lr_groups for m in g.members} == {"sgd"}
    labels = [m.label for g in dynamics.groups(sgd) for m in g.members]
    assert len(set(labels)) == len(labels)


def test_sgd_optimizer_steps_by_learning_rate_times_gradient():
    """TrainConfig(optimizer='sgd'): ``p <- p - lr * grad`` (no momentum, no Adam normalization),
    where Adam's first step is about ``lr * sign(grad)`` whatever the gradient's size."""
    from diffcore.train import TrainConfig
    from diffcore.train.trainer import make_optimizer

    grad = torch.tensor([1e-3, -2.0, 50.0])
    for name, expected in (("sgd", -0.1 * grad), ("adam", -0.1 * torch.sign(grad))):
        p = torch.zeros(3, requires_grad=True)
        optimizer = make_optimizer([p], TrainConfig(optimizer=name, lr=0.1))
        for _ in range(2 if name == "sgd" else 1):
            p.grad = grad.clone()
            optimizer.step()
        factor = 2 if name == "sgd" else 1  # SGD keeps no state: two steps move twice as far
        assert torch.allclose(p.detach(), factor * expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")


# ----------------------------------------------------------------------------- the run, killed and resumed


class _Killed(RuntimeError):
    pass


def test_sweep_resumes_after_kills_with_the_same_results(tmp_path, monkeypatch):
    """An uninterrupted tiny run against one killed mid-training (inside the ensemble's steps) and
    then mid-measurement (inside a checkpoint's unit): the resumed run gives the same results."""
    config = config_from_preset(dynamics.PRESETS, "tiny")
    full = dynamics.run(config, tmp_path / "full", progress=False)

    steps = dynamics.log_spaced_steps(config.first_checkpoint, config.train_steps, config.num_checkpoints)
    assert full["checkpoint_steps"] == steps
    member = tmp_path / "full" / "units" / "train" / "w4" / f"w4-n16-s{config.train_seeds[0]}-lr0.001"
    kept = sorted(p.name for p in member.iterdir())
    assert kept == [f"step_{t:09d}.safetensors" for t in steps]  # the chosen checkpoints, nothing else

    original_step = ensemble.EnsembleTrainer.step_once

    def step_then_die(self):
        if self.step == steps[1] + 2:
            raise _Killed("killed while training")
        return original_step(self)

    monkeypatch.setattr(ensemble.EnsembleTrainer, "step_once", step_then_die)
    with pytest.raises(_Killed):
        dynamics.run(config, tmp_path / "killed", progress=False)
    monkeypatch.setattr(ensemble.EnsembleTrainer, "step_once", original_step)

    original_measure, calls = dynamics.measure_member, []

    def measure_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second member of the first checkpoint's unit: the unit is half done
            raise _Killed("killed while measuring")
        return original_measure(*args, **kwargs)

    monkeypatch.setattr(dynamics, "measure_member", measure_then_die)
    with pytest.raises(_Killed):
        dynamics.run(config, tmp_path / "killed", progress=False)
    monkeypatch.setattr(dynamics, "measure_member", original_measure)

    resumed = dynamics.run(config, tmp_path / "killed", progress=False)
    timings = json.loads((tmp_path / "killed" / "timings.json").read_text())
    assert timings["units"]["train"]["reused"] >= 1
    assert resumed == full
    assert (tmp_path / "killed" / "results.json").read_bytes() == (tmp_path / "full" / "results.json").read_bytes()
    for name in ("dynamics.png", "tau.png", "lr.png", "losses.png", "checkpoints.csv", "models.csv"):
        assert (tmp_path / "killed" / name).stat().st_size > 0
    assert set(full["claims"]) == {
        "tau_mem_linear_in_n_w4",
        "tau_gen_independent_of_n_w4",
        "large_lr_prevents_memorization",
    }
    assert all(isinstance(c["holds"], bool) for c in full["claims"].values())


# ----------------------------------------------------------------------------- the summary on synthetic curves


def test_reference_gaussian_matches_frechet_distance():
    from diffcore.metrics import FeatureStatistics, frechet_distance

    rng = np.random.default_rng(3)
    reference = FeatureStatistics.from_features(torch.from_numpy(rng.normal(size=(500, 6))))
    rows = rng.normal(0.3, 1.2, size=(80, 6))
    expected = frechet_distance(FeatureStatistics.from_features(torch.from_numpy(rows)), reference)
    assert dynamics.ReferenceGaussian(reference).distance(rows) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _synthetic_curves(config, steps, slope_mem: float):
    """Curves of models whose memorized fraction crosses at a time proportional to n ** slope_mem
    and whose features approach the reference at a time independent of n."""
    from diffcore.metrics import FeatureStatistics

    rng = np.random.default_rng(1)
    reference = FeatureStatistics.from_features(torch.from_numpy(rng.normal(size=(4000, 4))), extractor="toy")
    curves = {}
    for width in config.widths:
        for n in config.sizes:
            member = dynamics.Member(width, n, config.train_seeds[0], config.learning_rate)
            onset = rng.uniform(size=config.num_samples)  # each sample's level
            onset_time = 10.0 * width * (n / 16) ** slope_mem  # 40 .. 80 at n = 16
            level = np.array([1.0 / (1.0 + (onset_time / t) ** 3) for t in steps])
            memorized = onset[None, :] < level[:, None]  # [C, S], monotone in t
            noise = rng.normal(size=(config.num_samples, 4))
            shift = np.array([3.0 * math.exp(-t / 300.0) for t in steps])  # tau_gen ~ constant
            features = noise[None] + shift[:, None, None]
            rows = [
                {
                    "memorized": int(m.sum()),
                    "samples": config.num_samples,
                    "fd": float(dynamics._fd_curve(f[None], reference)[0]),
                    **{f"loss_{k}_{s:g}": 0.1 for k in ("train", "heldout") for s in config.loss_sigmas},
                }
                for m, f in zip(memorized, features)
            ]
            curves[f"w{width}/{member.label}"] = {
                "member": member,
                "group": f"w{width}",
                "sweep": "size",
                "steps": steps,
                "rows": rows,
                "memorized": memorized,
                "features": features,
                "reference": reference,
            }
    return curves


@pytest.mark.parametrize("slope_mem", [1.0, 0.0])
def test_summary_recovers_the_timescales_of_synthetic_curves(tmp_path, slope_mem):
    """tau_mem proportional to n ** slope_mem and tau_gen constant: the fitted slopes and the
    claims follow (the claim fails when tau_mem does not grow with n)."""
    config = dynamics.DynamicsConfig(widths=(4, 8), num_samples=400, lr_sweep_rates=(), tau_resamples=100)
    steps = dynamics.log_spaced_steps(10, 100_000, 16)
    curves = _synthetic_curves(config, steps, slope_mem)
    controls = {
        "fd_training_images": {str(n): 1.0 for n in config.sizes},
        "fd_heldout_images": 0.1,
        "heldout_count": 400,
    }
    results = json.loads(json_dumps(dynamics.summarize(config, steps, curves, controls)))
    for width in ("w4", "w8"):
        mem, gen = results["fits"][width]["tau_mem"]["slope"], results["fits"][width]["tau_gen"]["slope"]
        assert mem["value"] == pytest.approx(slope_mem, abs=0.1)
        assert mem["low"] <= mem["value"] <= mem["high"] and mem["method"] == "bootstrap"
        assert gen["value"] == pytest.approx(0.0, abs=0.1)
        assert results["claims"][f"tau_mem_linear_in_n_{width}"]["holds"] is (slope_mem == 1.0)
        assert results["claims"][f"tau_gen_independent_of_n_{width}"]["holds"] is True
    dynamics.write_outputs(tmp_path, results, curves)
    for name in ("dynamics.png", "tau.png", "losses.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "lr.png").exists()
