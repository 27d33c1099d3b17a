"""Guidance as a denoiser wrapper: classifier-free guidance (CFG), any added guidance term, and
limited-interval guidance. The result speaks the denoiser contract, so every solver of
``diffcore.sampler`` (and ``sample``) runs guided sampling unchanged.

Convention (Ho & Salimans 2022, in the EDM denoiser form; the convention of docs/papers.md section 8
and its public code): with guidance strength ``w``,

    D_w(x; sigma) = D_c + w (D_c - D_u) = D_u + (1 + w)(D_c - D_u),

so ``w = 0`` is plain conditional sampling (and returns ``D_c`` bitwise: the unconditional
denoiser is not even called) and ``w = -1`` is unconditional sampling. (Another common convention
writes ``D_u + s (D_c - D_u)`` with ``s = 1 + w``.) Computed as ``D_c + w (D_c - D_u)``.

More generally :class:`GuidedDenoiser` adds ``w * G(x, sigma, D_base)`` to a base denoiser, for
any guidance term ``G`` (e.g. one term of the linear split of CFG, docs/papers.md section 8).

Limited interval (Kynkaanniemi et al. 2024): guidance acts only where sigma lies in a
:class:`GuidanceInterval`; elsewhere the wrapper returns the base denoiser's output unchanged
(bitwise). The default interval is ``(low, high]``: low exclusive, high inclusive, as in that paper
and in the public code of docs/papers.md section 8; ``closed`` picks any other combination. Sigma is
compared in the dtype the sampler hands the denoiser (the bounds are rounded to it), so a bound
given as a float64 grid value matches that grid point even when the denoiser gets float32 sigmas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLOSED_SIDES = ("right", "left", "both", "neither")


@dataclass(frozen=True)
class GuidanceInterval:
    """The sigma range where guidance acts.

    Attributes:
        low, high: bounds, ``0 <= low <= high <= inf``.
        closed: which bounds belong to the interval: ``"right"`` ``(low, high]`` (default),
            ``"left"`` ``[low, high)``, ``"both"`` ``[low, high]``, ``"neither"`` ``(low, high)``.
    The default ``GuidanceInterval()`` is ``(0, inf]``: every sigma a sampler uses.
    """

    low: float = 0.0
    high: float = math.inf
    closed: str = "right"

    def __post_init__(self):
        low, high = float(self.low), float(self.high)
        if math.isnan(low) or low < 0 or low == math.inf:
            raise ValueError(f"low: expected a finite value >= 0, got {self.low!r}")
        if math.isnan(high) or high < low:
            raise ValueError(f"high: expected a value >= low = {low:g} (inf allowed), got {self.high!r}")
        if self.closed not in CLOSED_SIDES:
            raise ValueError(f"closed: expected one of {', '.join(CLOSED_SIDES)}, got {self.closed!r}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @property
    def everywhere(self) -> bool:
        """True when the interval holds every sigma > 0 (no test needed)."""
        return self.low == 0.0 and self.high == math.inf and self.closed in ("right", "neither")

    def contains(self, sigma) -> torch.Tensor | bool:
        """Membership of ``sigma``: a bool for a Python number, a bool tensor of sigma's shape for a
        tensor (compared in sigma's dtype, bounds rounded to it)."""
        if isinstance(sigma, torch.Tensor):
            low = torch.tensor(self.low, dtype=sigma.dtype).item()
            high = torch.tensor(self.high, dtype=sigma.dtype).item()
        else:
            sigma, low, high = float(sigma), self.low, self.high
        above = sigma >= low if self.closed in ("left", "both") else sigma > low
        below = sigma <= high if self.closed in ("right", "both") else sigma < high
        return above & below

    def describe(self) -> str:
        left = "[" if self.closed in ("left", "both") else "("
        right = "]" if self.closed in ("right", "both") else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"


class GuidedDenoiser:
    """``D(x; sigma) = D_base(x; sigma) + w G(x, sigma, D_base(x; sigma))`` for sigma inside
    ``interval``, ``D_base(x; sigma)`` (the same tensor, bitwise) outside it and for ``w = 0``.

    Args:
        base: the base denoiser ``D_base(x [B, ...], sigma) -> [B, ...]`` (e.g. the conditional one).
        term: the guidance term ``G(x, sigma, base_output) -> [B, ...]``.
        scale: the guidance strength ``w`` (finite; negative values guide away).
        interval: a :class:`GuidanceInterval` (default: everywhere).
    Rows whose sigma lies outside the interval get the base output; when some rows of a batch are
    inside and some outside, ``G`` is evaluated for the whole batch and mixed per row. Testing the
    interval on a CUDA tensor synchronizes once per call (unless the interval is everywhere).
    """

    def __init__(self, base, term, scale: float, interval: GuidanceInterval | None = None):
        if not callable(base):
            raise TypeError(f"base: expected a denoiser D(x, sigma), got {type(base).__name__}")
        if not callable(term):
            raise TypeError(f"term: expected a callable G(x, sigma, base_output), got {type(term).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite guidance strength, got {scale!r}")
        interval = GuidanceInterval() if interval is None else interval
        if not isinstance(interval, GuidanceInterval):
            raise TypeError(f"interval: expected a GuidanceInterval or None, got {type(interval).__name__}")
        self.base, self.term, self.scale, self.interval = base, term, scale, interval

    def inside(self, sigma, batch: int) -> torch.Tensor | bool:
        """Per-row membership ([B] bool tensor) or one bool for a scalar sigma."""
        if self.interval.everywhere:
            return True
        inside = self.interval.contains(sigma)
        if isinstance(inside, torch.Tensor) and inside.dim() == 0:
            return bool(inside)
        if isinstance(inside, torch.Tensor) and inside.shape != (batch,):
            raise ValueError(f"sigma: expected a scalar or shape [{batch}], got shape {tuple(inside.shape)}")
        return inside

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x: [B, ...]; sigma: scalar or [B]. Returns the guided ``x0_hat`` [B, ...]."""
        base = self.base(x, sigma)
        if self.scale == 0.0:
            return base
        inside = self.inside(sigma, x.shape[0])
        if isinstance(inside, torch.Tensor):
            if not bool(inside.any()):
                return base
            mixed = not bool(inside.all())
        elif not inside:
            return base
        else:
            mixed = False
        guided = base + self.scale * self.term(x, sigma, base)
        if mixed and isinstance(inside, torch.Tensor):
            return torch.where(inside.reshape(-1, *([1] * (x.dim() - 1))).to(x.device), guided, base)
        return guided


class DenoiserDifference:
    """The CFG term ``G(x, sigma, D_c) = D_c - D_u(x; sigma)`` for a base output ``D_c``."""

    def __init__(self, unconditional):
        if not callable(unconditional):
            raise TypeError(f"unconditional: expected a denoiser D(x, sigma), got {type(unconditional).__name__}")
        self.unconditional = unconditional

    def __call__(self, x: torch.Tensor, sigma, conditional_output: torch.Tensor) -> torch.Tensor:
        return conditional_output - self.unconditional(x, sigma)


def classifier_free_guidance(
    conditional, unconditional, w: float, interval: GuidanceInterval | None = None
) -> GuidedDenoiser:
    """CFG as a denoiser: ``D_c + w (D_c - D_u)`` inside ``interval``, ``D_c`` outside and at w = 0.

    Args:
        conditional, unconditional: denoisers ``D(x [B, ...], sigma) -> [B, ...]`` (for a
            label-conditioned network, bind the labels: ``lambda x, s: net(x, s, labels)`` and
            ``lambda x, s: net(x, s, None)``).
        w: guidance strength (module docstring: w = 0 conditional, w = -1 unconditional).
        interval: where guidance acts (default everywhere).
    """
    return GuidedDenoiser(conditional, DenoiserDifference(unconditional), w, interval)


__all__ = ["CLOSED_SIDES", "DenoiserDifference", "GuidanceInterval", "GuidedDenoiser", "classifier_free_guidance"]
