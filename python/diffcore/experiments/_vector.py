"""Small denoisers of vector data and their training, shared by the MoLRG and PFD studies.

- :class:`MLPDenoiser`: an EDM-preconditioned MLP ``D(x [B, n], sigma [B]) -> x0_hat [B, n]``
  (EDM Eq. 7 with Table 1's coefficients; ``sigma_data`` set from the data).
- :class:`SubspaceDenoiser`: the MoLRG denoiser form (PAPERS.md section 4) with *learnable* bases
  ``U_k = QR(A_k)`` (orthonormal by construction):
  ``D(x; sigma) = sum_k w_k(x) U_k U_k^T x / (1 + sigma^2)``,
  ``w_k = softmax_k(|U_k^T x|^2 / (2 sigma^2 (1 + sigma^2)))`` (equal weights and dimensions).
- :func:`train_denoiser`: denoising score matching with EDM's sigma sampling and weighting
  (EDM Eq. 8: ``ln sigma ~ N(P_mean, P_std^2)``, ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``), full
  control of seeds, optional snapshots at given steps (for error-vs-training-time curves).
- :func:`subspace_recovery`, :func:`distance_to_union`: the MoLRG generalization measures.

These run the whole training loop here rather than through ``diffcore.train``: that trainer reads
image datasets by spec, while these studies train hundreds of tiny models on in-memory vectors
(a few milliseconds per step), where a plain loop is the simplest correct thing.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn


@contextlib.contextmanager
def threads(count: int = 1):
    """Run the block with ``count`` intra-op threads (restored after). The vector models here are
    so small (a few thousand numbers per op) that thread start-up costs more than it saves: on the
    shared 2-core machine one thread was up to 10x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- models

class MLPDenoiser(nn.Module):
    """EDM-preconditioned MLP on vectors ``[B, n]``: ``D = c_skip x + c_out F(c_in x, c_noise)``.

    F is ``depth`` SiLU layers of ``width`` units on ``[c_in x, sin/cos(c_noise * freqs)]``.
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 3, sigma_data: float = 0.5,
                 num_freqs: int = 8):
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
        sd = self.sigma_data
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        c_noise = s.log() / 4
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
        u = self.bases()                                                        # [K, n, d]
        coeff = torch.einsum("bn,knd->bkd", flat, u)                            # [B, K, d]
        w = torch.softmax(coeff.square().sum(-1) / (2 * s2 * (1 + s2)), dim=-1)  # [B, K]
        out = torch.einsum("bkd,knd->bn", coeff * (w / (1 + s2))[:, :, None], u)
        return out.to(dtype).reshape(shape)


# ----------------------------------------------------------------------------- training

@dataclass
class TrainLog:
    """Losses (mean per logging window) and the snapshots taken at the requested steps."""

    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)     # step -> state_dict (CPU copies)


def train_denoiser(model: nn.Module, data: torch.Tensor, *, steps: int, batch_size: int = 128,
                   lr: float = 1e-3, seed: int = 0, P_mean: float = -1.2, P_std: float = 1.2,
                   sigma_data: float = 0.5, snapshot_steps=(), log_every: int = 50) -> TrainLog:
    """Denoising score matching of ``model`` on ``data [N, n]`` (EDM Eq. 8), Adam, in place.

    Each step draws a batch (with replacement when N < batch_size, else a reshuffled epoch
    order), ``ln sigma ~ N(P_mean, P_std^2)`` and Gaussian noise from one seeded generator, so the
    same seed gives the same model. ``snapshot_steps``: steps after which a CPU copy of the weights
    is kept (step 0 = the initial weights).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = data.float()
    n = data.shape[0]
    want = set(int(s) for s in snapshot_steps)
    log, window = TrainLog(), []
    order, pos = torch.randperm(n, generator=g), 0
    if 0 in want:
        log.snapshots[0] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in range(1, steps + 1):
        if n <= batch_size:
            idx = torch.randint(0, n, (batch_size,), generator=g)
        else:
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx, pos = order[pos:pos + batch_size], pos + batch_size
        x0 = data[idx]
        sigma = (torch.randn(batch_size, generator=g) * P_std + P_mean).exp()
        noise = torch.randn(x0.shape, generator=g)
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        out = model(x0 + sigma[:, None] * noise, sigma)
        loss = (weight * (out - x0).square().mean(dim=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            log.steps.append(step)
            log.losses.append(sum(window) / len(window))
            window = []
        if step in want:
            log.snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    return log


def data_sigma(data: torch.Tensor) -> float:
    """``sigma_data``: the RMS of the data's coordinates (EDM's sigma_data for this data)."""
    return float(data.double().square().mean().sqrt())


# ----------------------------------------------------------------------------- MoLRG measures

def subspace_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalized projection distance ``|P_a - P_b|_F^2 / (2 d)`` = mean sin^2 of the principal
    angles, in [0, 1], between column spans of orthonormal ``a`` [..., n, d] and ``b`` [..., n, d]."""
    d = a.shape[-1]
    overlap = (a.transpose(-1, -2).double() @ b.double()).square().sum((-1, -2))
    return (1 - overlap / d).clamp_min(0.0)


@dataclass
class Recovery:
    """Subspace recovery after matching learned to true components by the best permutation."""

    error: float                   # mean normalized projection distance (0 = exact recovery)
    max_angle_deg: float           # largest principal angle over matched pairs
    mean_angle_deg: float          # mean principal angle over matched pairs and directions
    permutation: list


def subspace_recovery(learned: torch.Tensor, true: torch.Tensor) -> Recovery:
    """Match ``learned`` [K, n, d] to ``true`` [K, n, d] (orthonormal columns) by the permutation
    with the smallest total distance (exhaustive; K <= 7), then principal angles of each pair
    (``diffcore.analysis.principal_angles``)."""
    from diffcore.analysis import principal_angles

    k = true.shape[0]
    if learned.shape != true.shape:
        raise ValueError(f"learned: expected shape {tuple(true.shape)}, got {tuple(learned.shape)}")
    if k > 7:
        raise ValueError("subspace_recovery: exhaustive matching supports K <= 7")
    cost = subspace_distance(learned[:, None], true[None])                     # [K, K]
    perm = min(itertools.permutations(range(k)), key=lambda p: float(sum(cost[p[j], j] for j in range(k))))
    matched = learned[list(perm)]
    angles = principal_angles(matched.transpose(1, 2).double(), true.transpose(1, 2).double())  # [K, d]
    return Recovery(error=float(torch.stack([cost[perm[j], j] for j in range(k)]).mean()),
                    max_angle_deg=float(angles.max()), mean_angle_deg=float(angles.mean()),
                    permutation=list(perm))


def distance_to_union(x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Relative distance [B] of each row of ``x`` [B, n] to the union of span(U_k):
    ``min_k |x - U_k U_k^T x| / |x|``."""
    x = x.reshape(x.shape[0], -1).double()
    u = bases.double()
    coeff = torch.einsum("bn,knd->bkd", x, u)
    residual = (x.square().sum(-1, keepdim=True) - coeff.square().sum(-1)).clamp_min(0).sqrt()  # [B, K]
    return residual.min(-1).values / x.norm(dim=-1).clamp_min(1e-30)


def dsm_loss(model: nn.Module, data: torch.Tensor, *, seed: int = 0, draws: int = 8, P_mean: float = -1.2,
             P_std: float = 1.2, sigma_data: float = 0.5) -> float:
    """The EDM-weighted denoising loss of ``model`` on ``data [N, n]`` with fixed seeded noise
    (``draws`` noise levels per point): comparable across models, used to pick among restarts."""
    g = torch.Generator().manual_seed(seed)
    x0 = data.float().repeat(draws, 1)
    sigma = (torch.randn(x0.shape[0], generator=g) * P_std + P_mean).exp()
    noise = torch.randn(x0.shape, generator=g)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    with torch.no_grad():
        out = model(x0 + sigma[:, None] * noise, sigma)
    return float((weight * (out - x0).square().mean(dim=1)).mean())


def train_subspace_denoiser(data: torch.Tensor, num_components: int, latent_dim: int, *, restarts: int = 4,
                            seed: int = 0, **train_kwargs) -> tuple[SubspaceDenoiser, dict]:
    """Train ``restarts`` :class:`SubspaceDenoiser` from different random bases and keep the one
    with the lowest :func:`dsm_loss` on the training data. Gradient training of the bases is
    K-subspaces-like and can stop in a local minimum (e.g. each learned basis half in each true
    subspace); the training loss tells those apart, so restarts fix it without looking at the truth."""
    best, losses = None, []
    for r in range(restarts):
        model = SubspaceDenoiser(num_components, data.shape[1], latent_dim, seed=seed * 1000 + r)
        train_denoiser(model, data, seed=seed * 1000 + r, **train_kwargs)
        loss = dsm_loss(model, data, seed=seed, P_mean=train_kwargs.get("P_mean", -1.2),
                        P_std=train_kwargs.get("P_std", 1.2), sigma_data=train_kwargs.get("sigma_data", 0.5))
        losses.append(loss)
        if best is None or loss < min(losses[:-1]):
            best = model
    return best, {"restart_losses": losses, "chosen": int(min(range(restarts), key=losses.__getitem__))}
