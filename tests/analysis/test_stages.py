"""Stage division: the dynamic program against brute force, grid-density invariance, the similarity."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from diffcore.analysis import (
    Segmentation,
    contiguous_segmentation,
    denoiser_similarity,
    segmentation_cost,
    stage_boundaries,
)


def _random_similarity(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((size, 4)).cumsum(0)  # a drifting path: nearby grid points are similar
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points @ points.T


@pytest.mark.parametrize("size, segments, seed", [(6, 1, 0), (7, 2, 1), (8, 3, 2), (9, 4, 3), (9, 9, 4), (5, 3, 5)])
def test_dynamic_program_matches_brute_force(size, segments, seed):
    similarity = _random_similarity(size, seed)
    result = contiguous_segmentation(similarity, segments)
    brute = min(
        segmentation_cost(similarity, (0,) + cuts) for cuts in itertools.combinations(range(1, size), segments - 1)
    )
    assert result.cost == pytest.approx(brute, rel=1e-12, abs=1e-12)
    assert result.cost == pytest.approx(segmentation_cost(similarity, result.starts), rel=1e-12, abs=1e-12)
    assert len(result.starts) == segments and result.starts[0] == 0
    assert list(result.starts) == sorted(set(result.starts))


def _regions_similarity(sigmas: np.ndarray, cuts: list[float]) -> np.ndarray:
    """Similarity 1 within a sigma region, decaying with the region distance across regions."""
    region = np.searchsorted(cuts, sigmas)
    return 0.9 ** np.abs(region[:, None] - region[None, :]) - 0.3 * (region[:, None] != region[None, :])


@pytest.mark.parametrize("points", [12, 24, 48, 96])
def test_block_structure_is_recovered_at_every_grid_density(points):
    sigmas = np.geomspace(0.002, 80.0, points)
    cuts = [0.1, 2.5]
    result = contiguous_segmentation(_regions_similarity(sigmas, cuts), 3)
    assert result.cost == pytest.approx(0.0, abs=1e-12)
    step = math.log(sigmas[1] / sigmas[0])
    for found, true in zip(stage_boundaries(sigmas, result), cuts):  # within half a grid step in log sigma
        assert abs(math.log(found / true)) <= step / 2 + 1e-12
    assert all(sigmas[s - 1] < c <= sigmas[s] for s, c in zip(result.starts[1:], cuts))


def test_smooth_similarity_boundaries_converge_as_the_grid_refines():
    """Similarity exp(-|log s - log t|) with no blocks: the optimal cuts of the continuum problem are
    equally spaced in log sigma; every density finds them to within one grid step."""
    lo, hi = math.log(0.01), math.log(100.0)
    for points in (15, 30, 60):
        logs = np.linspace(lo, hi, points)
        similarity = np.exp(-np.abs(logs[:, None] - logs[None, :]) / 4)
        found = [math.log(b) for b in stage_boundaries(np.exp(logs), contiguous_segmentation(similarity, 3))]
        expected = [lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3]
        assert np.allclose(found, expected, atol=(hi - lo) / (points - 1) + 1e-12)


def test_similarity_of_the_empirical_denoiser_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(12, 1, 3, 3, generator=gen, dtype=torch.float64)
    probes = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    sigmas = [0.05, 0.4, 1.5, 6.0]
    similarity = denoiser_similarity(probes, noise, train, sigmas, backend="reference")
    assert similarity.shape == (4, 4) and similarity.dtype == torch.float64
    torch.testing.assert_close(similarity, similarity.T)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(4, dtype=torch.float64))

    flat_train = train.reshape(12, -1)
    mean = flat_train.mean(0)

    def centred_output(sigma):
        x = (probes + sigma * noise).reshape(5, -1)
        weights = torch.softmax(-(torch.cdist(x, flat_train) ** 2) / (2 * sigma**2), dim=1)
        return weights @ flat_train - mean

    a, b = centred_output(sigmas[0]), centred_output(sigmas[2])
    expected = torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
    torch.testing.assert_close(similarity[0, 2], expected, rtol=1e-10, atol=1e-12)
    assert similarity[0, 1] > similarity[0, 3]  # nearby noise levels agree more


def test_segments_and_boundaries():
    seg = Segmentation(starts=(0, 3, 5), cost=0.0)
    assert seg.segments(8) == [(0, 3), (3, 5), (5, 8)]
    assert stage_boundaries([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], seg) == [
        math.sqrt(4.0 * 8.0),
        math.sqrt(16.0 * 32.0),
    ]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: contiguous_segmentation(np.ones((3, 2)), 1), "similarity"),
        (lambda: contiguous_segmentation(np.full((3, 3), np.nan), 1), "similarity"),
        (lambda: contiguous_segmentation(np.ones((3, 3)), 4), "num_segments"),
        (lambda: contiguous_segmentation(np.ones((3, 3)), 0), "num_segments"),
        (lambda: stage_boundaries([1.0, 0.5], Segmentation((0, 1), 0.0)), "sigmas"),
        (lambda: denoiser_similarity(torch.zeros(2, 3), torch.zeros(3, 3), torch.zeros(4, 3), [1.0]), "noise"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
