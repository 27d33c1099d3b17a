"""GaussianDenoiser: fit, definition, exact PF-ODE map, Jacobian, torch.func compatibility."""

from __future__ import annotations

import pytest
import torch

from diffcore.denoisers import GaussianDenoiser
from diffcore.sampler import noise_from_seeds


def gaussian_data(num=400, shape=(3, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    scales = torch.linspace(2.0, 0.1, n, dtype=torch.float64)
    data = (torch.randn(num, n, generator=g, dtype=torch.float64) * scales) @ basis.T + 0.3
    return data.reshape(num, *shape)


@pytest.mark.parametrize("num", [400, 7])  # eigh branch (N > n) and SVD branch (N <= n)
def test_fit_recovers_mean_and_mle_covariance(num):
    data = gaussian_data(num)
    den = GaussianDenoiser.fit(data)
    rows = data.reshape(num, -1)
    cov = (rows - rows.mean(0)).T @ (rows - rows.mean(0)) / num
    recon = den.eigvecs @ torch.diag(den.eigvals) @ den.eigvecs.T
    assert torch.allclose(den.mean, rows.mean(0), atol=1e-12)
    assert torch.allclose(recon, cov, atol=1e-10)
    assert bool((den.eigvals[:-1] >= den.eigvals[1:]).all())
    assert den.shape == (3, 2, 2)


def test_denoiser_is_the_gaussian_posterior_mean():
    data = gaussian_data()
    den = GaussianDenoiser.fit(data)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 4.0, 80.0], dtype=torch.float64)
    cov = den.eigvecs @ torch.diag(den.eigvals) @ den.eigvecs.T
    out = den(x, sigma)
    for b in range(5):
        # E[x0 | x] = mu + Sigma (Sigma + s^2 I)^{-1} (x - mu)
        rhs = torch.linalg.solve(cov + sigma[b] ** 2 * torch.eye(12, dtype=torch.float64), x[b].reshape(-1) - den.mean)
        assert torch.allclose(out[b].reshape(-1), den.mean + cov @ rhs, atol=1e-9)
    assert den(x.float(), 0.5).dtype == torch.float32
    assert torch.allclose(den(x.float(), 0.5).double(), den(x, 0.5), atol=1e-5)


def _ode_solution(den, x, s0, s1, steps):
    """Heun integration of dx/ds = (x - D(x; s)) / s from s0 to s1 (float64)."""
    grid = torch.logspace(torch.log10(torch.tensor(s0)), torch.log10(torch.tensor(s1)), steps + 1, dtype=torch.float64)
    for a, b in zip(grid[:-1], grid[1:]):
        d1 = (x - den(x, float(a))) / a
        x_euler = x + (b - a) * d1
        d2 = (x_euler - den(x_euler, float(b))) / b
        x = x + (b - a) * 0.5 * (d1 + d2)
    return x


@pytest.mark.parametrize("rank", [None, 5])
def test_exact_flow_matches_the_integrated_pf_ode(rank):
    den = GaussianDenoiser.fit(gaussian_data(), rank=rank)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 5
    exact = den.exact_flow(x, 5.0, 0.2)
    coarse, fine = _ode_solution(den, x, 5.0, 0.2, 100), _ode_solution(den, x, 5.0, 0.2, 200)
    err_coarse, err_fine = (coarse - exact).norm(), (fine - exact).norm()
    assert err_fine / exact.norm() < 1e-4
    assert 3.0 < err_coarse / err_fine < 5.0  # Heun is second order: halving the step divides by ~4


def test_exact_flow_composes_and_reaches_data_at_zero():
    den = GaussianDenoiser.fit(gaussian_data(), rank=6)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 10
    two_legs = den.exact_flow(den.exact_flow(x, 10.0, 1.0), 1.0, 0.0)
    assert torch.allclose(two_legs, den.exact_flow(x, 10.0, 0.0), atol=1e-10)
    # at sigma = 0 the sample lies in mu + span(U) (rank truncation: outside part scaled by 0)
    centered = den.exact_flow(x, 10.0, 0.0).reshape(4, -1) - den.mean
    assert torch.allclose(centered - centered @ den.eigvecs @ den.eigvecs.T, torch.zeros_like(centered), atol=1e-10)
    per_row = torch.tensor([10.0, 8.0, 6.0, 4.0], dtype=torch.float64)
    rowwise = den.exact_flow(x, per_row, 0.5)
    assert torch.allclose(rowwise[1], den.exact_flow(x[1:2], 8.0, 0.5)[0], atol=1e-12)


def test_samples_are_per_seed_and_have_the_data_covariance():
    den = GaussianDenoiser.fit(gaussian_data())
    a = den.sample(noise_from_seeds([5, 6, 7], den.shape, dtype=torch.float64))
    b = den.sample(noise_from_seeds([7], den.shape, dtype=torch.float64))
    assert torch.allclose(a[2], b[0], atol=1e-12, rtol=0)  # same noise; only GEMM rounding may differ
    many = den.sample(torch.randn(4000, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    rows = many.reshape(4000, -1)
    cov = torch.cov(rows.T, correction=0)
    target = den.eigvecs @ torch.diag(den.eigvals) @ den.eigvecs.T
    assert (cov - target).norm() / target.norm() < 0.08
    assert (rows.mean(0) - den.mean).norm() < 0.15


def test_jacobian_matrix_and_torch_func():
    den = GaussianDenoiser.fit(gaussian_data())
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    v = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    w = den.jacobian(0.7)
    _, jv = torch.func.jvp(lambda z: den(z, 0.7), (x,), (v,))
    assert torch.allclose(jv.reshape(2, -1), v.reshape(2, -1) @ w.T, atol=1e-12)
    wb = den.jacobian(torch.tensor([0.7, 2.0]))
    assert wb.shape == (2, 12, 12) and torch.allclose(wb[0], w)
    batched = torch.func.vmap(lambda t: torch.func.jvp(lambda z: den(z, 0.7), (x,), (t,))[1])(
        v[None].repeat(3, 1, 1, 1, 1)
    )
    assert torch.allclose(batched[1], jv)


def test_bad_input_raises_naming_the_argument():
    den = GaussianDenoiser.fit(gaussian_data())
    with pytest.raises(ValueError, match="x"):
        den(torch.randn(2, 11, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        den(torch.randn(2, 12, dtype=torch.float64), -1.0)
    with pytest.raises(ValueError, match="sigma_to"):
        den.exact_flow(torch.randn(2, 12, dtype=torch.float64), 1.0, torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="rank"):
        GaussianDenoiser.fit(gaussian_data(), rank=13)


@pytest.mark.gpu
def test_runs_on_the_device_of_the_fitted_tensors(device):
    den = GaussianDenoiser.fit(gaussian_data()).to(device)
    x = torch.randn(3, 3, 2, 2, device=device)
    assert den(x, 1.0).device.type == device.type
    cpu = GaussianDenoiser.fit(gaussian_data())
    assert torch.allclose(den(x, 1.0).cpu(), cpu(x.cpu(), 1.0), atol=1e-5)
    assert torch.allclose(
        den.exact_flow(x.double(), 5.0, 0.0).cpu(), cpu.exact_flow(x.double().cpu(), 5.0, 0.0), atol=1e-10
    )
