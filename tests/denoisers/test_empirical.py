"""EmpiricalDenoiser on the empirical-denoiser op, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from diffcore.denoisers import EmpiricalDenoiser
from diffcore.ref.empirical_denoise import empirical_denoise_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(37, 3, 5, 5, generator=g)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=dtype)
    sigma = torch.tensor([0.2, 0.7, 2.0, 20.0])
    den = EmpiricalDenoiser(train, backend="reference")
    out = den(x, sigma)
    assert out.shape == x.shape and out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(out.double(), empirical_denoise_ref(x, train, sigma)[0], atol=tol)


def test_memorizes_at_small_sigma_and_is_differentiable():
    train = torch.randn(9, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den = EmpiricalDenoiser(train, backend="reference")
    x = train[3:5] + 1e-3
    assert torch.allclose(den(x, 0.01), train[3:5], atol=1e-10)
    v = torch.randn(2, 12, dtype=torch.float64)
    _, jv = torch.func.jvp(lambda z: den(z, 1.0), (x,), (v,))
    fd = (den(x + 1e-6 * v, 1.0) - den(x - 1e-6 * v, 1.0)) / 2e-6
    assert torch.allclose(jv, fd, atol=1e-6)


def test_shape_mismatch_raises():
    den = EmpiricalDenoiser(torch.randn(5, 3, 4, 4))
    with pytest.raises(ValueError, match="x"):
        den(torch.randn(2, 3, 4, 5), 1.0)
