"""The float64 references against direct definitions on tiny inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from diffcore.ref.empirical_denoise import empirical_denoise_ref
from diffcore.ref.knn import knn_ref


def test_empirical_denoise_ref_matches_definition():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 2, 5, generator=g), torch.randn(7, 2, 5, generator=g)
    sigma = torch.tensor([0.3, 1.0, 5.0])
    out, logz = empirical_denoise_ref(x, y, sigma)
    for b in range(3):
        logits = torch.stack([-((x[b].double() - yi.double()) ** 2).sum() / (2 * sigma[b].double() ** 2) for yi in y])
        w = torch.softmax(logits, 0)
        assert torch.allclose(out[b], (w[:, None, None] * y.double()).sum(0), atol=1e-12)
        assert torch.allclose(logz[b], torch.logsumexp(logits, 0), atol=1e-12)


def test_empirical_denoise_ref_small_sigma_is_nearest_neighbour_and_uint8():
    y8 = torch.randint(0, 256, (9, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = y8.double() / 127.5 - 1
    x = y[4:5] + 1e-4
    out, _ = empirical_denoise_ref(x, y8, 0.002)
    assert torch.allclose(out, y[4:5], atol=1e-10)


def test_knn_ref_orders_and_breaks_ties_by_index():
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])
    q = torch.zeros(1, 2)
    d, i = knn_ref(q, y, k=3)
    assert i.tolist() == [[0, 1, 2]]
    assert torch.allclose(d, torch.ones(1, 3, dtype=torch.float64))


# ---------------------------------------------------------------- tiny sigma, ties (issue 18, item 10)
def _two_rows_and_their_midpoint(dim=50, rows=6):
    """float32-valued rows (their float64 midpoint is exact, so the two distances tie exactly)."""
    y = (torch.rand(rows, dim, generator=torch.Generator().manual_seed(2)) * 2 - 1).double()
    y[2:] += 4.0  # the other rows far away: rows 0 and 1 are the nearest
    return y, ((y[0] + y[1]) / 2)[None]


def test_empirical_denoise_ref_midpoint_at_tiny_sigma_is_the_mean():
    """logits near -1e16 cannot hold the log 2 of a tie: relative to the best distance they can."""
    y, x = _two_rows_and_their_midpoint()
    out, logz = empirical_denoise_ref(x, y, 1e-8)
    assert float((out[0] - (y[0] + y[1]) / 2).abs().max()) <= 2.0**-52
    best = float(((x[0] - y[0]) ** 2).sum())
    assert abs(float(logz[0]) - (-best / 2e-16 + math.log(2))) <= 4 * abs(best / 2e-16) * 2.0**-53


def test_empirical_denoise_ref_duplicated_row_counts_twice():
    y, x = _two_rows_and_their_midpoint()
    out, _ = empirical_denoise_ref(x, torch.cat([y[:1], y]), 1e-8)  # row 0 twice: weights 2/3, 1/3
    assert float((out[0] - (2 * y[0] + y[1]) / 3).abs().max()) <= 4 * 2.0**-52


def test_empirical_denoise_ref_near_tie_at_tiny_sigma_matches_exact_arithmetic():
    """x a few ulps off the midpoint: the excess distances (about 1e-16) decide the weights at
    sigma 1e-8. Expected weights from exact rational arithmetic on the float64 inputs."""
    y, x = _two_rows_and_their_midpoint(dim=5, rows=3)
    x = x.clone()
    x[0, :3] = torch.nextafter(x[0, :3], torch.full((3,), 2.0, dtype=torch.float64))
    sigma = 1e-8
    exact = [sum((Fraction(float(a)) - Fraction(float(b))) ** 2 for a, b in zip(x[0], row)) for row in y]
    best = min(exact)
    logits = [-float((d - best) / (2 * Fraction(sigma) ** 2)) for d in exact]
    weights = torch.tensor([math.exp(v) for v in logits], dtype=torch.float64)
    weights /= weights.sum()
    assert 0.01 < float(weights[:2].min()) < 0.99  # a genuine near-tie: both rows weigh
    out, _ = empirical_denoise_ref(x, y, sigma)
    torch.testing.assert_close(out[0], weights @ y, rtol=0, atol=1e-12)
