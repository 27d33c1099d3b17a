"""MoLRGDenoiser against its definition: full-covariance Gaussians, Tweedie's formula, posteriors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from diffcore.denoisers import MoLRGDenoiser


def brute_force(bases, weights, x, sigma):
    """Posterior weights and posterior mean from full n x n covariances C_k = U_k U_k^T + s^2 I."""
    n = x.shape[1]
    logp = torch.stack(
        [
            MultivariateNormal(
                torch.zeros(n, dtype=torch.float64), u @ u.T + sigma**2 * torch.eye(n, dtype=torch.float64)
            ).log_prob(x)
            + math.log(w)
            for u, w in zip(bases, weights)
        ],
        dim=1,
    )
    post = torch.softmax(logp, dim=1)
    means = torch.stack([x @ (u @ u.T).T / (1 + sigma**2) for u in bases], dim=1)
    return post, (post[:, :, None] * means).sum(1), torch.logsumexp(logp, dim=1)


@pytest.mark.parametrize("dims", [(3, 3, 3), (2, 5, 3)])
def test_matches_full_covariance_mixture(dims):
    g = torch.Generator().manual_seed(0)
    n = 16
    q = torch.linalg.qr(torch.randn(n, sum(dims), generator=g, dtype=torch.float64))[0]
    bases = list(torch.split(q, list(dims), dim=1))
    weights = [0.2, 0.5, 0.3]
    den = MoLRGDenoiser(bases, torch.tensor(weights, dtype=torch.float64))
    x = torch.randn(6, n, generator=g, dtype=torch.float64) * 1.5
    for sigma in (0.3, 1.0, 3.0):
        post, mean, logp = brute_force(bases, weights, x, sigma)
        assert torch.allclose(den.posterior_weights(x, sigma), post, atol=1e-10)
        assert torch.allclose(den(x, sigma), mean, atol=1e-10)
        assert torch.allclose(den.log_prob(x, sigma), logp, atol=1e-9)


def test_tweedie_formula_holds():
    den = MoLRGDenoiser.random(3, 20, 4, orthogonal=False, seed=1)
    x = torch.randn(4, 20, dtype=torch.float64, requires_grad=True)
    sigma = 0.7
    score = torch.autograd.grad(den.log_prob(x, sigma).sum(), x)[0]
    # D(x; sigma) = x + sigma^2 grad log p_sigma(x)
    assert torch.allclose(den(x.detach(), sigma), x.detach() + sigma**2 * score, atol=1e-10)


def test_small_sigma_picks_the_generating_component_and_denoises():
    den = MoLRGDenoiser.random(4, 32, 3, seed=2, shape=(2, 4, 4))
    x0, labels = den.sample(50, seed=3, dtype=torch.float64, return_labels=True)
    assert x0.shape == (50, 2, 4, 4)
    noisy = x0 + 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    w = den.posterior_weights(noisy, 0.05)
    assert torch.allclose(w.sum(1), torch.ones(50, dtype=torch.float64))
    clear = x0.reshape(50, -1).norm(dim=1) > 0.5  # samples near the origin are ambiguous
    assert int(clear.sum()) > 40
    assert bool((w.argmax(1) == labels)[clear].all())
    err = (den(noisy, 0.05) - x0).reshape(50, -1).norm(dim=1) / x0.reshape(50, -1).norm(dim=1)
    assert float(err.mean()) < 0.1
    assert den(noisy.float(), 0.05).dtype == torch.float32


def test_torch_func_and_batched_sigma():
    den = MoLRGDenoiser.random(2, 10, 2, seed=5)
    x = torch.randn(3, 10, dtype=torch.float64)
    sig = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    out = den(x, sig)
    for b in range(3):
        assert torch.allclose(out[b], den(x[b : b + 1], float(sig[b]))[0], atol=1e-12)
    v = torch.randn(3, 10, dtype=torch.float64)
    _, jv = torch.func.jvp(lambda z: den(z, sig), (x,), (v,))
    eps = 1e-6
    fd = (den(x + eps * v, sig) - den(x - eps * v, sig)) / (2 * eps)
    assert torch.allclose(jv, fd, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="bases"):
        MoLRGDenoiser(torch.randn(2, 8, 3, dtype=torch.float64) * 3)
    with pytest.raises(ValueError, match="weights"):
        MoLRGDenoiser.random(2, 8, 2).__class__(MoLRGDenoiser.random(2, 8, 2).bases, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="ambient_dim"):
        MoLRGDenoiser.random(5, 8, 2)
    den = MoLRGDenoiser.random(2, 8, 2)
    with pytest.raises(ValueError, match="x"):
        den(torch.randn(3, 9), 1.0)


@pytest.mark.gpu
def test_gpu_matches_cpu(device):
    den = MoLRGDenoiser.random(3, 24, 4, seed=6)
    x = torch.randn(5, 24, dtype=torch.float64)
    on_device = den.to(device)
    assert torch.allclose(on_device(x.to(device), 0.4).cpu(), den(x, 0.4), atol=1e-10)
    assert torch.allclose(on_device.log_prob(x.to(device), 0.4).cpu(), den.log_prob(x, 0.4), atol=1e-8)


def test_noisy_molrg_matches_full_covariance_mixture():
    """noise_std = delta: components N(0, U U^T + delta^2 I); the posterior mean by Tweedie through
    full covariances, C0_k (C0_k + sigma^2 I)^{-1} x, against the closed form of the docstring."""
    g = torch.Generator().manual_seed(3)
    n, dims, delta = 12, (2, 3, 2), 0.3
    q = torch.linalg.qr(torch.randn(n, sum(dims), generator=g, dtype=torch.float64))[0]
    bases = list(torch.split(q, list(dims), dim=1))
    weights = [0.3, 0.3, 0.4]
    den = MoLRGDenoiser(bases, torch.tensor(weights, dtype=torch.float64), noise_std=delta)
    x = torch.randn(5, n, generator=g, dtype=torch.float64) * 1.3
    eye = torch.eye(n, dtype=torch.float64)
    for sigma in (0.05, 0.7, 4.0):
        clean = [u @ u.T + delta**2 * eye for u in bases]
        logp = torch.stack(
            [
                MultivariateNormal(torch.zeros(n, dtype=torch.float64), c + sigma**2 * eye).log_prob(x) + math.log(w)
                for c, w in zip(clean, weights)
            ],
            dim=1,
        )
        post = torch.softmax(logp, dim=1)
        means = torch.stack([x @ (c @ torch.linalg.inv(c + sigma**2 * eye)).T for c in clean], dim=1)
        assert torch.allclose(den.posterior_weights(x, sigma), post, atol=1e-10)
        assert torch.allclose(den(x, sigma), (post[:, :, None] * means).sum(1), atol=1e-10)
        assert torch.allclose(den.log_prob(x, sigma), torch.logsumexp(logp, dim=1), atol=1e-9)


def test_noise_std_zero_is_the_plain_mixture_and_negative_is_refused():
    plain = MoLRGDenoiser.random(3, 10, 2, seed=1)
    zero = MoLRGDenoiser.random(3, 10, 2, seed=1, noise_std=0.0)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert torch.equal(plain(x, 0.5), zero(x, 0.5))
    with pytest.raises(ValueError, match="noise_std"):
        MoLRGDenoiser.random(3, 10, 2, seed=1, noise_std=-0.1)
    noisy = MoLRGDenoiser.random(3, 10, 2, seed=1, noise_std=0.2)
    samples = noisy.sample(4000, seed=0, dtype=torch.float64)
    # per-dimension variance: d/n from the subspaces (unit latents, orthonormal bases) + delta^2
    assert abs(float(samples.var(0).mean()) - (2 / 10 + 0.04)) < 0.02
