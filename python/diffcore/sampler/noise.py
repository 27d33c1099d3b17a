"""Per-sample seeds: sample i's noise comes from its own generator seeded with seeds[i].

This makes sample i's initial noise (and its stochastic-step noise) independent of the batch it
runs in, the device and the backend (EDM's ``StackedRandomGenerator`` idea): the noise is drawn
in float64 from a CPU ``torch.Generator`` per sample and then cast and moved, so a sample drawn
alone and the same sample drawn in a batch of 1000 on a GPU start from the same numbers.

Seeds are integers in [0, 2**32 - 1]: torch's CPU generator (mt19937) keeps only the low 32 bits
of a seed, so 2**32 + 7 would silently repeat seed 7; larger seeds are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

SEED_MAX = 2**32 - 1  # the largest seed with its own stream (mt19937 is seeded with 32 bits)


def _seed_list(seeds) -> list[int]:
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.reshape(-1).tolist()
    if isinstance(seeds, int) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds: expected a sequence of integers, got {type(seeds).__name__}")
    values = list(seeds)
    if not values:
        raise ValueError("seeds: expected at least one seed, got an empty sequence")
    for i, s in enumerate(values):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_MAX:
            raise ValueError(
                f"seeds: expected non-negative integers below 2**32 (larger seeds would repeat "
                f"smaller ones: torch's CPU generator keeps 32 bits), got seeds[{i}] = {s!r}"
            )
    return values


class SeededNoise:
    """Stacked per-sample generators: ``randn(shape)`` draws [len(seeds), *shape], row i from the
    generator of seeds[i]; successive calls continue each sample's stream.

    Args:
        seeds: one integer in [0, 2**32 - 1] per sample.
        device, dtype: where and in which dtype the noise is returned (drawn in float64 on the CPU).
    """

    def __init__(self, seeds: Sequence[int], device=None, dtype: torch.dtype = torch.float32):
        self.seeds = _seed_list(seeds)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self._generators = []
        for s in self.seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(s)
            self._generators.append(g)

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], *, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal noise [len(seeds), *shape] (``shape`` is the per-sample shape)."""
        shape = tuple(int(v) for v in shape)
        rows = [torch.randn(shape, generator=g, dtype=torch.float64) for g in self._generators]
        out = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=torch.float64)
        return out.to(device=device or self.device, dtype=dtype or self.dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``x`` [B, ...] with B = len(seeds), on x's device and dtype."""
        if x.shape[0] != len(self.seeds):
            raise ValueError(f"x: expected batch {len(self.seeds)} (one row per seed), got shape {tuple(x.shape)}")
        return self.randn(x.shape[1:], device=x.device, dtype=x.dtype)


def noise_from_seeds(
    seeds: Sequence[int], shape: Sequence[int], device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise [len(seeds), *shape]; row i depends only on seeds[i] (and shape).

    ``shape`` is the per-sample shape, e.g. (3, 32, 32).
    """
    return SeededNoise(seeds, device=device, dtype=dtype).randn(shape)
