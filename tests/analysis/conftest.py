"""Fixtures of the analysis tests: small denoisers with known or cheaply computable Jacobians."""

from __future__ import annotations

import pytest
import torch

from diffcore import _env
from diffcore.denoisers import GaussianDenoiser, MoLRGDenoiser


class TinyMLPDenoiser(torch.nn.Module):
    """A small nonlinear denoiser on [B, C, H, W]: ``A tanh(B x / sqrt(1 + s^2) + c + s e) / (1 + s^2)``
    with random orthogonal factors and geometrically decaying weights (ratio 0.8 per index), so its
    Jacobian has a decaying, gapped spectrum like a trained denoiser's and iterations converge."""

    def __init__(self, shape=(2, 4, 4), hidden=24, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = torch.Size(shape).numel()
        decay = 0.8 ** torch.arange(hidden, dtype=torch.float64)
        left = torch.linalg.qr(torch.randn(n, hidden, generator=g, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(n, hidden, generator=g, dtype=torch.float64))[0]
        self.register_buffer("a", left * decay.sqrt())
        self.register_buffer("b", (right * decay.sqrt()).T.contiguous() * 2)
        self.register_buffer("c", torch.randn(hidden, generator=g, dtype=torch.float64) * 0.5)
        self.register_buffer("e", torch.randn(hidden, generator=g, dtype=torch.float64) * 0.3)

    def forward(self, x, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0])[:, None]
        flat = x.reshape(x.shape[0], -1)
        h = torch.tanh(flat @ self.b.T.to(x.dtype) / (1 + s**2).sqrt() + self.c.to(x.dtype) + s * self.e.to(x.dtype))
        return (h @ self.a.T.to(x.dtype) / (1 + s**2)).reshape(x.shape)


@pytest.fixture
def mlp_denoiser():
    return TinyMLPDenoiser()


@pytest.fixture
def gapped_gaussian():
    """Gaussian denoiser on [B, 3, 4, 4] (n = 48) whose top 6 eigenvalues (4..9) are far above the rest (<= 0.05)."""
    g = torch.Generator().manual_seed(0)
    n = 48
    u = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    lam = torch.cat(
        [torch.linspace(9.0, 4.0, 6, dtype=torch.float64), torch.linspace(0.05, 0.001, n - 6, dtype=torch.float64)]
    )
    return GaussianDenoiser(torch.randn(n, generator=g, dtype=torch.float64) * 0.1, u, lam, shape=(3, 4, 4))


@pytest.fixture
def molrg():
    return MoLRGDenoiser.random(3, 48, 4, seed=1, shape=(3, 4, 4))


@pytest.fixture(autouse=True)
def single_thread():
    """These tests run many tiny ops: on a shared 2-core machine, intra-op threading makes each one
    wait on a thread barrier (measured ~100x slower). One thread per test, restored afterwards."""
    with _env.torch_threads(1):
        yield
