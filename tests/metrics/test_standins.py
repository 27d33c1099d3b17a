"""The test stand-ins agree with the float64 references they replace for speed."""

from __future__ import annotations

import standins
import torch


def test_fast_knn_matches_reference(digits):
    q = digits[:50] + 0.1 * torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    d, i = standins.knn(q, digits[50:400], k=2)
    d_ref, i_ref = standins.knn_reference(q, digits[50:400], k=2)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(d, d_ref, atol=1e-5, rtol=0)


def test_fast_empirical_denoiser_matches_reference(digits):
    train = digits[:200]
    x = digits[300:310] + 0.3 * torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for sigma in (0.01, 0.3, 5.0):
        got = standins.empirical_denoiser(train)(x, sigma)
        want = standins.empirical_denoise_ref(x, train, sigma)[0]
        torch.testing.assert_close(got, want, atol=1e-8, rtol=0)
