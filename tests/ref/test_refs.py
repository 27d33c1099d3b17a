"""The float64 references against direct definitions on tiny inputs."""
from __future__ import annotations

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
