"""Reproducibility: bitwise repeatable on the CPU; a sample depends on its seed only, not on the
batch it runs in; per-sample noise streams."""

from __future__ import annotations

import pytest
import torch

import diffcore.sampler as S


def test_noise_from_seeds_is_batch_and_dtype_invariant():
    seeds = [3, 14, 15, 92, 65]
    full = S.noise_from_seeds(seeds, (3, 4, 4))
    assert full.shape == (5, 3, 4, 4) and full.dtype == torch.float32
    for i, seed in enumerate(seeds):
        assert torch.equal(S.noise_from_seeds([seed], (3, 4, 4))[0], full[i])
    assert torch.equal(S.noise_from_seeds(seeds[2:4], (3, 4, 4)), full[2:4])
    as64 = S.noise_from_seeds(seeds, (3, 4, 4), dtype=torch.float64)
    assert torch.equal(as64.float(), full)
    assert not torch.equal(full[0], full[1])


def test_seeded_noise_streams_continue_per_sample():
    a = S.SeededNoise([1, 2])
    first, second = a.randn((5,)), a.randn((5,))
    b = S.SeededNoise([2])
    assert torch.equal(b.randn((5,))[0], first[1]) and torch.equal(b.randn((5,))[0], second[1])


@pytest.mark.parametrize("solver", ["heun", "euler", "dpmpp_2m", "ddim"])
def test_bitwise_repeatable_on_cpu(solver, gaussian):
    x = 80.0 * torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    sigmas = S.karras_sigmas(10)
    first = S.SOLVERS[solver](gaussian, x, sigmas)
    second = S.SOLVERS[solver](gaussian, x.clone(), sigmas)
    assert torch.equal(first, second)


@pytest.mark.parametrize("solver", ["heun", "euler", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_seed_same_sample_whatever_the_batch(solver, dtype, isotropic):
    seeds = list(range(100, 107))
    full = S.sample(isotropic, seeds=seeds, shape=(3, 5, 5), steps=8, solver=solver, dtype=dtype)
    in_pairs = S.sample(isotropic, seeds=seeds, shape=(3, 5, 5), steps=8, solver=solver, dtype=dtype, batch_size=2)
    assert torch.equal(full, in_pairs)
    for i in (0, 4, 6):
        alone = S.sample(isotropic, seeds=[seeds[i]], shape=(3, 5, 5), steps=8, solver=solver, dtype=dtype)
        assert torch.equal(alone[0], full[i])


@pytest.mark.parametrize(
    "solver,options", [("heun", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}), ("ddim", {"eta": 1.0})]
)
def test_stochastic_samplers_use_per_sample_streams(solver, options, isotropic):
    seeds = [7, 8, 9, 10]
    full = S.sample(isotropic, seeds=seeds, shape=(6,), steps=10, solver=solver, **options)
    split = S.sample(isotropic, seeds=seeds, shape=(6,), steps=10, solver=solver, batch_size=3, **options)
    assert torch.equal(full, split)
    deterministic = S.sample(isotropic, seeds=seeds, shape=(6,), steps=10, solver=solver)
    assert not torch.allclose(full, deterministic)


def test_churn_follows_edm_algorithm_2(isotropic):
    """With S_churn the noise added at step i has variance sigma_hat^2 - sigma^2 (EDM Alg. 2)."""
    sigmas = S.karras_sigmas(4, sigma_max=10.0)
    x = torch.zeros(2000, 1, dtype=torch.float64)
    added = []

    def denoiser(xx, s):
        if not added:
            added.append(xx.clone())
        return isotropic(xx, s)

    S.sample_heun(denoiser, x, sigmas, s_churn=4.0, generator=torch.Generator().manual_seed(0))
    gamma = min(4.0 / 4, 2**0.5 - 1)
    expected_std = (((1 + gamma) ** 2 - 1) ** 0.5) * 10.0
    assert abs(float(added[0].std()) / expected_std - 1) < 0.05


def test_callback_sees_every_step(gaussian):
    seen = []
    x = 80.0 * torch.randn(2, 12, dtype=torch.float64)
    out = S.sample_dpmpp_2m(gaussian, x, S.karras_sigmas(6), callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert seen[0]["sigma"] == 80.0 and seen[-1]["sigma_next"] == 0.0
    assert torch.equal(seen[-1]["x_next"], out)
    assert torch.equal(seen[0]["x"], x)  # the state before the update, not overwritten later
    assert all(set(d) >= {"i", "sigma", "sigma_next", "x", "denoised"} for d in seen)


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
def test_backends_agree_in_the_loop(solver, gaussian):
    from tests.helpers import cpu_backends

    x = 80.0 * torch.randn(3, 12, generator=torch.Generator().manual_seed(5))
    sigmas = S.karras_sigmas(8)
    results = {b: S.SOLVERS[solver](gaussian, x, sigmas, backend=b) for b in cpu_backends()}
    reference = results["reference"]
    for backend, out in results.items():
        torch.testing.assert_close(out, reference, rtol=2e-5, atol=2e-5, msg=backend)


@pytest.mark.parametrize(
    "solver,options",
    [("euler", {}), ("heun", {}), ("heun", {"s_churn": 10.0}), ("dpmpp_2m", {}), ("ddim", {"eta": 0.5})],
)
@pytest.mark.parametrize("with_callback", [False, True])
def test_input_state_is_never_modified(solver, options, with_callback, isotropic):
    x = 80.0 * torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(9))
    before = x.clone()
    out = S.SOLVERS[solver](
        isotropic, x, S.karras_sigmas(5), callback=(lambda d: None) if with_callback else None, **options
    )
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()
