"""Numerical rank of denoiser Jacobians, alone and along a deterministic sampling trajectory.

docs/papers.md section 4: the numerical rank used by the public MoLRG code is the smallest k with
``sqrt(sum_{i<=k} s_i^2) > ratio * |J|_F`` (ratio = 0.99), i.e. the top k singular values carry more
than ratio^2 (98.01 %) of the squared Frobenius norm. ``criterion="energy"`` is the other common
convention: the smallest k with ``sum_{i<=k} s_i^2 > ratio * sum_i s_i^2`` (99 % of the energy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from diffcore import _env
from diffcore._checks import check_positive_int, check_tensor

CRITERIA = ("frobenius", "energy")
log = logging.getLogger(__name__)


def numerical_rank(
    singular_values: torch.Tensor,
    ratio: float = 0.99,
    criterion: str = "frobenius",
    *,
    frobenius_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Numerical rank [...] (int64) from singular values [..., r] (any order; sorted here).

    - ``"frobenius"`` (default, the public code's): smallest k with
      ``sqrt(sum_{i<=k} s_i^2) > ratio * |J|_F``.
    - ``"energy"``: smallest k with ``sum_{i<=k} s_i^2 > ratio * |J|_F^2``.

    ``|J|_F^2`` is ``sum_i s_i^2`` over the given values unless ``frobenius_sq`` [...] is passed (for a
    partial spectrum, e.g. from :func:`frobenius_norm_sq`). A zero Jacobian has rank 0. When the
    threshold is not reached within the r given values (possible only with ``frobenius_sq``), the
    result is ``r + 1``, read as "more than r".
    """
    check_tensor("singular_values", singular_values, min_ndim=1)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {', '.join(CRITERIA)}, got {criterion!r}")
    if not (0 < ratio <= 1):
        raise ValueError(f"ratio: expected 0 < ratio <= 1, got {ratio!r}")
    s2 = singular_values.double().abs().square().sort(dim=-1, descending=True).values
    cumulative = s2.cumsum(dim=-1)
    total = cumulative[..., -1] if frobenius_sq is None else torch.as_tensor(frobenius_sq).double().to(s2.device)
    threshold = total * (ratio**2 if criterion == "frobenius" else ratio)
    reached = cumulative > threshold[..., None]
    r = s2.shape[-1]
    first = torch.where(
        reached.any(dim=-1),
        reached.to(torch.int64).argmax(dim=-1) + 1,
        torch.full_like(threshold, r + 1, dtype=torch.int64),
    )
    return torch.where(total > 0, first, torch.zeros_like(first))


def frobenius_norm_sq(
    denoiser,
    x: torch.Tensor,
    sigma,
    *,
    basis: torch.Tensor | None = None,
    probes: int = 32,
    seed: int = 0,
    **operator_kwargs,
) -> torch.Tensor:
    """Estimate ``|J|_F^2`` [B] at each point with Hutchinson probes, ``E |J z|^2 = |J|_F^2`` for
    z ~ N(0, I). With ``basis`` = the right singular vectors V [B, k, ...] already found (and their
    singular values known by the caller), estimates only the remainder ``|J (I - V V^T)|_F^2`` (add
    ``sum s_i^2`` yourself): far smaller variance when the top k carry most of the norm. Unbiased;
    relative standard deviation about sqrt(2 / probes) of the estimated part.
    """
    from diffcore.analysis.jacobian import JacobianOperator

    check_positive_int("probes", probes)
    op = JacobianOperator(denoiser, x, sigma, **operator_kwargs)
    z = op.random_block(probes, torch.Generator().manual_seed(seed))
    if basis is not None:
        q = torch.linalg.qr(basis.reshape(op.batch, basis.shape[1], -1).to(z.dtype).transpose(1, 2))[0]
        z = z - q @ (q.transpose(1, 2) @ z)
    return op.matvec(z).square().sum(dim=(1, 2)) / probes


@dataclass
class TrajectoryRank:
    """Jacobian ranks along a trajectory.

    Attributes:
        sigmas: [S] the noise levels analysed (the schedule without its final 0).
        ranks: [S, B] int64 numerical ranks.
        singular_values: [S, B, r] (full spectrum when ``k`` is None, else the top k).
        frobenius_sq: [S, B] the |J|_F^2 used (exact, or estimated when ``k`` is given).
        points: [S, B, ...] the trajectory points at which J was taken.
    """

    sigmas: torch.Tensor
    ranks: torch.Tensor
    singular_values: torch.Tensor
    frobenius_sq: torch.Tensor
    points: torch.Tensor
    extras: dict = field(default_factory=dict)


def euler_trajectory(denoiser, x_T: torch.Tensor, sigmas) -> list[torch.Tensor]:
    """Points of the deterministic Euler PF-ODE solution ``x <- x + (s' - s) (x - D(x; s)) / s``
    (EDM Eq. 4, VE), one per sigma: ``[x_T, x_1, ..., x_{S-1}]`` (the point at the last sigma,
    usually 0, is included). A tiny stand-in for ``diffcore.sampler.sample_heun(..., callback=...)``:
    pass that sampler's points as ``trajectory=`` to :func:`rank_along_trajectory` instead.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).tolist()
    points = [x_T]
    x = x_T
    with torch.no_grad():
        for s, s_next in zip(sig[:-1], sig[1:]):
            d = (x - denoiser(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device))) / s
            x = x + (s_next - s) * d
            points.append(x)
    return points


def rank_along_trajectory(
    denoiser,
    x_T,
    sigmas,
    *,
    trajectory=None,
    k: int | None = None,
    ratio: float = 0.99,
    criterion: str = "frobenius",
    fro_probes: int = 32,
    shape=None,
    dtype=torch.float32,
    device=None,
    progress: bool = True,
    **subspace_kwargs,
) -> TrajectoryRank:
    """Numerical rank of ``J = dD/dx`` at each step of a deterministic trajectory.

    Args:
        denoiser: ``D(x, sigma)``.
        x_T: starting points [B, ...] at sigmas[0] (already scaled, ``sigma_max * noise``), or a
            sequence of integer seeds: then ``x_T = sigmas[0] * noise`` with per-sample seeded noise
            of the given ``shape`` (per-sample shape), ``dtype`` and ``device``.
        sigmas: descending noise levels [S+1] (typically ending in 0); J is taken at every sigma > 0.
        trajectory: optional list of points [B, ...] aligned with sigmas (e.g. from a sampler's
            callback); when None, a plain Euler solve (:func:`euler_trajectory`) produces them.
        k: None = full spectrum (``jacobian_full`` + ``svdvals``; small d only); an int = top-k by
            ``jacobian_subspace``, with ``|J|_F^2 = sum_{i<=k} s_i^2 + `` a Hutchinson estimate of the
            rest (``fro_probes`` probes): ranks above k come out as ``k + 1``.
        ratio, criterion: see :func:`numerical_rank`.
        subspace_kwargs: passed to ``jacobian_subspace`` (method, tol, iters, ...).
    """
    from diffcore.analysis.jacobian import jacobian_full, jacobian_subspace

    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if sig.numel() < 1 or not bool((sig[:-1] >= sig[1:]).all()):
        raise ValueError("sigmas: expected a non-empty descending sequence")
    if not isinstance(x_T, torch.Tensor):
        from diffcore.sampler import noise_from_seeds

        if shape is None:
            raise ValueError("shape: needed (the per-sample shape) when x_T is a sequence of seeds")
        x_T = float(sig[0]) * noise_from_seeds(list(x_T), shape, device=device, dtype=dtype)
    check_tensor("x_T", x_T, min_ndim=2)
    points = list(trajectory) if trajectory is not None else euler_trajectory(denoiser, x_T, sig)
    if len(points) != sig.numel():
        raise ValueError(f"trajectory: expected {sig.numel()} points (one per sigma), got {len(points)}")
    keep = [i for i in range(sig.numel()) if sig[i] > 0]
    ranks, spectra, fros = [], [], []
    iterator = keep
    if _env.progress_enabled(progress):
        from tqdm.auto import tqdm

        iterator = tqdm(keep, desc="jacobian rank", leave=False)
    for i in iterator:
        x, s = points[i], float(sig[i])
        if k is None:
            svals = torch.linalg.svdvals(jacobian_full(denoiser, x, s))
            fro = svals.double().square().sum(-1)
        else:
            sub = jacobian_subspace(denoiser, x, s, k, **subspace_kwargs)
            svals = sub.singular_values
            rest = frobenius_norm_sq(denoiser, x, s, basis=sub.V, probes=fro_probes)
            fro = svals.double().square().sum(-1) + rest.double()
        spectra.append(svals)
        fros.append(fro)
        ranks.append(numerical_rank(svals, ratio, criterion, frobenius_sq=fro))
        log.debug("sigma %.4g: ranks %s", s, ranks[-1].tolist())
    return TrajectoryRank(
        sigmas=sig[keep],
        ranks=torch.stack(ranks),
        singular_values=torch.stack(spectra),
        frobenius_sq=torch.stack(fros),
        points=torch.stack([points[i] for i in keep]),
    )
