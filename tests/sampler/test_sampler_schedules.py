"""Sigma schedules: formulas, end points, ordering."""

from __future__ import annotations

import math

import pytest
import torch

import diffcore.sampler as S


def test_karras_matches_edm_eq5():
    sigmas = S.karras_sigmas(18)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (19,)
    assert float(sigmas[0]) == 80.0 and float(sigmas[17]) == 0.002 and float(sigmas[18]) == 0.0
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(float(sigmas[i]), expected, rel_tol=1e-14)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert S.karras_sigmas(1).tolist() == [80.0, 0.0]
    assert S.karras_sigmas(4, append_zero=False).shape == (4,)


def test_uniform_time_and_vp_time():
    u = S.uniform_time_sigmas(5, 1.0, 5.0)
    assert u.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    vp = S.vp_time_sigmas(10)
    assert math.isclose(float(vp[0]), math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel_tol=1e-12)
    assert bool((vp[1:] < vp[:-1]).all()) and float(vp[-1]) == 0.0


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "cosine"])
def test_vp_discrete_schedules(beta_schedule):
    abar = S.ddpm_alphas_cumprod(1000, beta_schedule)
    assert abar.shape == (1000,) and bool((abar[1:] < abar[:-1]).all())
    train = S.sigmas_from_alphas_cumprod(abar)
    torch.testing.assert_close(train, ((1 - abar) / abar).sqrt())
    trailing = S.vp_sigmas(10, beta_schedule=beta_schedule)
    assert trailing.shape == (11,) and float(trailing[0]) == float(train[-1]) and float(trailing[-1]) == 0.0
    leading = S.vp_sigmas(10, beta_schedule=beta_schedule, spacing="leading")
    torch.testing.assert_close(leading[:-1], train[torch.arange(900, -1, -100)])
    linspace = S.vp_sigmas(10, beta_schedule=beta_schedule, spacing="linspace")
    assert float(linspace[0]) == float(train[-1]) and float(linspace[-2]) == float(train[0])


def test_linear_betas_are_ddpm():
    abar = S.ddpm_alphas_cumprod(1000, "linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0))


def test_schedule_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        S.ddpm_alphas_cumprod(1000, "quadratic")
    with pytest.raises(ValueError, match="spacing"):
        S.vp_sigmas(10, spacing="middle")
    with pytest.raises(ValueError, match="n: expected at most 1000"):
        S.vp_sigmas(1001)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        S.sigmas_from_alphas_cumprod(torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="rho"):
        S.karras_sigmas(10, rho=0.0)
