"""Ring keys, injection, inversion detection and the null-space measure (diffcore.analysis.watermark)."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore import sampler
from diffcore.analysis import watermark as wm
from diffcore.denoisers import GaussianDenoiser

SHAPE = (1, 16, 16)


def smooth_gaussian(shape=SHAPE, floor=1e-3, seed=0) -> GaussianDenoiser:
    """A full-rank Gaussian with a smooth-image spectrum: eigenvalue 0.5 / (1 + |f|^2) for the 2-D
    cosine basis at frequency f, plus ``floor`` (high frequencies carry little variance, as images)."""
    c, h, w = shape
    n = c * h * w
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    freq = torch.arange(n, dtype=torch.float64)
    lam = 0.5 / (1.0 + freq) + floor
    mean = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    return GaussianDenoiser(mean, basis, lam, shape=shape)


# --------------------------------------------------------------------------- keys


def test_key_is_seeded_and_platform_independent():
    a = wm.ring_key(SHAPE, radius=4, seed=7)
    b = wm.ring_key(SHAPE, radius=4, seed=7)
    c = wm.ring_key(SHAPE, radius=4, seed=8)
    assert torch.equal(a.values, b.values) and torch.equal(a.mask, b.mask)
    assert not torch.allclose(a.values[a.mask], c.values[c.mask])
    # golden values: Box-Muller on Python's Mersenne Twister (random(), whose sequence Python guarantees)
    z = wm.seeded_normals(0, 4)
    assert z[:3] == pytest.approx([0.09637157846515239, -0.05850007947614822, -0.9894262130739009], rel=1e-12)
    key = wm.ring_key(SHAPE, radius=2, seed=0)
    scale = math.sqrt(16 * 16 / 2)
    assert key.values[8, 8] == pytest.approx(z[0] * scale, rel=1e-12)  # centre: Re(ring 1)
    assert key.values[9, 8] == pytest.approx(complex(z[0], z[1]) * scale, rel=1e-12)  # ring 1, upper half
    assert key.values[7, 8] == pytest.approx(complex(z[0], -z[1]) * scale, rel=1e-12)  # its mirror: conj
    assert key.values[8, 10] == pytest.approx(complex(z[2], z[3]) * scale, rel=1e-12)  # ring 2
    assert key.values[8, 11] == 0 and not key.mask[8, 11]


def test_key_is_hermitian_so_injection_is_real_and_exact():
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for band in wm.BANDS:
        key = wm.ring_key((2, 16, 16), radius=5, channel=1, band=band, seed=3)
        sigma = 1.7
        marked = wm.inject(x, key, sigma)
        assert torch.equal(marked[:, 0], x[:, 0])  # other channels untouched
        assert float(wm.key_distance(marked, key, sigma).max()) < 1e-9  # the disc equals the key
        coeffs = wm.spectrum(marked[:, 1] * wm.vp_scale(sigma), band)
        before = wm.spectrum(x[:, 1] * wm.vp_scale(sigma), band)
        outside = ~key.mask
        assert torch.allclose(coeffs[:, outside], before[:, outside], atol=1e-9)  # nothing else moved


def test_bands_hold_high_and_low_frequencies():
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    high = wm.inject(x, wm.ring_key(SHAPE, radius=2, band="high"), 0.5)
    low = wm.inject(x, wm.ring_key(SHAPE, radius=2, band="low"), 0.5)
    # high band: neighbouring pixels anti-correlated; low band: smooth
    assert float((high[..., 1:] * high[..., :-1]).sum()) < 0 < float((low[..., 1:] * low[..., :-1]).sum())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"radius": 8}, "radius"),
        ({"radius": 0}, "radius"),
        ({"radius": 3, "channel": 1}, "channel"),
        ({"radius": 3, "channel": -1}, "channel"),
        ({"radius": 3, "band": "mid"}, "band"),
    ],
)
def test_key_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wm.ring_key(SHAPE, **kwargs)


def test_bad_shape_and_time():
    with pytest.raises(ValueError, match="shape"):
        wm.ring_key((1, 15, 16), radius=2)
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="time"):
            wm.sigma_at_time(bad)
    assert wm.sigma_at_time(0.3) == pytest.approx(1.2402, abs=1e-4)  # DDPM linear, timestep 300
    with pytest.raises(ValueError, match="x"):
        wm.inject(torch.zeros(1, 1, 8, 8), wm.ring_key(SHAPE, radius=2), 1.0)


def test_split_sigmas_inserts_the_injection_level():
    grid = sampler.karras_sigmas(10)
    upper, lower = wm.split_sigmas(grid, 1.0)
    assert float(upper[-1]) == 1.0 == float(lower[0]) and float(lower[-1]) == 0.0
    assert upper.numel() + lower.numel() - 1 == grid.numel() + 1
    top, whole = wm.split_sigmas(grid, float(grid[0]))
    assert top is None and torch.equal(whole, grid)
    on_grid = float(grid[4])
    upper, lower = wm.split_sigmas(grid, on_grid)
    assert upper.numel() + lower.numel() - 1 == grid.numel()
    with pytest.raises(ValueError, match="sigma"):
        wm.split_sigmas(grid, 100.0)


# --------------------------------------------------------------------------- embed and detect


@pytest.fixture(scope="module")
def gaussian_run():
    """Shallow Diffuse on a Gaussian denoiser (inversion exact up to solver error), float64."""
    model = smooth_gaussian()
    key = wm.ring_key(SHAPE, radius=4, seed=0)
    sigmas = sampler.karras_sigmas(24)
    sigma = wm.sigma_at_time(0.3)
    x_pos = sampler.noise_from_seeds(range(8), SHAPE, dtype=torch.float64) * 80.0
    x_neg = sampler.noise_from_seeds(range(100, 108), SHAPE, dtype=torch.float64) * 80.0
    marked = wm.embed(model, x_pos, sigmas, key, sigma, solver="heun")
    negatives = sampler.sample_heun(model, x_neg, sigmas)
    return model, key, sigmas, sigma, marked, negatives


def test_injection_then_detection_separates_keys(gaussian_run):
    model, key, sigmas, sigma, marked, negatives = gaussian_run
    pos = wm.detect(model, marked.watermarked, sigmas, key, sigma, solver="heun", p_value=True)
    neg = wm.detect(model, negatives, sigmas, key, sigma, solver="heun", p_value=True)
    twin = wm.detect(model, marked.clean, sigmas, key, sigma, solver="heun")
    # inversion recovers the key up to solver error: far below the unmarked images' distance
    assert float(pos["distance"].max()) < 0.05 * float(neg["distance"].min())
    assert float(pos["distance"].max()) < 0.05 * float(twin["distance"].min())
    assert float(pos["p_value"].max()) < 1e-6 < float(neg["p_value"].min())
    # the state at sigma comes back: the inverted state equals the injected one
    state = wm.invert_to(model, marked.watermarked, sigmas, sigma, solver="heun")
    error = sampler.relative_rms_error(state, marked.state + marked.delta)
    assert float(error.max()) < 0.02, error


def test_wrong_key_is_not_detected(gaussian_run):
    """Images marked with key 0, tested for 40 other keys with the key-rank p-value (99 reference
    keys) at the 5 % level: detected about 5 % of the time (uniform p), the right key always."""
    model, key, sigmas, sigma, marked, negatives = gaussian_run
    right = wm.detect(model, marked.watermarked, sigmas, key, sigma, solver="heun", key_rank=99, return_state=True)
    assert float(right["key_rank"].max()) == 0.01  # the smallest possible p
    state = right["state"]
    p_wrong = torch.stack(
        [wm.key_rank_p_value(state, wm.ring_key(SHAPE, radius=4, seed=seed), sigma) for seed in range(1, 41)]
    )  # [40 keys, 8 images]
    assert float((p_wrong <= 0.05).double().mean()) <= 0.15
    assert 0.3 < float(p_wrong.mean()) < 0.7  # about uniform
    distance_wrong = torch.stack(
        [wm.key_distance(state, wm.ring_key(SHAPE, radius=4, seed=seed), sigma) for seed in range(1, 41)]
    )
    assert float(distance_wrong.min()) > 20 * float(right["distance"].max())


def test_tree_ring_p_value_is_not_a_key_test(gaussian_run):
    """Documented limitation: Tree-Ring's chi-square p-value assumes 2M independent coefficients,
    a ring key has 2 radius random numbers, so a wrong key can look detected (p < 1e-6)."""
    model, key, sigmas, sigma, marked, _ = gaussian_run
    state = wm.invert_to(model, marked.watermarked, sigmas, sigma, solver="heun")
    p = torch.stack([wm.key_p_value(state, wm.ring_key(SHAPE, radius=4, seed=seed), sigma) for seed in range(1, 8)])
    assert float(p.min()) < 1e-6 and float(p.max()) > 0.1


def test_tree_ring_baseline_in_the_same_harness(gaussian_run):
    model, key, sigmas, _, _, negatives = gaussian_run
    top = float(sigmas[0])
    x = sampler.noise_from_seeds(range(4), SHAPE, dtype=torch.float64) * 80.0
    marked = wm.embed(model, x, sigmas, key, top, solver="heun")
    assert torch.equal(marked.state, x)  # the key goes into x_T itself
    pos = wm.detect(model, marked.watermarked, sigmas, key, top, solver="heun")["distance"]
    neg = wm.detect(model, negatives, sigmas, key, top, solver="heun")["distance"]
    assert float(pos.max()) < 0.1 * float(neg.min())


def test_null_space_fraction_on_a_low_rank_gaussian():
    n = 64
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    model = GaussianDenoiser(
        torch.zeros(n, dtype=torch.float64),
        basis[:, :3],
        torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64),
        shape=(1, 8, 8),
    )
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    inside = torch.stack([basis[:, 0], basis[:, 1]]).reshape(2, 1, 8, 8)
    outside = torch.stack([basis[:, 10], basis[:, 40] + basis[:, 50]]).reshape(2, 1, 8, 8)
    r_in = wm.null_space_fraction(model, x, 0.5, inside, k=6)
    r_out = wm.null_space_fraction(model, x, 0.5, outside, k=6)
    assert r_in.rank.tolist() == [3, 3]
    assert torch.allclose(r_in.fraction, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(r_out.fraction, torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert float(r_out.response.max()) < 1e-6 < float(r_in.response.min())
    with pytest.raises(ValueError, match="delta"):
        wm.null_space_fraction(model, x, 0.5, inside[:1], k=2)
