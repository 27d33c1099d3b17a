"""Local linearity of a denoiser: how well its Jacobian predicts finite changes of its output.

For a point x, a direction v and a step s: ``delta = D(x + s v) - D(x)`` against the linear
prediction ``s J v`` (one JVP). Reported per direction and step: the relative error
``|delta - s J v| / |delta|`` and the cosine between ``delta`` and ``s J v`` (docs/papers.md section 5:
the posterior-mean predictor is locally linear, which is what makes LOCO edits work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcore._checks import check_tensor, sigma_per_row


@dataclass
class LocalLinearity:
    """Attributes: rel_error and cosine [B, m, S] (points, directions, scales); scales [S]."""

    rel_error: torch.Tensor
    cosine: torch.Tensor
    scales: torch.Tensor


def local_linearity(
    denoiser, x: torch.Tensor, sigma, directions: torch.Tensor, scales, *, normalize: bool = True
) -> LocalLinearity:
    """Compare ``D(x + s v) - D(x)`` with ``s J v``.

    Args:
        x: points [B, ...]; sigma: float or [B].
        directions: [m, ...] (shared by all points) or [B, m, ...] (per point).
        scales: step sizes [S] (a list or tensor).
        normalize: scale each direction to unit norm first (default), so s is a distance.
    Returns:
        :class:`LocalLinearity`. Where ``D(x + s v) = D(x)`` exactly, rel_error is 0 if the
        prediction is 0 too and inf otherwise, and the cosine is NaN.
    """
    check_tensor("x", x, min_ndim=2)
    check_tensor("directions", directions)
    shape = tuple(x.shape[1:])
    if tuple(directions.shape[1:]) == shape:
        directions = directions[None].expand(x.shape[0], *directions.shape)
    elif not (
        directions.dim() == x.dim() + 1 and directions.shape[0] == x.shape[0] and tuple(directions.shape[2:]) == shape
    ):
        raise ValueError(
            f"directions: expected shape [m, {', '.join(map(str, shape))}] or "
            f"[{x.shape[0]}, m, {', '.join(map(str, shape))}], got {tuple(directions.shape)}"
        )
    steps = torch.as_tensor(scales, dtype=x.dtype, device=x.device).reshape(-1)
    batch, m = x.shape[0], directions.shape[1]
    dirs = directions.to(x.dtype)
    if normalize:
        norms = dirs.reshape(batch, m, -1).norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
        dirs = dirs / norms.reshape(batch, m, *([1] * len(shape)))
    sig = sigma_per_row("sigma", sigma, batch, x.device).to(x.dtype)
    f = lambda z: denoiser(z, sig)  # noqa: E731
    tangents = dirs.transpose(0, 1)  # [m, B, ...]
    with torch.no_grad():
        base = f(x)
        jv = torch.stack([torch.func.jvp(f, (x,), (t,))[1] for t in tangents])  # [m, B, ...]
        rel, cos = [], []
        for s in steps:
            delta = torch.stack([f(x + s * t) for t in tangents]) - base  # [m, B, ...]
            pred = s * jv
            dflat, pflat = delta.reshape(m, batch, -1), pred.reshape(m, batch, -1)
            dnorm = dflat.norm(dim=-1)
            err = (dflat - pflat).norm(dim=-1)
            rel.append(
                torch.where(
                    dnorm > 0,
                    err / dnorm.clamp_min(torch.finfo(x.dtype).tiny),
                    torch.where(err > 0, torch.full_like(err, float("inf")), torch.zeros_like(err)),
                )
            )
            cos.append(torch.nn.functional.cosine_similarity(dflat, pflat, dim=-1, eps=0.0))
    return LocalLinearity(
        rel_error=torch.stack(rel, -1).transpose(0, 1), cosine=torch.stack(cos, -1).transpose(0, 1), scales=steps
    )
