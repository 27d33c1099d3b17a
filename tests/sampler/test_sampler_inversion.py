"""ODE inversion data -> noise, and the round trip back."""

from __future__ import annotations

import pytest
import torch

import diffcore.sampler as S


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "euler"])
def test_round_trip_error_falls_with_steps(solver, gaussian):
    x0 = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (8, 32, 128):
        latent, error = S.invert(gaussian, x0, steps=steps, solver=solver, return_error=True)
        assert latent.shape == x0.shape and error.shape == (6,)
        errors.append(float(error.max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[-1] < (1e-4 if solver != "euler" else 0.1), errors


def test_inversion_matches_the_exact_flow(gaussian):
    """On Gaussian data the latent is the exact PF-ODE map from sigma_min to sigma_max."""
    x0 = torch.randn(4, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = S.inversion_sigmas(64)
    assert float(grid[0]) == 0.002 and float(grid[-1]) == 80.0 and bool((grid[1:] > grid[:-1]).all())
    expected = gaussian.exact(x0, 0.002, 80.0)
    errors = [float(S.relative_rms_error(S.invert(gaussian, x0, steps=n), expected).max()) for n in (32, 128)]
    assert errors[0] / errors[1] > 10 and errors[1] < 2e-3, errors  # Heun: second order


def test_sampling_from_the_latent_reconstructs_the_data(gaussian):
    x0 = torch.randn(3, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = S.inversion_sigmas(64)
    latent = S.invert(gaussian, x0, grid)
    back = S.sample_heun(gaussian, latent, grid.flip(0), require_zero_end=False)
    assert float(S.relative_rms_error(back, x0).max()) < 1e-3
    # the full sampler (ending in 0) lands within O(sigma_min) of the data as well
    full = S.sample_heun(gaussian, latent, S.karras_sigmas(64))
    assert float(S.relative_rms_error(full, x0).max()) < 1e-2


def test_float32_data_with_float64_state(gaussian):
    x0 = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    latent, error = S.invert(gaussian, x0, steps=32, state_dtype=torch.float64, return_error=True)
    _, error64 = S.invert(gaussian, x0.double(), steps=32, return_error=True)
    assert latent.dtype == torch.float64
    torch.testing.assert_close(error, error64, rtol=0, atol=1e-5)  # float32 model input rounding only
