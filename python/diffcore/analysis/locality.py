"""Closed-form local denoisers against a trained network (docs/papers.md section 11).

The measures of the locality study (``diffcore run locality``):

- :func:`per_sample_r2`: ``R^2 = 1 - SSE / (D var)`` of a denoiser's output against the network's
  at the same state, per sample (Lukoianov et al. 2025's agreement): ``SSE = |m - t|^2`` over the
  D numbers of a sample, ``D var = |t - mean(t)|^2`` (the target's own spread).
- :func:`pearson_per_sample`: the Pearson correlation of two final samples per seed (Kamb & Ganguli
  2025's evaluation script, which labels it r^2; it is a correlation).
- :class:`RecordingDenoiser`: wraps the network and keeps every call's state, sigma and output
  (the network's own reverse trajectory).
- :func:`calibrate_patch_sizes`: per noise level, the patch size whose machine output agrees best
  (mean R^2) with the network's at the trajectory's states.
- :class:`LocalMachine`, :class:`MaskMachine`: ``D(x, sigma)`` denoisers for the sampler, with a
  patch size (or a Wiener mask) per noise level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "LocalMachine",
    "MaskMachine",
    "RecordingDenoiser",
    "calibrate_patch_sizes",
    "level_of",
    "pearson_per_sample",
    "per_sample_r2",
]


def per_sample_r2(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - |p - t|^2 / |t - mean(t)|^2`` per sample: ``prediction``, ``target`` [B, ...] -> [B]
    float64 (a constant target, zero spread, gives -inf unless the prediction equals it: 1)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction: expected the target's shape {tuple(target.shape)}, got {tuple(prediction.shape)}"
        )
    p = prediction.reshape(prediction.shape[0], -1).to(torch.float64)
    t = target.reshape(target.shape[0], -1).to(torch.float64)
    sse = (p - t).square().sum(dim=1)
    spread = (t - t.mean(dim=1, keepdim=True)).square().sum(dim=1)
    return torch.where(spread > 0, 1.0 - sse / spread.clamp_min(1e-300), torch.where(sse > 0, -torch.inf, 1.0))


def pearson_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of samples ``a[i]``, ``b[i]`` over their D numbers:
    [B, ...] x [B, ...] -> [B] float64 (0 where either sample is constant)."""
    if a.shape != b.shape:
        raise ValueError(f"b: expected a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    x = a.reshape(a.shape[0], -1).to(torch.float64)
    y = b.reshape(b.shape[0], -1).to(torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1) * y.norm(dim=1)
    return torch.where(norm > 0, (x * y).sum(dim=1) / norm.clamp_min(1e-300), torch.zeros_like(norm))


def level_of(sigma: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Index of the nearest noise level (in log sigma) of each entry of ``sigma`` [B] -> [B] long."""
    grid = torch.tensor([float(s) for s in levels], dtype=torch.float64).log()
    s = sigma.detach().reshape(-1).to(torch.float64).cpu().log()
    return (s[:, None] - grid[None, :]).abs().argmin(dim=1)


class RecordingDenoiser:
    """``D(x, sigma)`` that calls ``denoiser`` and keeps every call: ``states`` [calls] of x [B, ...],
    ``sigmas`` of [B], ``outputs`` of [B, ...] (float32, CPU), in call order."""

    def __init__(self, denoiser: Callable):
        self.denoiser = denoiser
        self.states: list[torch.Tensor] = []
        self.sigmas: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        out = self.denoiser(x, sigma)
        sig = sigma if isinstance(sigma, torch.Tensor) else torch.full((x.shape[0],), float(sigma))
        self.states.append(x.detach().float().cpu().clone())
        self.sigmas.append(sig.detach().reshape(-1).expand(x.shape[0]).to(torch.float64).cpu().clone())
        self.outputs.append(out.detach().float().cpu().clone())
        return out


def calibrate_patch_sizes(
    machine: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    states: torch.Tensor,
    sigmas: torch.Tensor,
    targets: torch.Tensor,
    levels: Sequence[float],
    candidates: Sequence[int],
) -> tuple[list[int], list[list[float]]]:
    """Per noise level, the patch size P of ``candidates`` whose output agrees best with the target.

    Args:
        machine: ``machine(x [B, ...], sigma [B], P) -> x0_hat [B, ...]``.
        states, sigmas, targets: the network's trajectory, ``[M, ...]``, ``[M]``, ``[M, ...]`` (every
            recorded call of every calibration seed, stacked).
        levels: the noise levels of the schedule; each state belongs to its nearest level.
        candidates: the patch sizes tried.
    Returns:
        ``(chosen, table)``: ``chosen[l]`` the P with the largest mean per-sample R^2 at level l (the
        smallest P on a tie), ``table[l][j]`` that mean R^2 of candidate j.
    """
    level = level_of(sigmas, levels)
    table = [[float("nan")] * len(candidates) for _ in levels]
    for j, size in enumerate(candidates):
        r2 = per_sample_r2(machine(states, sigmas, size), targets)
        for lev in range(len(levels)):
            rows = level == lev
            if bool(rows.any()):
                table[lev][j] = float(r2[rows].mean())
    chosen = []
    for lev, row in enumerate(table):
        if any(v != v for v in row):  # NaN: no state at this level
            raise ValueError(f"levels: no calibration state at level {lev} (sigma {levels[lev]:g})")
        best = max(row)
        chosen.append(int(candidates[row.index(best)]))
    return chosen, table


class LocalMachine:
    """A local denoiser of ``diffcore.ops.local_denoise`` (``kind`` els, ls or pspc) with a patch size
    per noise level: ``D(x [B, C, H, W], sigma [B])`` uses at each sample the P of its nearest level."""

    def __init__(self, train: torch.Tensor, kind: str, levels: Sequence[float], sizes: Sequence[int], padding: str):
        if len(levels) != len(sizes):
            raise ValueError(f"sizes: expected one patch size per level ({len(levels)}), got {len(sizes)}")
        self.train, self.kind, self.padding = train, kind, padding
        self.levels, self.sizes = [float(s) for s in levels], [int(p) for p in sizes]

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        from diffcore.ops import local_denoise

        sig = sigma if isinstance(sigma, torch.Tensor) else torch.full((x.shape[0],), float(sigma))
        sig = sig.reshape(-1).expand(x.shape[0])
        sizes = [self.sizes[int(i)] for i in level_of(sig, self.levels)]
        out = local_denoise(
            x.float(), self.train, sig.to(torch.float64), kind=self.kind, patch_size=sizes, padding=self.padding
        )
        return out.to(x.dtype)


class MaskMachine:
    """The data-derived locality machine (Lukoianov et al. 2025): ``local_denoise(kind="mask")`` with the
    Wiener-filter mask of each noise level (``masks[l]`` [H*W, H*W]); a sample uses its nearest level's."""

    def __init__(self, train: torch.Tensor, levels: Sequence[float], masks: Sequence[torch.Tensor]):
        if len(levels) != len(masks):
            raise ValueError(f"masks: expected one mask per level ({len(levels)}), got {len(masks)}")
        self.train, self.levels, self.masks = train, [float(s) for s in levels], list(masks)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        from diffcore.ops import local_denoise

        sig = sigma if isinstance(sigma, torch.Tensor) else torch.full((x.shape[0],), float(sigma))
        sig = sig.reshape(-1).expand(x.shape[0]).to(torch.float64)
        index = level_of(sig, self.levels)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for lev in sorted(set(index.tolist())):
            rows = (index == lev).nonzero().reshape(-1).to(x.device)
            out[rows] = local_denoise(x[rows].float(), self.train, sig[rows], kind="mask", mask=self.masks[lev])
        return out.to(x.dtype)
