"""The hidden-Gaussian study (issue 8) on stand-in models (training UNets would take minutes).

Stand-ins (tests/experiments/conftest.py): a "model" of width w trained on N images is the
empirical denoiser of its images when N <= 16 w (memorizes) and the denoiser of the Gaussian fitted
to them (covariance normalized by N - 1) otherwise. The test checks that the study's measurements
see the known direction: the generalizing model is the one close to the Gaussian denoiser at mid
and high sigma, and its samples are close to the Gaussian model's."""

from __future__ import annotations

import json

import pytest
import torch

from diffcore import _env
from diffcore.analysis.generalization import distill_affine, linearity_score, relative_distance
from diffcore.denoisers import GaussianDenoiser
from diffcore.experiments import hidden_gaussian as study


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, stand_in_stack):
    out = tmp_path_factory.mktemp("hg")
    stack = stand_in_stack()
    return out, stack, study.run_preset("tiny", out, hooks=stack.hooks(), progress=False)


def _curve(results, n, key, lo, hi):
    return [r[key] for r in results["curves"] if r["n"] == n and lo <= r["sigma"] <= hi]


def test_generalizing_model_is_closer_to_the_gaussian(tiny_run):
    _, _, results = tiny_run
    sizes = sorted({m["n"] for m in results["models"]})
    small, large = sizes[0], sizes[-1]
    mid_high = (0.5, 20.0)
    d_small = _curve(results, small, "dist_gaussian", *mid_high)
    d_large = _curve(results, large, "dist_gaussian", *mid_high)
    assert len(d_small) >= 3 and max(d_large) < min(d_small)
    # the memorizer is the empirical denoiser: distance 0 to it; the generalizer is not
    assert max(_curve(results, small, "dist_empirical", 0, 100)) < 1e-6
    assert max(_curve(results, large, "dist_empirical", 0.1, 1)) > 0.1
    # linear distillation recovers the Gaussian W for the generalizer, not for the memorizer
    assert max(_curve(results, large, "distill_w_error", 0.5, 20)) < 0.1
    assert min(_curve(results, small, "distill_w_error", 0.5, 5)) > 0.3
    # linearity is higher for the generalizer at mid sigma (noisy-image inputs)
    lin = lambda n: sum(_curve(results, n, "linearity_image", 0.2, 2))  # noqa: E731
    assert lin(large) > lin(small)
    by_n = {m["n"]: m for m in results["models"]}
    assert by_n[large]["pfd_model_gaussian"] < by_n[small]["pfd_model_gaussian"]


def test_intervals_claims_and_the_distillation_control(tiny_run):
    """Every per-sigma measure has its bootstrap interval; the claims are decided on the paired gap;
    the same least-squares fit recovers the Gaussian denoiser's own W (the control's zero)."""
    _, _, results = tiny_run
    for row in results["curves"]:
        for key in ("dist_gaussian_train", "dist_empirical", "gap_train", "linearity_image"):
            assert row[f"{key}_low"] <= row[key] <= row[f"{key}_high"], (key, row["sigma"])
        assert row["gap_train"] == pytest.approx(row["dist_gaussian_train"] - row["dist_empirical_train"])
        if row["distill_condition"] < 1e8:
            assert row["distill_w_error_gaussian"] < 1e-4, row  # float32 outputs: 1e-6 level
    for m in results["models"]:
        assert m["pfd_model_gaussian_low"] <= m["pfd_model_gaussian"] <= m["pfd_model_gaussian_high"]
    props = results["effect_properties"]
    assert props == {**study.effect_properties(results), **study.time_properties(results)}
    # the stand-ins: the N = 512 model is the Gaussian denoiser (gap = -dist_empirical < 0), the
    # N = 16 one the empirical denoiser (gap = dist_gaussian > 0)
    assert props["largest_n_closer_to_gaussian"]["holds"] and props["smallest_n_closer_to_empirical"]["holds"]
    assert props["largest_n_closer_to_gaussian"]["worst"]["gap_train"]["high"] < 0
    cap = results["capacity"]
    assert cap["widths"]["4"]["n"] == [16, 512] and cap["sigma"] == pytest.approx(1.0, rel=0.6)


def test_measurements_on_known_maps():
    torch.manual_seed(0)
    x = torch.randn(200, 1, 3, 3)
    w, b = torch.randn(9, 9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    y = (x.reshape(200, -1).double() @ w.T + b).reshape(x.shape)
    w_fit, b_fit, r2 = distill_affine(x, y)
    torch.testing.assert_close(w_fit, w, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(b_fit, b, atol=1e-8, rtol=1e-8)
    assert r2 > 1 - 1e-12
    linear = lambda z, s: 2.0 * z  # noqa: E731
    assert linearity_score(linear, x[:10], x[10:20], 1.0) == pytest.approx(1.0)
    g = GaussianDenoiser.fit(torch.randn(50, 4, dtype=torch.float64))
    assert (
        relative_distance(
            g(x[:5, 0, 0, :].reshape(5, 3)[:, :1].repeat(1, 4).double(), 0.3),
            g(x[:5, 0, 0, :].reshape(5, 3)[:, :1].repeat(1, 4).double(), 0.3),
        )
        == 0.0
    )


def test_distill_affine_same_bits_on_every_call_and_thread_count():
    # MKL's default lstsq driver (gelsy) gave different last bits on repeated calls, and blocked
    # LAPACK ones change with the thread count at this size: the fit must not
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 1, 16, 16, generator=g)
    y = 0.1 * x + 0.01 * torch.randn(x.shape, generator=g)
    before = torch.get_num_threads()
    fits = []
    for threads in (1, 2, 1, 2):
        with _env.torch_threads(threads):
            fits += [distill_affine(x, y) for _ in range(2)]
    assert torch.get_num_threads() == before
    w0, b0, r0 = fits[0]
    assert r0 > 0.9
    for w, b, r in fits[1:]:
        assert torch.equal(w, w0) and torch.equal(b, b0) and r == r0


def test_outputs_and_resume(tiny_run):
    out, stack, results = tiny_run
    for name in (
        "results.json",
        "curves.csv",
        "samples.csv",
        "linearity.png",
        "distance.png",
        "distillation.png",
        "capacity.png",
        "samples.png",
        "timings.json",
    ):
        assert (out / name).stat().st_size > 0
    assert len(results["curves"]) == 2 * study.PRESETS["tiny"]().num_sigmas
    trained = stack.calls["train"]
    again = study.run_preset("tiny", out, hooks=stack.hooks(), progress=False)
    assert again == results and stack.calls["train"] == trained


def test_models_from_a_reproducibility_run(tmp_path, stand_in_stack):
    from diffcore.experiments import reproducibility

    stack = stand_in_stack()
    repro = tmp_path / "repro"
    reproducibility.run_preset(
        "tiny", repro, hooks=stack.hooks(), progress=False, overrides=["train_seeds=0", "widths=4", "num_samples=8"]
    )
    trained = stack.calls["train"]
    out = tmp_path / "hg"
    results = study.run_preset(
        "tiny", out, hooks=stack.hooks(), progress=False, overrides=[f"models_from={repro}", "widths=", "sizes="]
    )
    assert stack.calls["train"] == trained  # nothing retrained
    assert sorted(m["n"] for m in results["models"]) == [8, 512]
    assert json.loads((out / "results.json").read_text())["models"][0]["reused_from"] == str(repro)
    assert "training_time" not in results and "no checkpoints" in results["training_time_skipped"]


def test_training_time_checkpoints(tiny_run):
    """tiny keeps 4 log-spaced checkpoints (steps 1, 2, 5, 10) of each model; the stand-ins: step 1
    untrained (zeros), step 2 the Gaussian denoiser, steps 5 and 10 the final model. So the
    memorizing model passes near G at step 2, and the claims see it on their intervals; the
    untrained step 1 is not counted as near G (the control)."""
    out, _, results = tiny_run
    rows = results["training_time"]
    assert len(rows) == len(results["models"]) * 4 * study.PRESETS["tiny"]().num_sigmas
    for row in rows:
        assert row["gap_train_low"] <= row["gap_train"] <= row["gap_train_high"]
    small = min(m["n"] for m in results["models"])
    mid = lambda step: [r for r in rows if r["n"] == small and r["step"] == step and 0.1 <= r["sigma"] <= 2]  # noqa: E731
    # step 2: the Gaussian stand-in (fitted with N - 1, so not exactly G); step 10: the empirical denoiser
    assert max(r["dist_gaussian_train"] for r in mid(2)) < 0.05 < min(r["dist_gaussian_train"] for r in mid(10))
    assert min(r["dist_gaussian_train"] for r in mid(1)) == pytest.approx(1.0)  # zeros: |0 - G| / |G|
    props = results["effect_properties"]
    assert props["smallest_n_closer_to_gaussian_early"]["holds"]
    assert props["smallest_n_closer_to_gaussian_early"]["steps_closer_to_gaussian"] == {"w4-n16-s0": [2]}
    dip = props["smallest_n_distance_to_gaussian_dips"]
    assert dip["holds"] and dip["per_model"]["w4-n16-s0"]["step_at"] == 2
    assert (out / "training_time.png").is_file() and (out / "training_time.csv").is_file()


def test_checkpoint_steps_and_their_config_checks():
    assert study.checkpoint_steps(10, 1000, 10) == [10, 17, 28, 46, 77, 129, 215, 359, 599, 1000]
    assert study.checkpoint_steps(1, 4, 4) == [1, 2, 3, 4]
    with pytest.raises(study.base.ConfigError, match="time_checkpoints"):
        study.HiddenGaussianConfig(time_checkpoints=2).validate()
    with pytest.raises(study.base.ConfigError, match="first_checkpoint"):
        study.HiddenGaussianConfig(time_checkpoints=5, first_checkpoint=300).validate()
