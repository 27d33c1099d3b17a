"""Subspace helpers: orthonormal bases, null-space projection, principal angles, LOCO edit directions.

Vectors are stored as ROWS of the last dimension: a basis is ``[..., k, d]`` (k vectors of length d)
and ``v`` is ``[..., m, d]`` or ``[d]``; flatten images first (``U.flatten(-3)`` for ``[B, k, C, H, W]``).
"""

from __future__ import annotations

import torch

from diffcore._checks import check_positive_int, check_tensor


def orthonormal_rows(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [..., k, d] of the row span of ``basis`` [..., k, d] (QR; k <= d)."""
    check_tensor("basis", basis, min_ndim=2)
    if basis.shape[-2] > basis.shape[-1]:
        raise ValueError(f"basis: expected at most d = {basis.shape[-1]} rows, got {basis.shape[-2]}")
    work = basis if basis.dtype in (torch.float32, torch.float64) else basis.float()
    return torch.linalg.qr(work.transpose(-1, -2))[0].transpose(-1, -2)


def null_space_project(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from ``v`` its components in span(basis): ``v - Q^T Q v`` with Q = orthonormal rows of
    ``basis`` [..., k, d]. ``v`` is [..., m, d] (batch dimensions broadcast with basis') or [d]."""
    check_tensor("v", v)
    q = orthonormal_rows(basis).to(v.dtype if v.is_floating_point() else torch.float32)
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v: expected last dimension {q.shape[-1]} (like basis), got shape {tuple(v.shape)}")
    single = v.dim() == 1
    rows = v[None] if single else v
    out = rows - (rows @ q.transpose(-1, -2)) @ q
    return out[0] if single else out


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees [..., min(p, q)], ascending, between the row spans of
    ``a`` [..., p, d] and ``b`` [..., q, d] (each orthonormalized first).

    Small angles come from sines (singular values of ``Qb - Qb Qa^T Qa``), large ones from cosines
    (singular values of ``Qa Qb^T``), so float32 inputs resolve angles far below 0.1 degree.
    """
    check_tensor("a", a, min_ndim=2)
    check_tensor("b", b, min_ndim=2)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"b: expected vectors of length {a.shape[-1]} (like a), got shape {tuple(b.shape)}")
    if b.shape[-2] > a.shape[-2]:
        a, b = b, a  # b holds the smaller span
    dtype = torch.promote_types(a.dtype, b.dtype)
    qa, qb = orthonormal_rows(a.to(dtype)), orthonormal_rows(b.to(dtype))
    cos = torch.linalg.svdvals(qb @ qa.transpose(-1, -2)).clamp(0.0, 1.0)  # descending
    sin = torch.linalg.svdvals(qb - (qb @ qa.transpose(-1, -2)) @ qa).clamp(0.0, 1.0)  # descending
    sin = sin.flip(-1)  # pairs with cos
    angles = torch.where(cos.square() < 0.5, torch.arccos(cos), torch.arcsin(sin))
    return torch.rad2deg(angles).sort(dim=-1).values


def edit_direction(
    denoiser, x: torch.Tensor, sigma, mask: torch.Tensor, *, k_out: int = 5, index: int = 0, **subspace_kwargs
) -> torch.Tensor:
    """LOCO-Edit direction (docs/papers.md section 5) at each point of x [B, ...]: the ``index``-th right
    singular vector of the masked Jacobian ``M J`` (input directions that change the region of
    interest most), with the top ``k_out`` right singular vectors of the outside Jacobian
    ``(1 - M) J`` projected out (null-space projection, so the edit leaves the outside little
    changed), renormalized to unit norm. Returns [B, ...]. Extra keywords go to ``jacobian_subspace``.
    ``mask`` has shape ``x.shape[1:]`` or ``x.shape``; ``analysis.editing.loco_directions`` is the
    image pipeline's version (several directions, checked masks, timings).
    """
    check_positive_int("k_out", k_out, minimum=0)
    check_positive_int("index", index, minimum=0)
    check_tensor("mask", mask)
    outside_mask = 1 - mask.to(torch.float32 if not mask.is_floating_point() else mask.dtype)
    _, projected, _, _ = projected_directions(
        denoiser, x, sigma, mask, outside_mask, index + 1, k_out, **subspace_kwargs
    )
    return projected[:, index].reshape(x.shape).to(x.dtype)


def projected_directions(
    denoiser, x: torch.Tensor, sigma, inside_mask, outside_mask, rank: int, k_out: int, **subspace_kwargs
):
    """The top ``rank`` right singular vectors of ``M_in J`` with the top ``k_out`` right singular
    vectors of ``M_out J`` projected out of each and renormalized (the LOCO Edit step).

    Returns ``(raw [B, rank, d], projected [B, rank, d], inside, outside)`` with the two
    :class:`~diffcore.analysis.jacobian.JacobianSubspace` results (``outside`` is None for k_out = 0).
    """
    from diffcore.analysis.jacobian import jacobian_subspace

    batch = x.shape[0]
    inside = jacobian_subspace(denoiser, x, sigma, rank, mask=inside_mask, **subspace_kwargs)
    raw = inside.V.reshape(batch, rank, -1)
    projected, outside = raw, None
    if k_out > 0:
        outside = jacobian_subspace(denoiser, x, sigma, k_out, mask=outside_mask, **subspace_kwargs)
        projected = null_space_project(raw, outside.V.reshape(batch, k_out, -1))
    norm = projected.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(projected.dtype).tiny)
    return raw, projected / norm, inside, outside
