"""Accuracy of the solvers: Gaussian data (exact PF-ODE solution) and a nonlinear empirical
denoiser (against torchdiffeq's dopri5 at tight tolerances)."""

from __future__ import annotations

import math

import pytest
import torch

import diffcore.sampler as S

SOLVER_ORDER = {"euler": 1.0, "ddim": 1.0, "heun": 2.0, "dpmpp_2m": 2.0}
STEPS = (8, 12, 16, 24, 32, 48, 64)


def _fitted_order(steps, errors) -> float:
    """Slope of -log(error) against log(steps), least squares."""
    lx = torch.tensor([math.log(s) for s in steps], dtype=torch.float64)
    ly = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float(-(lx * ly).sum() / (lx * lx).sum())


def _relative_error(got, expected) -> float:
    return float((got.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("solver", list(SOLVER_ORDER))
def test_convergence_order_on_gaussian_data(solver, gaussian):
    x = 80.0 * torch.randn(16, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = gaussian.exact(x, 80.0, 0.0)
    errors = [_relative_error(S.SOLVERS[solver](gaussian, x, S.karras_sigmas(n)), exact) for n in STEPS]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    order = _fitted_order(STEPS, errors)
    assert abs(order - SOLVER_ORDER[solver]) < 0.3, (solver, order, errors)
    if SOLVER_ORDER[solver] == 2.0:
        assert errors[-1] < 2e-3


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
def test_float64_state_with_float32_model_input(solver, gaussian):
    """state_dtype=float64 integrates in float64 while the denoiser sees float32."""
    x = 80.0 * torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    seen = []

    def denoiser(xx, s):
        seen.append((xx.dtype, s.dtype))
        return gaussian(xx, s)

    out = S.SOLVERS[solver](denoiser, x, S.karras_sigmas(32), state_dtype=torch.float64)
    assert out.dtype == torch.float64 and set(seen) == {(torch.float32, torch.float32)}
    exact = gaussian.exact(x.double(), 80.0, 0.0)
    reference = S.SOLVERS[solver](gaussian, x.double(), S.karras_sigmas(32))
    # the float32 denoiser input costs accuracy at the level of float32 rounding only
    assert _relative_error(out, exact) < _relative_error(reference, exact) + 1e-5


def test_float32_state_matches_float64(gaussian):
    x = 80.0 * torch.randn(8, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas = S.karras_sigmas(18)
    out64 = S.sample_heun(gaussian, x, sigmas)
    out32 = S.sample_heun(gaussian, x.float(), sigmas)
    assert _relative_error(out32, out64) < 1e-5


_DOPRI5_CACHE: dict[str, torch.Tensor] = {}


def _dopri5(denoiser, x, sigma_from, sigma_to):
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is a test dependency")

    def rhs(sigma, state):  # EDM Eq. 3 with sigma(t) = t
        return (state - denoiser(state, sigma.expand(state.shape[0]))) / sigma

    times = torch.tensor([sigma_from, sigma_to], dtype=torch.float64)
    return torchdiffeq.odeint(rhs, x, times, method="dopri5", rtol=1e-10, atol=1e-10)[-1]


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "euler"])
def test_nonlinear_empirical_denoiser_against_dopri5(solver, empirical):
    """Stops at sigma = 0.2 (the empirical flow turns stiff towards 0, where it snaps to a
    training point); the error must fall at the solver's order."""
    x = 20.0 * torch.randn(6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigma_end = 0.2
    if "empirical" not in _DOPRI5_CACHE:  # one high-accuracy solve for all solvers
        _DOPRI5_CACHE["empirical"] = _dopri5(empirical, x, 20.0, sigma_end)
    expected = _DOPRI5_CACHE["empirical"]
    steps = (16, 32, 64, 128)
    errors = []
    for n in steps:
        grid = S.karras_sigmas(n, sigma_min=sigma_end, sigma_max=20.0, append_zero=False)
        errors.append(_relative_error(S.SOLVERS[solver](empirical, x, grid, require_zero_end=False), expected))
    order = _fitted_order(steps, errors)
    assert order > SOLVER_ORDER[solver] - 0.35, (order, errors)
    assert errors[-1] < (1e-4 if SOLVER_ORDER[solver] == 2 else 2e-2), errors


def test_heun_18_steps_denoiser_calls(gaussian):
    """EDM: 18 Heun steps = 35 denoiser evaluations."""
    gaussian.calls = 0
    S.sample(gaussian, seeds=[0, 1], shape=(12,), dtype=torch.float64)
    assert gaussian.calls == 35 == S.num_denoiser_calls("heun", 18)


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_dpmpp_2m_is_stable_with_few_steps(steps, gaussian):
    """ANCHORS trap 8: few steps and the final first-order step into 0 stay finite and sane."""
    x = 80.0 * torch.randn(8, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = gaussian.exact(x, 80.0, 0.0)
    out = S.sample_dpmpp_2m(gaussian, x, S.karras_sigmas(steps))
    assert bool(torch.isfinite(out).all())
    assert _relative_error(out, exact) < 1.0
