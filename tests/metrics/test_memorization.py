"""GL score, memorization ratio, RP score and the calibrated pixel threshold, on the digits."""

from __future__ import annotations

import pytest
import standins
import torch

from diffcore.metrics import (
    PixelCosine,
    PixelL2,
    calibrate_threshold,
    gl_score,
    memorization_ratio,
    nearest_other_similarity,
    rp_score,
)


def _noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_copies_are_memorized_and_new_images_generalize(digits):
    train, held_out = digits[:256], digits[1000:1064]
    copies = train[:64] + 0.02 * _noise((64, 1, 8, 8), 0)
    sim = PixelCosine()
    threshold = calibrate_threshold(digits, sim, knn=standins.knn)
    gl_copies = gl_score(copies, train, sim, threshold, knn=standins.knn)
    gl_new = gl_score(held_out, train, sim, threshold, knn=standins.knn)
    assert gl_copies.score == 0.0
    assert torch.equal(gl_copies.nn_index, torch.arange(64))
    assert gl_new.score > 0.5
    mem_copies = memorization_ratio(copies, train, knn=standins.knn)
    mem_new = memorization_ratio(held_out, train, knn=standins.knn)
    assert mem_copies.fraction == 1.0 and mem_new.fraction < 0.1
    assert torch.equal(mem_copies.nn_index[:, 0], torch.arange(64))


def test_memorization_ratio_definition():
    train = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[0.5, 0.0], [1.5, 0.0], [3.0, 0.0]])
    res = memorization_ratio(x, train, knn=standins.knn)
    torch.testing.assert_close(res.ratio, torch.tensor([0.5 / 2.5, 1.0, 0.0], dtype=torch.float64))
    assert res.memorized.tolist() == [True, False, True]
    assert res.fraction == pytest.approx(2 / 3)


def test_duplicated_training_image_copy_has_ratio_zero():
    train = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    res = memorization_ratio(torch.tensor([[1.0, 1.0]]), train, knn=standins.knn)
    assert float(res.ratio[0]) == 0.0 and bool(res.memorized[0])


def test_gl_threshold_is_strict_and_required():
    train = torch.eye(3).reshape(3, 1, 1, 3) * 2 - 1
    with pytest.raises(ValueError, match="threshold"):
        gl_score(train, train, PixelCosine(), None, knn=standins.knn)
    res = gl_score(train, train, PixelCosine(), 1.0 + 1e-6, knn=standins.knn)
    assert res.score == 1.0  # similarity 1 < 1 + 1e-6
    res = gl_score(train, train, PixelCosine(), 0.999, knn=standins.knn)
    assert res.score == 0.0


def test_shape_mismatch_names_argument(digits):
    with pytest.raises(ValueError, match="samples"):
        gl_score(torch.zeros(2, 1, 4, 4), digits[:5], PixelCosine(), 0.9, knn=standins.knn)
    with pytest.raises(ValueError, match="samples_b"):
        rp_score(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8), PixelCosine(), 0.9)
    with pytest.raises(ValueError, match="train"):
        memorization_ratio(torch.zeros(2, 4), torch.zeros(1, 4), knn=standins.knn)


def test_rp_score_counts_agreeing_seeds(digits):
    a = digits[:20]
    b = a.clone()
    b[10:] = digits[100:110]
    res = rp_score(a, b, PixelCosine(), 0.99)
    assert res.score == pytest.approx(0.5 + float((res.similarity[10:] > 0.99).float().mean()) / 2)
    assert res.reproduced[:10].all()
    assert rp_score(a, a, PixelL2(), 0.999).score == 1.0


def test_calibration_separates_copies_from_neighbours(digits):
    """The calibrated threshold lies above most nearest-other similarities and below copies."""
    sim = PixelCosine()
    threshold = calibrate_threshold(digits, sim, knn=standins.knn)
    others = nearest_other_similarity(digits, sim, knn=standins.knn)
    assert float((others < threshold).float().mean()) == pytest.approx(0.95, abs=0.01)
    noisy_copies = digits + 0.1 * _noise(digits.shape, 1)
    self_sim = sim.pairwise(noisy_copies, digits)
    assert float((self_sim > threshold).float().mean()) > 0.99
    # subsampled queries are seeded: same seed, same threshold
    t1 = calibrate_threshold(digits, sim, max_queries=300, seed=3, knn=standins.knn)
    t2 = calibrate_threshold(digits, sim, max_queries=300, seed=3, knn=standins.knn)
    assert t1 == t2
