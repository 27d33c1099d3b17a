"""The LOCO Edit pipeline of diffcore.analysis.editing (docs/papers.md section 5, issue 13).

On a Gaussian denoiser D(x) = mu + W (x - mu), W = U diag(lam / (lam + s^2)) U^T, the Jacobian is W
at every x, so the masked directions are known in closed form: the right singular vectors of M W
are the top eigenvectors of W M W (M a 0/1 mask), those of the outside the top eigenvectors of
W (1 - M) W; and with a linear sampler (DDIM) every edit's change is linear in the direction and
the same for every image."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore import sampler
from diffcore.analysis import (
    EditTimeline,
    compose_directions,
    edit_linearity,
    edit_locality,
    edit_samples,
    jacobian_spectrum,
    load_directions,
    loco_directions,
    principal_angles,
    region_mask,
    sample_back,
    save_directions,
)
from diffcore.denoisers import GaussianDenoiser

SHAPE = (1, 6, 6)
SIGMA = 0.7


@pytest.fixture
def gaussian():
    """A Gaussian on 1 x 6 x 6 with eigenvalues 2 * 0.8^k (a decaying spectrum with gaps)."""
    g = torch.Generator().manual_seed(3)
    n = math.prod(SHAPE)
    u = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    lam = 2.0 * 0.8 ** torch.arange(n, dtype=torch.float64)
    return GaussianDenoiser(torch.randn(n, generator=g, dtype=torch.float64) * 0.1, u, lam, shape=SHAPE)


@pytest.fixture
def upper():
    m = torch.zeros(SHAPE, dtype=torch.float64)
    m[:, :3] = 1
    return m


def _top_eigenvectors(sym: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k eigenvectors of a symmetric [n, n] matrix as rows [k, n]."""
    vals, vecs = torch.linalg.eigh(sym)
    return vecs[:, vals.argsort(descending=True)[:k]].T


def _points(n: int = 2) -> torch.Tensor:
    return torch.randn(n, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(11))


def test_directions_match_the_analytic_ones(gaussian, upper):
    x = _points()
    k_out, rank = 4, 2
    dirs = loco_directions(gaussian, x, SIGMA, upper, rank=rank, k_out=k_out, tol=1e-12, method="lanczos")
    w = gaussian.jacobian(SIGMA)
    m = upper.reshape(-1)
    inside = _top_eigenvectors(w @ torch.diag(m) @ w, rank)
    outside = _top_eigenvectors(w @ torch.diag(1 - m) @ w, k_out)
    for b in range(x.shape[0]):
        for r in range(rank):  # each singular vector on its own (not just the span)
            angle = principal_angles(dirs.unprojected[b, r].reshape(1, -1), inside[r : r + 1])
            assert float(angle.max()) < 1.0
        assert float(principal_angles(dirs.outside[b].reshape(k_out, -1), outside).max()) < 1.0
        # the projection removes exactly the outside directions: orthogonal to them, and the change
        # from the unprojected vector lies in their span
        d = dirs.directions[b].reshape(rank, -1)
        assert float((d @ outside.T).abs().max()) < 1e-6
        for r in range(rank):
            v = inside[r] * torch.sign(inside[r] @ dirs.unprojected[b, r].reshape(-1))
            expected = v - outside.T @ (outside @ v)
            expected = expected / expected.norm()
            assert float(principal_angles(d[r : r + 1], expected[None]).max()) < 1.0
            assert float((d[r] - expected).norm()) < 1e-4
    torch.testing.assert_close(
        dirs.directions.reshape(2, rank, -1).norm(dim=-1), torch.ones(2, rank, dtype=torch.float64)
    )
    # the masked singular values are the square roots of the eigenvalues of W M W
    expected_s = torch.linalg.eigvalsh(w @ torch.diag(m) @ w).flip(0)[:rank].sqrt()
    torch.testing.assert_close(dirs.singular_values[0], expected_s, rtol=1e-8, atol=1e-10)


def test_exact_directions_match_subspace_iteration(gaussian, upper):
    """The controls' exact-SVD directions equal loco_directions' (up to sign), the projection leaves
    a unit vector orthogonal to the outside basis, and the Gaussian's own top masked direction is
    the LOCO direction before projection when J = W_G."""
    from diffcore.analysis import jacobian_full
    from diffcore.analysis.editing import exact_loco_directions, project_out, top_masked_direction

    x = _points()
    k_out = 4
    exact = exact_loco_directions(jacobian_full(gaussian, x, SIGMA, mode="rev"), upper, k_out)
    w, m = gaussian.jacobian(SIGMA), upper.reshape(-1)
    inside = _top_eigenvectors(w @ torch.diag(m) @ w, 1)[0]
    outside = _top_eigenvectors(w @ torch.diag(1 - m) @ w, k_out)
    expected = inside - outside.T @ (outside @ inside)
    for b in range(x.shape[0]):
        assert float(principal_angles(exact.unprojected[b][None], inside[None]).max()) < 1.0
        assert float(principal_angles(exact.loco[b][None], expected[None]).max()) < 1.0
    noise = torch.randn(2, math.prod(SHAPE), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    projected = project_out(noise, exact.outside)
    assert float((projected.transpose(0, 1)[None].transpose(1, 2) @ exact.outside).abs().max()) < 1e-10
    torch.testing.assert_close(projected.norm(dim=1), torch.ones(2, dtype=torch.float64))
    top = top_masked_direction(gaussian.jacobian(SIGMA), upper)
    assert float(principal_angles(top[None], exact.unprojected[:1]).max()) < 1.0
    with pytest.raises(ValueError, match="k_out"):
        exact_loco_directions(jacobian_full(gaussian, x, SIGMA, mode="rev"), upper, 1000)


def test_spectrum_full_and_partial_agree(gaussian, upper):
    x = _points(1)
    s_full, frob_full = jacobian_spectrum(gaussian, x, SIGMA, mask=upper)
    w = gaussian.jacobian(SIGMA) * upper.reshape(-1, 1)
    torch.testing.assert_close(s_full[0], torch.linalg.svdvals(w), rtol=1e-10, atol=1e-12)
    s_top, frob = jacobian_spectrum(gaussian, x, SIGMA, mask=upper, k=8, probes=64, tol=1e-12, iters=300)
    torch.testing.assert_close(s_top[0], s_full[0, :8], rtol=1e-8, atol=1e-10)
    assert abs(float(frob[0] / frob_full[0]) - 1) < 0.05  # Hutchinson on the small remainder


def _latents(gaussian, n=3, edit_time=0.4, steps=20):
    timeline = EditTimeline()
    noise = sampler.noise_from_seeds(list(range(n)), gaussian.shape, dtype=torch.float64)
    x0 = gaussian.sample(noise).to(torch.float32).to(torch.float64)
    x_t = sampler.invert(gaussian, x0, timeline.inversion_grid(edit_time, steps), solver="ddim")
    return timeline, x_t, timeline.sampling_grid(edit_time, steps)


def test_zero_strength_is_the_unedited_sample_bitwise(mlp_denoiser):
    x_t = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    v = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    timeline = EditTimeline()
    sigmas = timeline.sampling_grid(0.3, 20)
    for kwargs in (
        {"solver": "ddim"},
        {"solver": "heun"},
        {"solver": "ddim", "stochastic_below": timeline.sigma(0.1), "seeds": [5, 6]},
    ):
        edited = edit_samples(mlp_denoiser, x_t, v, [0.0, 1.5], sigmas, **kwargs)
        original = sample_back(mlp_denoiser, x_t, sigmas, **kwargs)
        assert torch.equal(edited[0], original)
        assert not torch.equal(edited[1], original)


def test_transfer_and_composition_match_direct_computation(gaussian, upper):
    timeline, x_t, sigmas = _latents(gaussian)
    sigma = float(timeline.sigma(0.4))
    dirs = loco_directions(gaussian, x_t, sigma, upper, rank=2, k_out=3, tol=1e-12, iters=500)
    # the Jacobian is the same everywhere: image 2's own direction is image 0's, transferred
    assert float(principal_angles(dirs.directions[0, :1].flatten(1), dirs.directions[2, :1].flatten(1))) < 1e-3
    original = sample_back(gaussian, x_t, sigmas)
    moved = edit_samples(gaussian, x_t, dirs.directions[0, 0], [2.0], sigmas)[0]  # shared direction
    own = edit_samples(gaussian, x_t[:1], dirs.directions[0, 0][None], [2.0], sigmas)[0]
    direct = sample_back(gaussian, x_t + 2.0 * dirs.directions[0, 0], sigmas)
    torch.testing.assert_close(moved, direct, rtol=0, atol=1e-12)
    # an affine flow: the transferred change equals the own change on every image
    for b in range(3):
        torch.testing.assert_close(moved[b] - original[b], own[0] - original[0], rtol=0, atol=1e-10)
    # composition: x_t + 1 * (a v1 + b v2) is the sum of the two edits
    a, b = 1.5, -2.5
    both = compose_directions(dirs.directions, (a, b))
    composed = edit_samples(gaussian, x_t, both, [1.0], sigmas)[0]
    one = edit_samples(gaussian, x_t, dirs.directions[:, 0], [a], sigmas)[0]
    two = edit_samples(gaussian, x_t, dirs.directions[:, 1], [b], sigmas)[0]
    torch.testing.assert_close(composed - original, (one - original) + (two - original), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        composed,
        sample_back(gaussian, x_t + a * dirs.directions[:, 0] + b * dirs.directions[:, 1], sigmas),
        rtol=0,
        atol=1e-12,
    )
    # the edit is local: most of the change lies inside the mask, more than without the projection
    loc = edit_locality(moved - original, upper)
    raw = edit_samples(gaussian, x_t, dirs.unprojected[:, 0], [2.0], sigmas)[0]
    assert bool((loc["inside_fraction"] > edit_locality(raw - original, upper)["inside_fraction"]).all())


def test_measures_on_known_changes():
    mask = torch.zeros(1, 2, 2)
    mask[0, 0] = 1
    delta = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])
    loc = edit_locality(delta, mask)
    assert float(loc["inside"]) == 9 and float(loc["outside"]) == 2
    assert float(loc["locality"]) == 4.5 and abs(float(loc["inside_fraction"]) - 9 / 11) < 1e-15
    assert float(loc["outside_mse"]) == 1.0
    assert math.isinf(float(edit_locality(delta * mask, mask)["locality"]))
    assert math.isnan(float(edit_locality(torch.zeros_like(delta), mask)["inside_fraction"]))
    plus = torch.stack([delta, 2.5 * delta])[:, None]  # [S, B, ...], linear in s
    lin = edit_linearity(plus, -plus, [1.0, 2.5])
    torch.testing.assert_close(lin["cosine_pm"], -torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(lin["gain"], torch.ones(2, 1, dtype=torch.float64))


def test_timeline_maps_times_to_the_ddpm_noise_levels():
    timeline = EditTimeline()
    abar = sampler.ddpm_alphas_cumprod(1000, "linear")
    for step in (0, 100, 600, 999):
        assert timeline.sigma(step / 1000) == pytest.approx(float(((1 - abar[step]) / abar[step]).sqrt()), rel=1e-12)
    grid = timeline.inversion_grid(0.6, 100)
    assert grid.numel() == 61 and bool((grid[1:] > grid[:-1]).all())
    assert float(grid[-1]) == pytest.approx(timeline.sigma(0.6))
    down = timeline.sampling_grid(0.6, 100)
    assert float(down[-1]) == 0 and torch.equal(down[:-1], grid.flip(0))
    gen = timeline.generation_grid(0.6, 100)
    assert gen.numel() == 41 and float(gen[0]) == pytest.approx(timeline.sigma(1.0))


def test_saved_directions_round_trip(tmp_path, gaussian, upper):
    dirs = loco_directions(gaussian, _points(1), SIGMA, upper, rank=1, k_out=2, tol=1e-10)
    back = load_directions(save_directions(tmp_path / "d.safetensors", dirs))
    for name in ("directions", "unprojected", "singular_values", "outside", "outside_singular_values"):
        assert torch.equal(getattr(back, name), getattr(dirs, name))
    assert back.sigma == dirs.sigma
    with pytest.raises(ValueError, match="path"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_directions(tmp_path / "other.safetensors")


def test_bad_input_names_the_argument(gaussian, upper):
    x = _points(1)
    with pytest.raises(ValueError, match="mask"):
        loco_directions(gaussian, x, SIGMA, torch.ones(5, 5), rank=1)
    with pytest.raises(ValueError, match="mask.*empty"):
        loco_directions(gaussian, x, SIGMA, torch.zeros(SHAPE), rank=1)
    with pytest.raises(ValueError, match="rank"):
        loco_directions(gaussian, x, SIGMA, upper, rank=19, k_out=0)  # 18 pixels inside
    with pytest.raises(ValueError, match="k_out"):
        loco_directions(gaussian, x, SIGMA, torch.ones(SHAPE), rank=1, k_out=1)
    with pytest.raises(ValueError, match="mask"):
        region_mask(torch.full(SHAPE, 2.0), SHAPE)
    timeline = EditTimeline()
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="edit_time"):
            timeline.inversion_grid(bad, 100)
    with pytest.raises(ValueError, match="direction"):
        edit_samples(gaussian, x, torch.zeros(2, 2), [1.0], timeline.sampling_grid(0.5, 10))
    with pytest.raises(ValueError, match="seeds"):
        sample_back(gaussian, x, timeline.sampling_grid(0.5, 10), stochastic_below=1.0)
