"""Measures of a denoiser against closed-form references (the hidden Gaussian structure).

- :func:`linearity_score`: how linear ``D`` is along a pair of inputs (cosine of
  ``D(a x1 + b x2)`` and ``a D(x1) + b D(x2)``, ``a = b = 1/sqrt(2)``);
- :func:`relative_distance`: ``|a - ref|_F / |ref|_F`` over a batch (a model against the Gaussian
  or empirical denoiser, or against a guidance reference);
- :func:`distill_affine`: the least-squares affine map ``y ~ W x + b`` of a denoiser's outputs on
  its inputs, compared by the studies with the Gaussian's ``W(sigma) = U diag(lam / (lam + sigma^2)) U^T``.

See docs/papers.md (hidden Gaussian structure) for the definitions.
"""

from __future__ import annotations

import math

import torch

from diffcore import _env

# The weights of the linear combination of the linearity score (unit norm: a^2 + b^2 = 1).
A = B = 1.0 / math.sqrt(2.0)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of ``a, b`` [B, ...] in float64: [B]."""
    return torch.nn.functional.cosine_similarity(
        a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double(), dim=1
    )


def linearity_cosines(denoiser, x1: torch.Tensor, x2: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[B]`` cosines between ``D(a x1 + b x2)`` and ``a D(x1) + b D(x2)`` (a = b = 1/sqrt(2)) for
    input pairs ``x1, x2`` [B, C, H, W] (or [B, n]), ``denoiser(x, sigma)`` of the same shape."""
    with torch.no_grad():
        d1, d2, dm = denoiser(x1, sigma), denoiser(x2, sigma), denoiser(A * x1 + B * x2, sigma)
    return _cosine(dm, A * d1 + B * d2)


def linearity_score(denoiser, x1: torch.Tensor, x2: torch.Tensor, sigma: float) -> float:
    """The linearity score: the mean of :func:`linearity_cosines`."""
    return float(linearity_cosines(denoiser, x1, x2, sigma).mean())


def relative_distance(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``|a - ref|_F / |ref|_F`` over the batch (float64); ``a, ref`` of one shape [B, ...]."""
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def distill_affine(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least-squares affine map ``y ~ W x + b`` for ``x, y`` [M, ...] (float64): ``(W [n, n], b [n], R^2)``.

    The same bits on every call, whatever torch's thread count: the fit is a QR factorization
    without pivoting (LAPACK ``gels``; the design ``[x, 1]`` [M, n + 1] must have full column rank,
    as noisy inputs with M > n + 1 have) on one intra-op thread. Torch's default CPU driver
    ``gelsy`` (QR with column pivoting) hands LAPACK an uninitialized pivot array, whose nonzero
    entries LAPACK reads as columns to keep in front: the pivot order, and so the last bits, change
    from call to call on the same inputs. And the blocked factorization adds partial results in an
    order that depends on the thread count once the matrix is large (hundreds of columns). One
    thread costs time at the paper preset's size (12 800 x 3073 per fit) where many cores are free."""
    with _env.torch_threads(1):
        xf, yf = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
        design = torch.cat([xf, xf.new_ones(xf.shape[0], 1)], dim=1)
        coef = torch.linalg.lstsq(design, yf, driver="gels").solution  # [n + 1, n]
        w, b = coef[:-1].T, coef[-1]
        resid = yf - design @ coef
        r2 = 1.0 - float(resid.square().sum() / (yf - yf.mean(0)).square().sum().clamp_min(1e-30))
    return w, b, r2
