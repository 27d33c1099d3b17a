"""Reference of the empirical optimal denoiser of a training set (float64).

``D*(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i`` (docs/papers.md, Common substrate), the
denoiser that reproduces the training set exactly: a model equal to it has memorized.

Exact at tiny sigma too: the logits are taken relative to each query's best (smallest) distance,
``l_i = -(|x - y_i|^2 - |x - y_m|^2) / (2 sigma^2)``, so the best row and its exact ties get logit
0 (not -1e16, where float64 cannot hold the log 2 of a tie), and the excess distance of every pair
that can carry weight is computed in double-double arithmetic where the plain difference of the
two sums could be off by more than 1e-10 in the logit: ``sum_k (p_k - q_k)(p_k + q_k)`` with
``p = x - y_i``, ``q = x - y_m`` (zero for exact ties and duplicates, the float64 rounding of the
exact value for near-ties), and exactly (error-free terms, ``math.fsum``) where even the
double-double error could be (sigma 1e-30: ties whose coordinates come in different orders).
"""

from __future__ import annotations

import math

import torch

from diffcore.ref._pixels import exact_sqdist, rows_as_float

# exp(-746) underflows to 0 in float64: a pair whose logit lies further below the best weighs 0.
_ZERO_WEIGHT_LOGIT = 746.0
_FLOAT64_UNIT = 2.0**-53
_LOGIT_TOL = 1e-10  # the logits are exact to this (absolute): weights to 1e-10 relative


def empirical_denoise_ref(x: torch.Tensor, train: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical denoiser and log-normalizer in float64.

    Args:
        x: noisy inputs [B, ...].
        train: training set [N, ...] (same trailing shape), float or uint8 (``u8 / 127.5 - 1``).
        sigma: noise level, a float or a tensor of shape [B] (or 0-d); ``sigma^2`` must be a
            normal float64 (sigma above about 1.5e-154).
    Returns:
        ``(x0_hat [B, ...] float64, logz [B] float64)`` with
        ``logz = logsumexp_i(-|x - y_i|^2 / (2 sigma^2))`` (-inf where it leaves the float64 range).
    """
    xb = rows_as_float(x)
    yb = rows_as_float(train).to(xb.device)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=xb.device).reshape(-1)
    s = s.expand(xb.shape[0]) if s.numel() == 1 else s
    inv2s2 = (0.5 / s.square())[:, None]
    sqdist = exact_sqdist(xb, yb)  # [B, N]
    best = sqdist.argmin(dim=1)  # [B]
    best_sqdist = sqdist.gather(1, best[:, None])  # [B, 1]
    excess = _exact_excess(xb, yb, best, sqdist, best_sqdist, inv2s2)
    logits = -excess * inv2s2  # 0 for the best row and its exact ties
    lse = torch.logsumexp(logits, dim=1)
    weights = torch.exp(logits - lse[:, None])
    logz = -best_sqdist[:, 0] * inv2s2[:, 0] + lse
    return (weights @ yb).reshape(x.shape), logz


def _exact_excess(xb, yb, best, sqdist, best_sqdist, inv2s2, max_elements: int = 1 << 22) -> torch.Tensor:
    """``|x - y_i|^2 - |x - y_m|^2`` [B, N] for the best row m of each query. The plain difference
    of the two sums is kept where its rounding (the gamma_D bound of both sums) changes no logit by
    more than ``_LOGIT_TOL`` or where the pair cannot carry weight; the other pairs (few: near-ties
    at small sigma) are recomputed in double-double arithmetic, exact but for the final rounding."""
    excess = (sqdist - best_sqdist).clamp_min(0.0)
    rounding = 2.0 * xb.shape[1] * _FLOAT64_UNIT * (sqdist + best_sqdist)
    needs = ((excess - rounding) * inv2s2 <= _ZERO_WEIGHT_LOGIT) & (rounding * inv2s2 > _LOGIT_TOL)
    needs.scatter_(1, best[:, None], False)  # the best row's excess is 0 by definition
    b_idx, i_idx = torch.nonzero(needs, as_tuple=True)
    chunk = max(1, max_elements // xb.shape[1])
    for start in range(0, b_idx.numel(), chunk):
        b, i = b_idx[start : start + chunk], i_idx[start : start + chunk]
        excess[b, i] = _excess_double_double(xb[b], yb[i], yb[best[b]])
    # where even the double-double error ((D^2 + 8) u^2 of both sums) could move a logit: exact sums
    dim = xb.shape[1]
    dd_error = (dim * dim + 8.0) * _FLOAT64_UNIT**2 * (sqdist + best_sqdist) * inv2s2
    for b, i in torch.nonzero(needs & (dd_error > _LOGIT_TOL)).tolist():
        excess[b, i] = _excess_exact(xb[b], yb[i], yb[best[b]])
    return excess


def _excess_exact(x, y, y_best) -> float:
    """``|x - y|^2 - |x - y_best|^2`` for rows [D], exact but for one final rounding: each difference
    as an exact two-sum, each square as exact products, summed by ``math.fsum`` (tiny sigma, where
    the double-double excess could still move a logit: ties summed in different orders)."""
    terms = []
    for row, sign in ((y, 1.0), (y_best, -1.0)):
        hi, lo = _two_sum(x, -row)
        for a, b, scale in ((hi, hi, 1.0), (hi, lo, 2.0), (lo, lo, 1.0)):
            prod, err = _two_prod(a * scale, b)
            terms += [sign * prod, sign * err]
    return math.fsum(torch.cat(terms).tolist())


def _excess_double_double(x, y, y_best) -> torch.Tensor:
    """``sum_k (p_k - q_k)(p_k + q_k)`` with ``p = x - y``, ``q = x - y_best`` (rows [P, D]) in
    double-double arithmetic (error-free sums and products, a pairwise compensated sum): the
    float64 rounding of the exact value of ``|x - y|^2 - |x - y_best|^2`` for these float64 rows."""
    p_hi, p_lo = _two_sum(x, -y)
    q_hi, q_lo = _two_sum(x, -y_best)
    d_hi, d_lo = _two_sum(p_hi, -q_hi)
    d_lo = d_lo + (p_lo - q_lo)
    s_hi, s_lo = _two_sum(p_hi, q_hi)
    s_lo = s_lo + (p_lo + q_lo)
    t_hi, t_lo = _two_prod(d_hi, s_hi)
    t_lo = t_lo + (d_hi * s_lo + d_lo * s_hi)
    while t_hi.shape[1] > 1:  # pairwise: (hi, lo) of halves added with error-free sums
        if t_hi.shape[1] % 2:
            t_hi, t_lo = (torch.nn.functional.pad(t, (0, 1)) for t in (t_hi, t_lo))
        hi, err = _two_sum(t_hi[:, 0::2], t_hi[:, 1::2])
        t_hi, t_lo = hi, t_lo[:, 0::2] + t_lo[:, 1::2] + err
    return (t_hi + t_lo)[:, 0]


def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


_DEKKER_SPLIT = 134217729.0  # 2^27 + 1


def _two_prod(a, b):
    """(p, e) with p = fl(a b) and p + e = a b exactly (Dekker; no overflow for |a|, |b| < 1e150)."""
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _split(a):
    t = _DEKKER_SPLIT * a
    hi = t - (t - a)
    return hi, a - hi
