"""Guidance wrappers: the CFG convention, w = 0 bitwise, interval boundaries, every solver."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore import sampler
from diffcore.sampler import GuidanceInterval, GuidedDenoiser, classifier_free_guidance

SOLVER_NAMES = ("euler", "heun", "dpmpp_2m", "ddim")


@pytest.fixture
def pair(models):
    """Two different Gaussian denoisers in R^12 as D_c and D_u."""
    return models.Gaussian(12, seed=1), models.Gaussian(12, seed=2)


def test_cfg_convention_matches_formula(pair):
    cond, uncond = pair
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    sigma = torch.full((5,), 0.7, dtype=torch.float64)
    for w in (0.5, 2.0, -1.0):
        out = classifier_free_guidance(cond, uncond, w)(x, sigma)
        expected = uncond(x, sigma) + (1 + w) * (cond(x, sigma) - uncond(x, sigma))
        torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)  # float64 rounding of 3 terms
    # w = -1 is the unconditional denoiser (up to that rounding)
    torch.testing.assert_close(
        classifier_free_guidance(cond, uncond, -1.0)(x, sigma), uncond(x, sigma), rtol=1e-13, atol=1e-13
    )


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_w_zero_is_conditional_sampling_bitwise(pair, solver):
    cond, uncond = pair
    shape, seeds = (3, 2, 2), list(range(4))
    plain = sampler.sample(cond, seeds=seeds, shape=shape, steps=8, solver=solver)
    calls_before = uncond.calls
    guided = sampler.sample(
        classifier_free_guidance(cond, uncond, 0.0), seeds=seeds, shape=shape, steps=8, solver=solver
    )
    assert torch.equal(plain, guided)
    assert uncond.calls == calls_before  # D_u is never evaluated at w = 0


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_guided_sampling_runs_on_every_solver(pair, solver):
    cond, uncond = pair
    shape, seeds = (3, 2, 2), list(range(3))
    plain = sampler.sample(cond, seeds=seeds, shape=shape, steps=8, solver=solver)
    guided = sampler.sample(
        classifier_free_guidance(cond, uncond, 1.5), seeds=seeds, shape=shape, steps=8, solver=solver
    )
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)


@pytest.mark.parametrize(
    "closed, low_in, high_in",
    [("right", False, True), ("left", True, False), ("both", True, True), ("neither", False, False)],
)
def test_interval_boundaries(closed, low_in, high_in):
    interval = GuidanceInterval(0.5, 2.0, closed)
    assert interval.contains(0.5) is low_in and interval.contains(2.0) is high_in
    assert interval.contains(1.0) and not interval.contains(0.4999) and not interval.contains(2.0001)
    for dtype in (torch.float32, torch.float64):
        got = interval.contains(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=dtype)).tolist()
        assert got == [low_in, True, high_in, False]


def test_interval_bounds_match_grid_points_in_float32():
    """A bound given as the float64 grid value matches the float32 sigma the sampler hands over."""
    grid = sampler.karras_sigmas(10, 0.002, 80.0).tolist()
    high = grid[3]  # not representable in float32
    interval = GuidanceInterval(grid[6], high)
    as_float32 = torch.tensor(grid[:-1], dtype=torch.float32)
    assert interval.contains(as_float32).tolist() == [False] * 3 + [True] * 3 + [False] * 4


def test_interval_validation():
    with pytest.raises(ValueError, match="low"):
        GuidanceInterval(-1.0, 2.0)
    with pytest.raises(ValueError, match="high"):
        GuidanceInterval(2.0, 1.0)
    with pytest.raises(ValueError, match="closed"):
        GuidanceInterval(0.0, 1.0, "open")
    with pytest.raises(ValueError, match="scale"):
        GuidedDenoiser(lambda x, s: x, lambda x, s, b: x, math.nan)
    with pytest.raises(TypeError, match="interval"):
        GuidedDenoiser(lambda x, s: x, lambda x, s, b: x, 1.0, interval=(0.0, 1.0))
    assert GuidanceInterval().everywhere and not GuidanceInterval(closed="both").everywhere
    assert GuidanceInterval(0.5, 2.0).describe() == "(0.5, 2]"


@pytest.mark.parametrize("closed", ["right", "left", "both", "neither"])
def test_interval_in_a_sampler_run(pair, closed):
    """Guidance acts at exactly the Euler steps whose sigma lies in the interval, bounds on grid points."""
    cond, uncond = pair
    grid = sampler.karras_sigmas(8, 0.002, 80.0)
    values = grid.tolist()
    interval = GuidanceInterval(values[5], values[2], closed)
    seen = []

    def term(x, sigma, base):
        seen.append(float(sigma[0]))
        return torch.zeros_like(base)

    sampler.sample_euler(GuidedDenoiser(cond, term, 1.0, interval), torch.randn(2, 12) * 80.0, grid)
    expected = [s for s in values[:-1] if interval.contains(torch.tensor(s, dtype=torch.float32))]
    assert seen == pytest.approx(expected, rel=1e-6)
    inner = values[3:5]
    wanted = (
        inner
        + ([values[5]] if closed in ("left", "both") else [])
        + ([values[2]] if closed in ("right", "both") else [])
    )
    assert sorted(seen) == pytest.approx(sorted(wanted), rel=1e-6)


def test_outside_the_interval_is_bitwise_base_and_rows_mix(pair):
    cond, uncond = pair
    x = torch.randn(4, 12, dtype=torch.float64)
    guided = classifier_free_guidance(cond, uncond, 2.0, GuidanceInterval(1.0, 10.0))
    outside = torch.full((4,), 0.5, dtype=torch.float64)
    assert torch.equal(guided(x, outside), cond(x, outside))
    assert torch.equal(guided(x, 20.0), cond(x, 20.0))
    mixed = torch.tensor([0.5, 2.0, 10.0, 11.0], dtype=torch.float64)
    out = guided(x, mixed)
    full = classifier_free_guidance(cond, uncond, 2.0)(x, mixed)
    assert torch.equal(out[[0, 3]], cond(x, mixed)[[0, 3]])
    assert torch.equal(out[[1, 2]], full[[1, 2]])
