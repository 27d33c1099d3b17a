"""LOCO Edit (docs/papers.md section 5): local, training-free edits along low-rank Jacobian directions.

For any denoiser ``D(x, sigma)`` (the posterior-mean predictor ``x0_hat(x_t)``, VE convention) and
an image ``x0`` [B, C, H, W] with a region of interest ``M`` [C, H, W]:

1. ``x_t``: the image inverted to the edit time by the PF-ODE (DDIM inversion with ``solver="ddim"``),
   or a generated sample's own trajectory stopped there (:class:`EditTimeline` maps the edit time
   t in (0, 1) of a DDPM schedule to a noise level sigma_t).
2. directions (:func:`loco_directions`): the top-r right singular vectors of ``M J`` with
   ``J = d x0_hat / d x_t`` (subspace iteration by JVPs/VJPs, ``analysis.jacobian_subspace``), each
   with the top ``k_out`` right singular vectors of the outside Jacobian ``(1 - M) J`` projected
   out (the null-space projection) and renormalized: ``v <- (I - V_out V_out^T) v / |.|``.
3. edits (:func:`edit_samples`): ``x_t + s v`` for each strength s, sampled back to sigma = 0 with
   the same grid (deterministic; optionally ancestral steps below a noise level, seeded per image).

Measures of an edit ``delta = edited - original`` (final images): :func:`edit_locality` (energy
inside the mask over outside, outside MSE) and :func:`edit_linearity` (cosine of the +s / -s
changes, growth of |delta| with s). :func:`jacobian_spectrum` gives the singular values at the edit
time for the numerical rank. Directions are saved and loaded with safetensors
(:func:`save_directions`, :func:`load_directions`) and apply to other images (transfer) or add up
(:func:`compose_directions`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcore._checks import check_positive_int, check_tensor


# ----------------------------------------------------------------------------- edit time -> sigma
class EditTimeline:
    """Edit times t in [0, 1] of a discrete DDPM schedule as VE noise levels.

    ``t`` is the fraction of the schedule's T timesteps (t = 0.6 is timestep 0.6 T, as in the LOCO
    Edit paper): ``sigma(t) = sqrt((1 - abar) / abar)`` at the fractional timestep ``t T`` (clamped
    to T - 1), interpolated linearly in log sigma. EDM-style models that have no discrete schedule
    use the DDPM linear schedule (the default), which puts their edit time at the noise level a
    DDPM model has at that time.

    Args:
        alphas_cumprod: [T] (e.g. a diffusers scheduler's); default ``ddpm_alphas_cumprod(1000, "linear")``.
    """

    def __init__(self, alphas_cumprod=None):
        from diffcore.sampler import ddpm_alphas_cumprod, sigmas_from_alphas_cumprod

        abar = ddpm_alphas_cumprod(1000, "linear") if alphas_cumprod is None else alphas_cumprod
        self.train_sigmas = sigmas_from_alphas_cumprod(torch.as_tensor(abar).detach().cpu())
        if not bool((self.train_sigmas[1:] > self.train_sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod: expected strictly decreasing values (sigma increasing with t)")

    @property
    def num_timesteps(self) -> int:
        return self.train_sigmas.numel()

    def sigma(self, t: float) -> float:
        """The noise level at edit time ``t`` in [0, 1]."""
        _check_time("t", t, closed=True)
        log_s = self.train_sigmas.log()
        position = min(t * self.num_timesteps, self.num_timesteps - 1.0)
        low = min(int(math.floor(position)), self.num_timesteps - 2)
        frac = position - low
        return float(torch.exp(log_s[low] * (1 - frac) + log_s[low + 1] * frac))

    def grid(self, t_from: float, t_to: float, steps: int) -> torch.Tensor:
        """Sigmas at ``steps + 1`` evenly spaced times from ``t_from`` to ``t_to`` (either order),
        float64; strictly monotone."""
        check_positive_int("steps", steps)
        times = torch.linspace(t_from, t_to, steps + 1, dtype=torch.float64).tolist()
        sigmas = torch.tensor([self.sigma(t) for t in times], dtype=torch.float64)
        steps_taken = sigmas[1:] - sigmas[:-1]
        if not bool((steps_taken > 0).all() or (steps_taken < 0).all()):
            raise ValueError(
                f"steps: {steps} steps between t = {t_from} and {t_to} repeat a noise level; use fewer steps"
            )
        return sigmas

    def steps_to(self, edit_time: float, steps: int) -> int:
        """Steps from t = 0 to ``edit_time`` when the whole schedule [0, 1] has ``steps`` steps (>= 1)."""
        _check_time("edit_time", edit_time)
        check_positive_int("steps", steps)
        return max(1, round(edit_time * steps))

    def inversion_grid(self, edit_time: float, steps: int) -> torch.Tensor:
        """Ascending sigmas from t = 0 to ``edit_time`` (``steps`` steps over the whole schedule,
        ``round(edit_time * steps)`` of them up to the edit time; the paper: 100 steps, t = 0.6)."""
        return self.grid(0.0, edit_time, self.steps_to(edit_time, steps))

    def sampling_grid(self, edit_time: float, steps: int) -> torch.Tensor:
        """The inversion grid descending, then 0: from the edit time back to the image."""
        down = self.inversion_grid(edit_time, steps).flip(0)
        return torch.cat([down, torch.zeros(1, dtype=torch.float64)])

    def generation_grid(self, edit_time: float, steps: int) -> torch.Tensor:
        """Descending sigmas from t = 1 (pure noise) down to ``edit_time``: the part of a generated
        sample's trajectory before the edit."""
        _check_time("edit_time", edit_time)
        return self.grid(1.0, edit_time, max(1, round((1.0 - edit_time) * steps)))


def _check_time(name: str, t, *, closed: bool = False) -> None:
    ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
    ok = ok and ((0.0 <= t <= 1.0) if closed else (0.0 < t < 1.0))
    if not ok:
        interval = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{name}: expected a time in {interval} (a fraction of the diffusion horizon T), got {t!r}")


# ----------------------------------------------------------------------------- masks
def region_mask(mask, shape) -> torch.Tensor:
    """The region of interest as a float mask [C, H, W] for images of shape [C, H, W].

    Accepts [H, W], [1, H, W] (shared by all channels) or [C, H, W], values in [0, 1] (bool too).
    Raises ValueError naming ``mask`` for another shape, values outside [0, 1], NaN, or an empty
    mask (no pixel inside)."""
    check_tensor("mask", mask)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"shape: expected an image shape [C, H, W], got {shape}")
    c, h, w = shape
    m = mask.detach().to(torch.float64) if not mask.is_floating_point() else mask.detach().double()
    if tuple(m.shape) == (h, w):
        m = m[None]
    if tuple(m.shape) == (1, h, w):
        m = m.expand(c, h, w)
    if tuple(m.shape) != (c, h, w):
        raise ValueError(
            f"mask: expected shape [{h}, {w}], [1, {h}, {w}] or [{c}, {h}, {w}] (the image's), got {tuple(mask.shape)}"
        )
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError("mask: expected values in [0, 1]")
    if float(m.sum()) == 0:
        raise ValueError("mask: is empty (no pixel inside the region of interest)")
    return m.contiguous()


def _pixel_count(mask: torch.Tensor) -> int:
    """Entries of a [C, H, W] mask that are not 0 (the output rows the masked Jacobian keeps)."""
    return int((mask != 0).sum())


# ----------------------------------------------------------------------------- directions
@dataclass
class LocoDirections:
    """LOCO Edit directions at points x_t [B, ...].

    Attributes:
        directions: [B, r, ...] unit edit directions (null-space projected when ``k_out > 0``).
        unprojected: [B, r, ...] the right singular vectors of ``M J`` (before projection).
        singular_values: [B, r] of ``M J``.
        outside: [B, k_out, ...] right singular vectors of ``(1 - M) J`` that were projected out (or None).
        outside_singular_values: [B, k_out] (or None).
        sigma: the noise level; seconds, cpu_seconds: wall and process CPU time of the computation.
    """

    directions: torch.Tensor
    unprojected: torch.Tensor
    singular_values: torch.Tensor
    outside: torch.Tensor | None
    outside_singular_values: torch.Tensor | None
    sigma: float
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def loco_directions(
    denoiser, x: torch.Tensor, sigma: float, mask, *, rank: int = 1, k_out: int = 5, **subspace_kwargs
) -> LocoDirections:
    """LOCO Edit directions at each point of ``x`` [B, C, H, W] (docs/papers.md section 5).

    The top ``rank`` right singular vectors of ``M J`` (J = dD(x; sigma)/dx, M = ``mask``) with the
    top ``k_out`` right singular vectors of ``(1 - M) J`` projected out of each, renormalized.
    ``mask`` as in :func:`region_mask`. Extra keywords go to ``analysis.jacobian_subspace`` (method,
    iters, tol, probes, seed). Raises ValueError naming ``rank`` when it exceeds the number of pixels
    inside the mask (``M J`` has at most that rank), and ``k_out`` likewise for the outside.
    """
    from diffcore.analysis.projection import projected_directions

    check_tensor("x", x, ndim=4)
    m = region_mask(mask, x.shape[1:]).to(device=x.device)
    check_positive_int("rank", rank)
    check_positive_int("k_out", k_out, minimum=0)
    inside_count, outside_count = _pixel_count(m), _pixel_count(1 - m)
    if rank > inside_count:
        raise ValueError(
            f"rank: {rank} exceeds the {inside_count} pixel values inside the mask "
            f"(the masked Jacobian's largest possible rank)"
        )
    if k_out > outside_count:
        raise ValueError(f"k_out: {k_out} exceeds the {outside_count} pixel values outside the mask")
    start, cpu_start = time.perf_counter(), time.process_time()
    batch = x.shape[0]
    raw, directions, inside, outside = projected_directions(
        denoiser, x, sigma, m.to(x.dtype), (1 - m).to(x.dtype), rank, k_out, **subspace_kwargs
    )
    shape = (batch, rank, *x.shape[1:])
    return LocoDirections(
        directions=directions.reshape(shape).to(x.dtype).detach(),
        unprojected=raw.reshape(shape).to(x.dtype).detach(),
        singular_values=inside.singular_values.detach(),
        outside=None if outside is None else outside.V.detach(),
        outside_singular_values=None if outside is None else outside.singular_values.detach(),
        sigma=float(sigma),
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
    )


def compose_directions(directions: torch.Tensor, weights) -> torch.Tensor:
    """``sum_i w_i v_i`` over the direction axis: directions [..., m, C, H, W], weights [m] -> [..., C, H, W]
    (not renormalized: ``x_t + 1 * compose(v, w)`` is the sum of the edits ``w_i v_i``)."""
    check_tensor("directions", directions, min_ndim=4)
    w = torch.as_tensor(weights, dtype=directions.dtype, device=directions.device).reshape(-1)
    m = directions.shape[-4]
    if w.numel() != m:
        raise ValueError(f"weights: expected {m} weights (one per direction), got {w.numel()}")
    return (directions * w.reshape(m, 1, 1, 1)).sum(dim=-4)


def save_directions(path, directions: LocoDirections) -> Path:
    """Write ``directions`` to a safetensors file (tensors only; the sigma and timings as metadata)."""
    from safetensors.torch import save_file

    tensors = {
        "directions": directions.directions,
        "unprojected": directions.unprojected,
        "singular_values": directions.singular_values,
    }
    if directions.outside is not None:
        tensors["outside"] = directions.outside
        tensors["outside_singular_values"] = directions.outside_singular_values
    meta = {
        "sigma": repr(directions.sigma),
        "seconds": repr(directions.seconds),
        "cpu_seconds": repr(directions.cpu_seconds),
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return Path(path)


def load_directions(path, device="cpu") -> LocoDirections:
    """Read directions written by :func:`save_directions` (safetensors: no code runs on load)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata() or {}
    missing = {"directions", "unprojected", "singular_values"} - set(tensors)
    if missing:
        raise ValueError(f"path: {path} is not a directions file (missing {', '.join(sorted(missing))})")
    return LocoDirections(
        directions=tensors["directions"],
        unprojected=tensors["unprojected"],
        singular_values=tensors["singular_values"],
        outside=tensors.get("outside"),
        outside_singular_values=tensors.get("outside_singular_values"),
        sigma=float(meta.get("sigma", "nan")),
        seconds=float(meta.get("seconds", "0")),
        cpu_seconds=float(meta.get("cpu_seconds", "0")),
    )


# ----------------------------------------------------------------------------- sampling back
def sample_back(
    denoiser, x: torch.Tensor, sigmas, *, solver: str = "ddim", stochastic_below: float = 0.0, seeds=None
) -> torch.Tensor:
    """Sample ``x`` [B, ...] (the state at ``sigmas[0]``) down the descending grid ``sigmas`` (ending
    in 0) with ``solver``; steps that start at or below ``stochastic_below`` (a noise level; 0 = none)
    are DDPM-ancestral (DDIM with eta = 1) with per-image noise from ``seeds`` (one per row), so
    the same x and seeds give the same result bitwise."""
    from diffcore.sampler import SOLVERS, SeededNoise, sample_ddim

    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    grid = torch.as_tensor(sigmas, dtype=torch.float64)
    if not (isinstance(stochastic_below, (int, float)) and stochastic_below >= 0):
        raise ValueError(f"stochastic_below: expected a noise level >= 0, got {stochastic_below!r}")
    with torch.no_grad():
        if stochastic_below <= 0 or float(grid[-2]) > stochastic_below:
            return SOLVERS[solver](denoiser, x, grid)
        if seeds is None or len(seeds) != x.shape[0]:
            raise ValueError(f"seeds: expected one seed per image ({x.shape[0]}) for the stochastic steps")
        split = int((grid[:-1] <= stochastic_below).nonzero()[0])
        if split > 0:
            x = SOLVERS[solver](denoiser, x, grid[: split + 1], require_zero_end=False)
        return sample_ddim(denoiser, x, grid[split:], eta=1.0, generator=SeededNoise(list(seeds), device=x.device))


def edit_samples(
    denoiser, x_t: torch.Tensor, direction: torch.Tensor, strengths, sigmas, **sample_kwargs
) -> torch.Tensor:
    """Edited images [S, B, ...]: ``x_t + s v`` sampled back by :func:`sample_back` for each strength s.

    ``direction`` is [B, ...] (one per image) or [...] (shared: a transferred direction). Each
    strength runs as its own batch of B images, like the unedited run, so s = 0 reproduces
    ``sample_back(denoiser, x_t, sigmas)`` bitwise."""
    check_tensor("x_t", x_t, min_ndim=2)
    check_tensor("direction", direction)
    if tuple(direction.shape) == tuple(x_t.shape[1:]):
        direction = direction.expand(x_t.shape)
    elif tuple(direction.shape) != tuple(x_t.shape):
        raise ValueError(
            f"direction: expected shape {tuple(x_t.shape)} or {tuple(x_t.shape[1:])}, got {tuple(direction.shape)}"
        )
    values = [float(s) for s in torch.as_tensor(strengths, dtype=torch.float64).reshape(-1)]
    if not values or not all(math.isfinite(s) for s in values):
        raise ValueError(f"strengths: expected finite numbers, got {strengths!r}")
    v = direction.to(x_t.dtype)
    return torch.stack([sample_back(denoiser, x_t + s * v, sigmas, **sample_kwargs) for s in values])


# ----------------------------------------------------------------------------- measures
def edit_locality(delta: torch.Tensor, mask) -> dict[str, torch.Tensor]:
    """Where an edit changed the image. ``delta`` = edited - original [..., C, H, W]; ``mask`` as in
    :func:`region_mask` (weights: a soft mask splits each pixel's energy).

    Returns tensors [...] (float64): ``inside`` = sum M delta^2, ``outside`` = sum (1 - M) delta^2,
    ``locality`` = inside / outside (inf when nothing changed outside), ``inside_fraction`` =
    inside / (inside + outside) (NaN when nothing changed), ``outside_mse`` = outside / sum (1 - M)
    (the masked MSE outside the region; 0 when the mask covers everything)."""
    check_tensor("delta", delta, min_ndim=3)
    m = region_mask(mask, delta.shape[-3:]).to(delta.device)
    d2 = delta.double().square()
    inside = (d2 * m).sum(dim=(-3, -2, -1))
    outside = (d2 * (1 - m)).sum(dim=(-3, -2, -1))
    total = inside + outside
    outside_weight = float((1 - m).sum())
    return {
        "inside": inside,
        "outside": outside,
        "locality": torch.where(outside > 0, inside / outside.clamp_min(1e-300), torch.full_like(inside, math.inf)),
        "inside_fraction": torch.where(total > 0, inside / total.clamp_min(1e-300), torch.full_like(inside, math.nan)),
        "outside_mse": outside / outside_weight if outside_weight > 0 else torch.zeros_like(outside),
    }


def edit_linearity(plus: torch.Tensor, minus: torch.Tensor, strengths) -> dict[str, torch.Tensor]:
    """Linearity of edits in the strength s. ``plus``, ``minus``: the changes delta(+s), delta(-s)
    [S, B, ...] for ascending positive ``strengths`` [S].

    Returns [S, B] float64: ``cosine_pm`` = cos(delta(+s), delta(-s)) (-1 for a linear edit),
    ``change_per_strength`` = |delta(+s)| / s (unnormalized), and ``gain`` = that over its value at
    the first strength s_1 (1 for a change growing linearly in s; 1 at s_1 by construction)."""
    check_tensor("plus", plus, min_ndim=2)
    if plus.shape != minus.shape:
        raise ValueError(f"minus: expected shape {tuple(plus.shape)} (like plus), got {tuple(minus.shape)}")
    s = torch.as_tensor(strengths, dtype=torch.float64).reshape(-1)
    if s.numel() != plus.shape[0] or not bool((s > 0).all()):
        raise ValueError(f"strengths: expected {plus.shape[0]} positive values, got {strengths!r}")
    p, q = plus.double().flatten(2), minus.double().flatten(2)
    cosine = torch.nn.functional.cosine_similarity(p, q, dim=-1, eps=1e-300)
    per_unit = p.norm(dim=-1) / s[:, None]
    return {"cosine_pm": cosine, "gain": per_unit / per_unit[:1].clamp_min(1e-300), "change_per_strength": per_unit}


def jacobian_spectrum(
    denoiser,
    x: torch.Tensor,
    sigma: float,
    *,
    mask=None,
    k: int | None = None,
    probes: int = 32,
    seed: int = 0,
    **subspace_kwargs,
):
    """Singular values of ``J`` (or ``M J`` with ``mask``) at each point of ``x`` [B, ...], and
    ``|J|_F^2`` [B]: ``(s [B, r], frobenius_sq [B])`` for ``analysis.numerical_rank``.

    ``k=None``: the full Jacobian (``jacobian_full``, d VJPs: small images only) and its exact
    spectrum. Otherwise the top k (``jacobian_subspace``) and a Hutchinson estimate of the rest."""
    from diffcore.analysis.jacobian import jacobian_full, jacobian_subspace
    from diffcore.analysis.rank import frobenius_norm_sq

    check_tensor("x", x, ndim=4)
    m = None if mask is None else region_mask(mask, x.shape[1:]).to(device=x.device, dtype=x.dtype)
    if k is None:
        jac = jacobian_full(denoiser, x, sigma, mode="rev")
        if m is not None:
            jac = jac * m.reshape(1, -1, 1)
        s = torch.linalg.svdvals(jac.double())
        return s, s.square().sum(dim=-1)
    check_positive_int("k", k)
    top = jacobian_subspace(denoiser, x, sigma, k, mask=m, seed=seed, **subspace_kwargs)
    rest = frobenius_norm_sq(denoiser, x, sigma, basis=top.V, probes=probes, seed=seed + 1, mask=m)
    s = top.singular_values.double()
    return s, s.square().sum(dim=-1) + rest.double()


# ----------------------------------------------------------------------------- exact directions (small images)
@dataclass
class ExactDirections:
    """Edit directions from full Jacobians (small images), all null-space projected the same way.

    Attributes (d = C H W pixels, B points):
        loco: [B, d] the top right singular vector of ``M J``, projected (the LOCO direction).
        unprojected: [B, d] that singular vector before the projection.
        outside: [B, d, k_out] the top right singular vectors of ``(1 - M) J`` projected out.
        masked_singular_values: [B, min(d, ...)] singular values of ``M J``.
    """

    loco: torch.Tensor
    unprojected: torch.Tensor
    outside: torch.Tensor
    masked_singular_values: torch.Tensor


def exact_loco_directions(jacobian: torch.Tensor, mask: torch.Tensor, k_out: int) -> ExactDirections:
    """LOCO directions from full Jacobians ``jacobian`` [B, d, d] (``J[b, i, j] = dD_i / dx_j``) and a
    region mask [d] (or any shape with d entries): the top right singular vector of ``M J``, with the
    top ``k_out`` right singular vectors of ``(1 - M) J`` projected out and renormalized (the same
    construction as :func:`loco_directions`, by exact SVD instead of subspace iteration)."""
    check_tensor("jacobian", jacobian, ndim=3)
    b, d, d2 = jacobian.shape
    if d != d2:
        raise ValueError(f"jacobian: expected square matrices [B, d, d], got {tuple(jacobian.shape)}")
    m = mask.reshape(-1).to(torch.float64)
    if m.numel() != d:
        raise ValueError(f"mask: expected {d} entries (the Jacobian's size), got {m.numel()}")
    check_positive_int("k_out", k_out, minimum=0)
    if k_out > _pixel_count(1 - m):
        raise ValueError(f"k_out: {k_out} exceeds the {_pixel_count(1 - m)} pixel values outside the mask")
    jac = jacobian.to(torch.float64)
    _, s_in, vh_in = torch.linalg.svd(m[None, :, None] * jac)
    top = vh_in[:, 0]  # [B, d]
    _, _, vh_out = torch.linalg.svd((1 - m)[None, :, None] * jac)
    outside = vh_out[:, :k_out].transpose(1, 2)  # [B, d, k_out]
    return ExactDirections(project_out(top, outside), top, outside, s_in)


def project_out(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(I - V V^T) v / |.|`` per row: v [B, d], basis V [B, d, k] orthonormal columns -> [B, d] unit."""
    check_tensor("v", v, ndim=2)
    check_tensor("basis", basis, ndim=3)
    w = v.to(torch.float64)
    if basis.shape[-1]:
        vb = basis.to(torch.float64)
        w = w - (vb @ (vb.transpose(1, 2) @ w[:, :, None]))[:, :, 0]
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)


def top_masked_direction(matrix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The top right singular vector [d] of ``M W`` for one matrix ``W`` [d, d] (e.g. the Gaussian
    denoiser's Jacobian ``W_G(sigma)``, the same for every point) and a mask with d entries."""
    check_tensor("matrix", matrix, ndim=2)
    m = mask.reshape(-1).to(torch.float64)
    return torch.linalg.svd(m[:, None] * matrix.to(torch.float64))[2][0]
