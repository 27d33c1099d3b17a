"""Probability flow distance with closed-form denoisers and a tiny Heun stand-in."""

from __future__ import annotations

import math

import pytest
import standins
import torch

from diffcore.metrics import pfd, pfd_from_samples

SHAPE = (1, 4, 4)
SEEDS = list(range(100, 124))


def _pfd(a, b, **kw):
    return pfd(
        a,
        b,
        seeds=SEEDS,
        shape=SHAPE,
        sigmas=standins.karras_sigmas(12, 0.002, 20.0),
        sampler=standins.heun_sampler,
        noise_fn=standins.noise_from_seeds,
        batch_size=10,
        **kw,
    )


@pytest.fixture(scope="module")
def denoisers():
    train = torch.rand((6, *SHAPE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {
        "g1": standins.gaussian_denoiser(0.0, 0.5),
        "g2": standins.gaussian_denoiser(0.2, 0.4),
        "emp": standins.empirical_denoiser(train),
        "mix": standins.blended_denoiser(train, 0.5),
    }


def test_pfd_of_a_denoiser_with_itself_is_zero(denoisers):
    for d in denoisers.values():
        res = _pfd(d, d)
        assert res.value == 0.0 and res.per_sample.shape == (len(SEEDS),)


def test_pfd_symmetric(denoisers):
    ab = _pfd(denoisers["g1"], denoisers["emp"])
    ba = _pfd(denoisers["emp"], denoisers["g1"])
    assert ab.value > 0
    assert ab.value == pytest.approx(ba.value, rel=1e-12)
    torch.testing.assert_close(ab.per_sample, ba.per_sample)


def test_pfd_triangle_inequality(denoisers):
    """PFD(a, c) <= PFD(a, b) + PFD(b, c) on shared samples; each flow map is computed once and
    pfd() itself is checked against pfd_from_samples of those maps."""
    sigmas = standins.karras_sigmas(12, 0.002, 20.0)
    z = standins.noise_from_seeds(SEEDS, SHAPE)
    maps = {name: standins.heun_sampler(d, z * sigmas[0], sigmas) for name, d in denoisers.items()}
    assert _pfd(denoisers["g1"], denoisers["mix"]).value == pytest.approx(
        pfd_from_samples(maps["g1"], maps["mix"]).value, rel=1e-6
    )  # pfd runs sigmas in float32
    dist = {(a, b): pfd_from_samples(maps[a], maps[b]).value for a in maps for b in maps}
    for a in maps:
        for b in maps:
            for c in maps:
                assert dist[a, c] <= dist[a, b] + dist[b, c] + 1e-9, (a, b, c)


def test_pfd_gaussians_matches_closed_form():
    """For isotropic Gaussians the PF-ODE map is affine: Phi(z) = mean + std * z (as sigma_max -> inf).

    With shared z: |Phi_a - Phi_b|^2 = |(m_a - m_b) + (s_a - s_b) z|^2, so
    E = D (m_a - m_b)^2 + D (s_a - s_b)^2 (z has unit variance, zero mean)."""
    seeds = list(range(2000))
    sigmas = standins.karras_sigmas(40, 0.002, 400.0)
    res = pfd(
        standins.gaussian_denoiser(0.0, 0.5),
        standins.gaussian_denoiser(0.2, 0.4),
        seeds=seeds,
        shape=SHAPE,
        sigmas=sigmas,
        sampler=standins.heun_sampler,
        noise_fn=standins.noise_from_seeds,
        normalize="per_dim",
    )
    want = math.sqrt(0.2**2 + 0.1**2)
    assert res.value == pytest.approx(want, rel=0.05)


def test_pfd_is_independent_of_batch_size(denoisers):
    kw = dict(
        seeds=SEEDS,
        shape=SHAPE,
        sigmas=standins.karras_sigmas(8, 0.002, 20.0),
        sampler=standins.heun_sampler,
        noise_fn=standins.noise_from_seeds,
    )
    r1 = pfd(denoisers["g1"], denoisers["emp"], batch_size=5, **kw)
    r2 = pfd(denoisers["g1"], denoisers["emp"], batch_size=64, **kw)
    torch.testing.assert_close(r1.per_sample, r2.per_sample)


def test_pfd_from_samples_normalization_and_errors():
    a, b = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    assert pfd_from_samples(a, b).value == pytest.approx(2.0)
    assert pfd_from_samples(a, b, normalize="per_dim").value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="normalize"):
        pfd_from_samples(a, b, normalize="mean")
    with pytest.raises(ValueError, match="samples_b"):
        pfd_from_samples(a, b[:2])
