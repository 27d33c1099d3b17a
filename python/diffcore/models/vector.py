"""Small denoisers of vector data ``[B, n]`` (the MoLRG and PFD studies' models).

- :class:`MLPDenoiser`: an EDM-preconditioned MLP ``D(x [B, n], sigma [B]) -> x0_hat [B, n]``
  (EDM Eq. 7 with Table 1's coefficients, :func:`diffcore.models.precond.edm_coefficients`;
  ``sigma_data`` set from the data).
- :class:`SubspaceDenoiser`: the MoLRG denoiser form (docs/papers.md section 4) with *learnable* bases
  ``U_k = QR(A_k)`` (orthonormal by construction):
  ``D(x; sigma) = sum_k w_k(x) U_k U_k^T x / (1 + sigma^2)``,
  ``w_k = softmax_k(|U_k^T x|^2 / (2 sigma^2 (1 + sigma^2)))`` (equal weights and dimensions).

Both follow the training contract ``forward(x, sigma, class_labels=None)`` of ``diffcore.train``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffcore.models.precond import edm_coefficients


class MLPDenoiser(nn.Module):
    """EDM-preconditioned MLP on vectors ``[B, n]``: ``D = c_skip x + c_out F(c_in x, c_noise)``.

    F is ``depth`` SiLU layers of ``width`` units on ``[c_in x, sin/cos(c_noise * freqs)]``.
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 3, sigma_data: float = 0.5, num_freqs: int = 8):
        super().__init__()
        self.dim, self.sigma_data = int(dim), float(sigma_data)
        self.register_buffer("freqs", torch.arange(1, num_freqs + 1, dtype=torch.float32) * math.pi / 2)
        layers, fan_in = [], dim + 2 * num_freqs
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """x [B, n] (or [B, ...] with n numbers), sigma float or [B] -> x0_hat, x's shape and dtype."""
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(x.shape[0], -1).float()
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        s = s.expand(flat.shape[0])[:, None]
        c_skip, c_out, c_in, c_noise = edm_coefficients(s, self.sigma_data)  # EDM Eq. 7, Table 1
        emb = torch.cat([torch.sin(c_noise * self.freqs), torch.cos(c_noise * self.freqs)], dim=1)
        out = c_skip * flat + c_out * self.net(torch.cat([c_in * flat, emb], dim=1))
        return out.to(dtype).reshape(shape)


class SubspaceDenoiser(nn.Module):
    """The MoLRG optimal-denoiser form with learnable bases (K components of dimension d in R^n).

    ``bases()`` [K, n, d] are the Q factors of the raw parameters (orthonormal columns, exactly).
    """

    def __init__(self, num_components: int, dim: int, latent_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.raw = nn.Parameter(torch.randn(num_components, dim, latent_dim, generator=g))

    def bases(self) -> torch.Tensor:
        return torch.linalg.qr(self.raw)[0]

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(x.shape[0], -1).float()
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        s2 = s.expand(flat.shape[0])[:, None] ** 2
        u = self.bases()  # [K, n, d]
        coeff = torch.einsum("bn,knd->bkd", flat, u)  # [B, K, d]
        w = torch.softmax(coeff.square().sum(-1) / (2 * s2 * (1 + s2)), dim=-1)  # [B, K]
        out = torch.einsum("bkd,knd->bn", coeff * (w / (1 + s2))[:, :, None], u)
        return out.to(dtype).reshape(shape)
