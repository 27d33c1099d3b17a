"""Similarity measures: pixel cosine (centered), l2, and a TorchScript feature extractor."""

from __future__ import annotations

import math

import pytest
import standins
import torch

from diffcore.metrics import FeatureCosine, PixelCosine, PixelL2, get_similarity, nearest_neighbors


def _rand(b, seed=0, shape=(1, 8, 8)):
    return torch.rand((b, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_cosine_is_centered_pearson():
    a, b = _rand(5, 0), _rand(5, 1)
    got = PixelCosine().pairwise(a, b)
    fa, fb = a.reshape(5, -1).double(), b.reshape(5, -1).double()
    fa, fb = fa - fa.mean(1, keepdim=True), fb - fb.mean(1, keepdim=True)
    want = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    # invariant to a brightness offset, which is the point of centering
    torch.testing.assert_close(PixelCosine().pairwise(a + 0.3, b), got, atol=1e-6, rtol=0)


def test_cosine_from_embedding_distance_matches_pairwise():
    a, b = _rand(7, 2), _rand(7, 3)
    sim = PixelCosine()
    via_distance = sim.from_distance((sim.embed(a) - sim.embed(b)).norm(dim=1))
    torch.testing.assert_close(via_distance, sim.pairwise(a, b), atol=1e-5, rtol=0)


def test_l2_similarity_range_and_identity():
    a = _rand(4, 4)
    sim = PixelL2()
    torch.testing.assert_close(sim.pairwise(a, a), torch.ones(4))
    torch.testing.assert_close(
        sim.pairwise(a.clamp(-1, 1).sign(), -a.clamp(-1, 1).sign()), torch.zeros(4), atol=1e-6, rtol=0
    )
    b = _rand(4, 5)
    rms = (a - b).reshape(4, -1).norm(dim=1) / math.sqrt(64)
    torch.testing.assert_close(sim.pairwise(a, b), 1 - rms / 2, atol=1e-6, rtol=0)


def test_nearest_neighbors_cosine_matches_brute_force(digits):
    train, samples = digits[:300], digits[300:340] + 0.05 * _rand(40, 6)
    sims, idx = nearest_neighbors(samples, train, PixelCosine(), k=2, knn=standins.knn)
    emb_s, emb_t = PixelCosine().embed(samples).double(), PixelCosine().embed(train).double()
    full = emb_s @ emb_t.T
    top = full.topk(2, dim=1)
    torch.testing.assert_close(idx, top.indices)
    torch.testing.assert_close(sims.double(), top.values, atol=1e-5, rtol=0)


def test_uint8_images_map_to_unit_range():
    u8 = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(PixelL2().embed(u8), PixelL2().embed(u8.float() / 127.5 - 1))


def test_scripted_feature_extractor_and_its_neighbours(tmp_path):
    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(x, 2).flatten(1) + 1.0

    path = tmp_path / "features.pt"
    torch.jit.script(Pool()).save(str(path))
    sim = get_similarity(f"raw:{path}")
    assert isinstance(sim, FeatureCosine) and sim.default_threshold == 0.6
    a, b = _rand(6, 7), _rand(6, 8)
    fa = torch.nn.functional.avg_pool2d(a, 2).flatten(1) + 1.0
    fb = torch.nn.functional.avg_pool2d(b, 2).flatten(1) + 1.0
    want = torch.nn.functional.cosine_similarity(fa, fb, dim=1)
    torch.testing.assert_close(sim.pairwise(a, b), want, atol=1e-6, rtol=0)
    sims, idx = nearest_neighbors(a, torch.cat([b, a[2:3]]), sim, k=1, knn=standins.knn)
    assert int(idx[2, 0]) == 6 and float(sims[2, 0]) == pytest.approx(1.0, abs=1e-5)


def test_get_similarity_errors_name_argument(tmp_path):
    with pytest.raises(ValueError, match="similarity"):
        get_similarity("manhattan")
    with pytest.raises(FileNotFoundError, match="feature extractor"):
        get_similarity(f"raw:{tmp_path / 'missing.pt'}").embed(torch.zeros(1, 1, 2, 2))


def test_torchscript_feature_extractor(tmp_path):
    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 2).flatten(1) + 1.0

    a, b = _rand(4, 9), _rand(4, 10)
    path = tmp_path / "features.torchscript.pt"
    torch.jit.save(torch.jit.trace(Pool(), (a,)), str(path))
    sim = get_similarity(f"raw:{path}")
    want = torch.nn.functional.cosine_similarity(Pool()(a), Pool()(b), dim=1)
    torch.testing.assert_close(sim.pairwise(a, b), want, atol=1e-6, rtol=0)
