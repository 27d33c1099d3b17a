"""Training of the small vector denoisers (``diffcore.models.vector``) of the MoLRG and PFD studies.

- :func:`train_denoiser`: denoising score matching with ``diffcore.train``'s EDM loss
  (:class:`~diffcore.train.loss.EDMLoss`: EDM Eq. 8, ``ln sigma ~ N(P_mean, P_std^2)``,
  ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``), full control of seeds, optional snapshots at given
  steps (for error-vs-training-time curves); :func:`dsm_loss`, :func:`train_subspace_denoiser`.
- The models live in :mod:`diffcore.models.vector`, the MoLRG measures (subspace recovery,
  distance to the union of subspaces) in :mod:`diffcore.analysis.subspaces`.

The loop is here rather than in ``diffcore.train``'s Trainer (which reads datasets by spec and
writes checkpoints): these studies train hundreds of tiny models on in-memory vectors (a few
milliseconds per step); the loss, its sigma sampling and weighting are the trainer's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from diffcore.models.vector import SubspaceDenoiser
from diffcore.train.loss import EDMLoss

_PROPOSAL_KEYS = ("P_mean", "P_std", "sigma_data", "log_uniform_fraction", "log_uniform_range")


def training_and_sampling_spec(config) -> dict:
    """The unit-spec fields the MoLRG and PFD studies share: the training batch, the noise levels
    trained on (EDM's ``P_mean``, ``P_std``; ``sigma_log_uniform`` with its range, when a share is
    log-uniform) and the samples drawn (count, first seed, sampler steps)."""
    c = config
    return {
        "batch_size": c.batch_size,
        "P_mean": c.P_mean,
        "P_std": c.P_std,
        **({"sigma_log_uniform": [c.sigma_log_uniform, c.sigma_min, c.sigma_max]} if c.sigma_log_uniform else {}),
        "num_samples": c.num_samples,
        "sample_seed_start": c.sample_seed_start,
        "sampler_steps": c.sampler_steps,
    }


@dataclass
class TrainLog:
    """Losses (mean per logging window) and the snapshots taken at the requested steps."""

    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)  # step -> state_dict (CPU copies)


def train_denoiser(
    model: nn.Module,
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    snapshot_steps=(),
    log_every: int = 50,
    log_uniform_fraction: float = 0.0,
    log_uniform_range=(0.002, 80.0),
) -> TrainLog:
    """Denoising score matching of ``model`` on ``data [N, n]`` (EDM Eq. 8), Adam, in place.

    Each step draws a batch (with replacement when N < batch_size, else a reshuffled epoch
    order), ``ln sigma ~ N(P_mean, P_std^2)`` and Gaussian noise from one seeded generator, so the
    same seed gives the same model. ``snapshot_steps``: steps after which a CPU copy of the weights
    is kept (step 0 = the initial weights).
    """
    g = torch.Generator().manual_seed(seed)
    loss_fn = EDMLoss(
        P_mean, P_std, sigma_data, log_uniform_fraction=log_uniform_fraction, log_uniform_range=log_uniform_range
    )
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
            idx, pos = order[pos : pos + batch_size], pos + batch_size
        x0 = data[idx]
        sigma = loss_fn.sample_sigma(batch_size, g, x0.device)
        noise = torch.randn(x0.shape, generator=g)
        loss = loss_fn(model, x0, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            mean_loss = sum(window) / len(window)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"training diverged: the loss is {mean_loss} at step {step}; lower the "
                    f"learning rate (lr={lr}) or the noise levels (P_mean={P_mean}, "
                    f"P_std={P_std})"
                )
            log.steps.append(step)
            log.losses.append(mean_loss)
            window = []
        if step in want:
            log.snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    return log


def data_sigma(data: torch.Tensor) -> float:
    """``sigma_data``: the RMS of the data's coordinates (EDM's sigma_data for this data)."""
    return float(data.double().square().mean().sqrt())


def dsm_loss(
    model: nn.Module,
    data: torch.Tensor,
    *,
    seed: int = 0,
    draws: int = 8,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    log_uniform_fraction: float = 0.0,
    log_uniform_range=(0.002, 80.0),
) -> float:
    """The EDM-weighted denoising loss of ``model`` on ``data [N, n]`` with fixed seeded noise
    (``draws`` noise levels per point): comparable across models, used to pick among restarts."""
    g = torch.Generator().manual_seed(seed)
    loss_fn = EDMLoss(
        P_mean, P_std, sigma_data, log_uniform_fraction=log_uniform_fraction, log_uniform_range=log_uniform_range
    )
    x0 = data.float().repeat(draws, 1)
    sigma = loss_fn.sample_sigma(x0.shape[0], g, x0.device)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return float(loss_fn(model, x0, sigma, noise).mean())


def train_subspace_denoiser(
    data: torch.Tensor, num_components: int, latent_dim: int, *, restarts: int = 4, seed: int = 0, **train_kwargs
) -> tuple[SubspaceDenoiser, dict]:
    """Train ``restarts`` :class:`SubspaceDenoiser` from different random bases and keep the one
    with the lowest :func:`dsm_loss` on the training data. Gradient training of the bases is
    K-subspaces-like and can stop in a local minimum (e.g. each learned basis half in each true
    subspace); the training loss tells those apart, so restarts fix it without looking at the truth."""
    best, losses = None, []
    for r in range(restarts):
        model = SubspaceDenoiser(num_components, data.shape[1], latent_dim, seed=seed * 1000 + r)
        train_denoiser(model, data, seed=seed * 1000 + r, **train_kwargs)
        loss = dsm_loss(model, data, seed=seed, **{k: v for k, v in train_kwargs.items() if k in _PROPOSAL_KEYS})
        losses.append(loss)
        if best is None or loss < min(losses[:-1]):
            best = model
    return best, {"restart_losses": losses, "chosen": int(min(range(restarts), key=losses.__getitem__))}
