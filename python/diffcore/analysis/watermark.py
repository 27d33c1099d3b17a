"""Fourier ring watermarks written into the diffusion state, detected by ODE inversion (docs/papers.md section 6).

Shallow Diffuse (Li et al., arXiv 2410.21088) writes a key into the state ``x_t`` at a *shallow*
time (0.3 T) and continues deterministic sampling; Tree-Ring (Wen et al. 2023) writes the same key
into the initial noise ``x_T``. Both are detected by inverting the image back to the time of
injection and comparing the Fourier coefficients under the key's mask with the key.

Conventions (VE/EDM, ``x = x0 + sigma n``; docs/design.md, Sigma conventions):

- The key lives in *VP units*: the state is scaled by ``sqrt(abar) = 1/sqrt(1 + sigma^2)`` before
  its FFT, as the DDPM latent that the papers write into (``x_vp = sqrt(abar) x0 + sqrt(1 - abar)
  eps`` has per-pixel scale about 1 at every time), so one key fits every injection time.
- Spectrum: ``fft2`` (unnormalized) of one channel. ``band="high"`` uses the unshifted spectrum,
  where a disc around the array centre ``(H/2, W/2)`` holds the *highest* frequencies (the public
  code's ``complex2`` injection, used in its README command); ``band="low"`` uses the
  ``fftshift``-ed spectrum, where the same disc holds the lowest ones (Tree-Ring's ``complex``).
- Key: a ring pattern on the disc of ``radius`` around the centre: every point at distance d gets
  ring ``max(1, ceil(d))``'s value (the nested discs of the public code, where the centre shares
  ring 1). Ring values are complex normals with ``E|c|^2 = H W`` (an FFT coefficient of unit white
  noise, as the public code's key), real and imaginary parts from Box-Muller on
  ``random.Random(seed).random()`` (Python's Mersenne Twister, whose sequence the Python docs
  guarantee across versions and platforms). A ring holds ``c`` on one half plane (centred
  offsets ``(u, v)`` with u > 0, or u = 0 and v > 0), ``conj(c)`` on the mirror half and ``Re c``
  at the centre: the key is Hermitian on a disc symmetric under ``k -> -k``, so injection gives a
  real state exactly (the public code writes the same complex value on the whole ring and drops the
  imaginary part of the result, so half of its key never reaches the state, and any watermarked
  image's disc becomes real - closer to every other key than an unmarked image is).
- Detection score: mean L1 distance ``mean_{k in mask} |F(x)_k - key_k|`` (lower = watermarked),
  and Tree-Ring's p-value: with ``y`` the real and imaginary parts of the masked coefficients and
  ``w`` the key's, ``s = std(y)``, ``p = ncx2.cdf(sum((y - w)^2) / s^2, df = len(y),
  nc = sum(w^2) / s^2)`` (lower = watermarked). That test assumes ``len(y)`` independent
  entries, but a ring key holds only ``2 radius`` random numbers: another key can land close, and
  the p-value then calls it detected. :func:`key_rank_p_value` is the calibrated alternative: the
  rank of the key's distance among the distances to ``references`` other ring keys (seeds
  ``REFERENCE_SEED + j``), ``p = (1 + #{j: d_j <= d}) / (1 + references)``; keys are exchangeable
  under "not marked with this key" (unmarked, or marked with any other key), so p is uniform
  there, whatever the model, attack or key power.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from diffcore._checks import check_positive_int, check_tensor

BANDS = ("high", "low")
REFERENCE_SEED = 1 << 40  # seeds of the reference keys of key_rank_p_value
MAX_REFERENCE_KEYS = 100_000  # reference keys one call builds


@dataclass(frozen=True)
class RingKey:
    """A watermark key: real ring values on a disc of one channel's spectrum.

    Attributes:
        values: [H, W] complex128, the key on the band's spectrum (0 outside the mask).
        mask: [H, W] bool, the disc.
        channel, radius, band, seed: how it was made.
        shape: the per-sample image shape ``(C, H, W)`` it fits.
    """

    values: torch.Tensor
    mask: torch.Tensor
    channel: int
    radius: int
    band: str
    seed: int
    shape: tuple

    @property
    def size(self) -> int:
        """Number of masked coefficients."""
        return int(self.mask.sum())


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or any(v <= 0 for v in shape):
        raise ValueError(f"shape: expected the per-sample shape (C, H, W) with positive sizes, got {shape}")
    c, h, w = shape
    if h % 2 or w % 2 or min(h, w) < 4:
        raise ValueError(f"shape: expected an even height and width >= 4 (a disc symmetric under k -> -k), got {h}x{w}")
    return c, h, w


def seeded_normals(seed: int, count: int) -> list[float]:
    """``count`` standard normals from ``seed``, the same on every platform: Box-Muller
    ``sqrt(-2 ln(1 - u1)) cos(2 pi u2)`` on pairs of ``random.Random(seed).random()`` (Python
    guarantees that sequence across versions; ``gauss`` has no such guarantee)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        u1, u2 = rng.random(), rng.random()
        out.append(math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2))
    return out


def max_radius(shape) -> int:
    """The largest disc radius that fits the spectrum of ``shape`` (C, H, W): ``min(H, W)/2 - 1``
    (the disc stays off the spectrum's edge row and column, so it is symmetric under k -> -k)."""
    _, h, w = _check_shape(shape)
    return min(h, w) // 2 - 1


def ring_key(shape, *, radius: int, channel: int = 0, band: str = "high", seed: int = 0) -> RingKey:
    """The seeded ring key for images of ``shape`` (C, H, W) (see the module docstring).

    Raises ValueError naming ``radius`` (below 1 or larger than the spectrum: see
    :func:`max_radius`), ``channel`` (outside [0, C)), ``band``, ``seed`` or ``shape``.
    """
    c, h, w = _check_shape(shape)
    if band not in BANDS:
        raise ValueError(f"band: expected one of {', '.join(BANDS)}, got {band!r}")
    check_positive_int("radius", radius)
    limit = max_radius(shape)
    if radius > limit:
        raise ValueError(f"radius: {radius} is larger than the {h}x{w} spectrum allows (at most {limit})")
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < c:
        raise ValueError(f"channel: expected an integer in [0, {c}) for {c}-channel images, got {channel!r}")
    check_positive_int("seed", seed, minimum=0)
    rows = torch.arange(h, dtype=torch.float64)[:, None] - h // 2
    cols = torch.arange(w, dtype=torch.float64)[None, :] - w // 2
    distance = (rows.square() + cols.square()).sqrt()
    mask = distance <= radius
    ring = distance.ceil().clamp(1, radius).long()  # ring index 1 .. radius on the disc
    z = torch.tensor(seeded_normals(seed, 2 * radius), dtype=torch.float64) * math.sqrt(h * w / 2)
    ring_values = torch.cat([torch.zeros(1, dtype=torch.complex128), torch.complex(z[0::2], z[1::2])])
    upper_half = (rows > 0) | ((rows == 0) & (cols > 0))
    centre = (rows == 0) & (cols == 0)
    values = ring_values[ring]
    values = torch.where(upper_half, values, values.conj())
    values = torch.where(centre, values.real.to(values.dtype), values)
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype))
    return RingKey(values, mask, channel, radius, band, seed, (c, h, w))


def spectrum(image: torch.Tensor, band: str) -> torch.Tensor:
    """``fft2`` [..., H, W] complex128 of ``image`` [..., H, W] (``fftshift``-ed for ``band="low"``)."""
    f = torch.fft.fft2(image.to(torch.float64))
    return torch.fft.fftshift(f, dim=(-2, -1)) if band == "low" else f


def _inverse_spectrum(f: torch.Tensor, band: str) -> torch.Tensor:
    if band == "low":
        f = torch.fft.ifftshift(f, dim=(-2, -1))
    return torch.fft.ifft2(f).real


def _check_images(name: str, x: torch.Tensor, key: RingKey) -> None:
    check_tensor(name, x, ndim=4)
    if tuple(x.shape[1:]) != key.shape:
        raise ValueError(
            f"{name}: expected images of shape [B, {', '.join(map(str, key.shape))}] (the key's), got {tuple(x.shape)}"
        )


def vp_scale(sigma: float) -> float:
    """``sqrt(abar) = 1/sqrt(1 + sigma^2)``: VE state times this is the VP state."""
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2)


def inject(x: torch.Tensor, key: RingKey, sigma: float) -> torch.Tensor:
    """Overwrite the key's disc in the spectrum of channel ``key.channel`` of the VE state ``x``
    [B, C, H, W] at noise level ``sigma`` (in VP units, see the module docstring). Returns a new
    tensor in x's dtype; the other channels and the coefficients outside the disc are unchanged."""
    _check_images("x", x, key)
    scale = vp_scale(sigma)
    f = spectrum(x[:, key.channel] * scale, key.band)
    mask = key.mask.to(x.device)
    f = torch.where(mask, key.values.to(x.device).to(f.dtype), f)
    out = x.clone()
    out[:, key.channel] = (_inverse_spectrum(f, key.band) / scale).to(x.dtype)
    return out


def masked_coefficients(x: torch.Tensor, key: RingKey, sigma: float) -> torch.Tensor:
    """The spectrum's coefficients under the key's mask [B, M] (complex128) of the VE state ``x``."""
    _check_images("x", x, key)
    f = spectrum(x[:, key.channel] * vp_scale(sigma), key.band)
    return f[:, key.mask.to(x.device)]


def key_distance(x: torch.Tensor, key: RingKey, sigma: float) -> torch.Tensor:
    """Detection score [B] (float64): mean L1 distance of the masked coefficients to the key (lower
    means watermarked)."""
    return _l1(masked_coefficients(x, key, sigma), key)


def _l1(coeffs: torch.Tensor, key: RingKey) -> torch.Tensor:
    """Mean |coefficient - key| [B] over the mask, for coefficients [B, M] under ``key.mask``."""
    return (coeffs - key.values[key.mask].to(coeffs.device)).abs().mean(dim=1)


def key_p_value(x: torch.Tensor, key: RingKey, sigma: float) -> torch.Tensor:
    """Tree-Ring's p-value [B] (float64; lower means watermarked): under "no watermark" the masked
    real and imaginary parts are taken as i.i.d. N(0, s^2) with ``s`` their standard deviation, so
    ``sum((y - key)^2) / s^2`` is noncentral chi-square with ``len(y)`` degrees of freedom and
    noncentrality ``sum(key^2) / s^2``; the p-value is its CDF at the observed value. Needs scipy."""
    from scipy.stats import ncx2

    coeffs = masked_coefficients(x, key, sigma)
    y = torch.cat([coeffs.real, coeffs.imag], dim=1)
    target = key.values[key.mask].to(y.device)
    target = torch.cat([target.real, target.imag])
    s2 = y.var(dim=1, unbiased=True).clamp_min(1e-300)
    stat = (y - target).square().sum(dim=1) / s2
    nc = target.square().sum() / s2
    return torch.as_tensor(ncx2.cdf(stat.cpu().numpy(), df=y.shape[1], nc=nc.cpu().numpy()), dtype=torch.float64)


def reference_keys(key: RingKey, count: int) -> list[RingKey]:
    """``count`` ring keys like ``key`` (shape, radius, channel, band) with seeds ``REFERENCE_SEED + j``
    (at most ``MAX_REFERENCE_KEYS``: every key is built in memory)."""
    check_positive_int("count", count)
    if count > MAX_REFERENCE_KEYS:
        raise ValueError(f"count: expected at most {MAX_REFERENCE_KEYS} reference keys, got {count}")
    return [
        ring_key(key.shape, radius=key.radius, channel=key.channel, band=key.band, seed=REFERENCE_SEED + j)
        for j in range(count)
    ]


def key_rank_p_value(x: torch.Tensor, key: RingKey, sigma: float, *, references: int = 99) -> torch.Tensor:
    """Monte-Carlo key test [B] (float64; lower means marked with *this* key): ``(1 + #{j: d(x, K_j)
    <= d(x, key)}) / (1 + references)`` over :func:`reference_keys` (see the module docstring)."""
    coeffs = masked_coefficients(x, key, sigma)
    distance = _l1(coeffs, key)
    count = torch.zeros_like(distance)
    for ref in reference_keys(key, references):
        count += (_l1(coeffs, ref) <= distance).double()
    return (1.0 + count) / (1.0 + references)


# ----------------------------------------------------------------------------- times and grids


def check_time(time: float) -> float:
    """``time`` as a float in the open interval (0, 1); raises ValueError naming ``time``."""
    if isinstance(time, bool) or not isinstance(time, (int, float)) or not 0.0 < float(time) < 1.0:
        raise ValueError(f"time: expected a fraction of the diffusion time in (0, 1), got {time!r}")
    return float(time)


def sigma_at_time(time: float, alphas_cumprod: torch.Tensor | None = None) -> float:
    """The VE noise level of the DDPM timestep ``round(time * T)`` (clamped to T - 1) of a VP schedule:
    ``sigma = sqrt((1 - abar) / abar)``. Default schedule: DDPM's linear betas 1e-4 .. 0.02 over
    T = 1000 (so time 0.3 -> timestep 300 -> sigma = 1.2316). EDM models are given the same map, so
    "0.3 T" means the same noise level for every model."""
    from diffcore.sampler import ddpm_alphas_cumprod, sigmas_from_alphas_cumprod

    time = check_time(time)
    abar = ddpm_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
    sigmas = sigmas_from_alphas_cumprod(abar.detach().cpu())
    index = min(int(round(time * sigmas.numel())), sigmas.numel() - 1)
    return float(sigmas[index])


def split_sigmas(sigmas, sigma: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Split a descending sampling grid (ending in 0) at ``sigma``: ``(upper, lower)`` with
    ``upper`` = sigmas[0] .. sigma (None when sigma is the first value) and ``lower`` = sigma .. 0.
    ``sigma`` is inserted into the grid when it is not a grid point (one more step in all)."""
    from diffcore.sampler import sigma_list

    values = sigma_list(sigmas)
    if not values[-2] < sigma <= values[0]:
        raise ValueError(f"sigma: expected a value in ({values[-2]:g}, {values[0]:g}] (inside the grid), got {sigma!r}")
    upper = [v for v in values if v > sigma]
    lower = [sigma] + [v for v in values if v < sigma]
    # a grid point within 1e-12 (relative) of sigma is sigma itself
    if upper and abs(upper[-1] - sigma) <= 1e-12 * sigma:
        upper = upper[:-1]
    up = torch.tensor(upper + [sigma], dtype=torch.float64) if upper else None
    return up, torch.tensor(lower, dtype=torch.float64)


# ----------------------------------------------------------------------------- embed and detect


@dataclass
class WatermarkedSamples:
    """Images [B, C, H, W] from the same initial noise, with and without the key."""

    watermarked: torch.Tensor
    clean: torch.Tensor | None
    state: torch.Tensor  # the clean state at the injection sigma [B, C, H, W]
    delta: torch.Tensor  # watermarked state - clean state at the injection sigma


def _solver(name: str):
    from diffcore.sampler import SOLVERS

    if name not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


def embed(
    denoiser,
    x_T: torch.Tensor,
    sigmas,
    key: RingKey,
    sigma: float,
    *,
    solver: str = "ddim",
    with_clean: bool = True,
    **solver_options,
) -> WatermarkedSamples:
    """Sample from ``x_T`` [B, C, H, W] (the state at sigmas[0]) down to ``sigma``, write the key
    (:func:`inject`), and continue to 0; with ``with_clean`` also continue the unmarked state (the
    same trajectory down to ``sigma``). ``sigma = sigmas[0]`` is Tree-Ring (the key in x_T).
    Deterministic solvers only (no churn, eta = 0)."""
    run = _solver(solver)
    _check_images("x_T", x_T, key)
    upper, lower = split_sigmas(sigmas, sigma)
    with torch.no_grad():
        state = x_T if upper is None else run(denoiser, x_T, upper, require_zero_end=False, **solver_options)
        marked = inject(state, key, sigma)
        watermarked = run(denoiser, marked, lower, **solver_options)
        clean = run(denoiser, state, lower, **solver_options) if with_clean else None
    return WatermarkedSamples(watermarked, clean, state, marked - state)


def invert_to(
    denoiser, images: torch.Tensor, sigmas, sigma: float, *, solver: str = "ddim", **solver_options
) -> torch.Tensor:
    """ODE-invert ``images`` [B, ...] up the part of the descending sampling grid ``sigmas`` below
    ``sigma``: the images are taken as the state at the smallest positive grid value (DDIM
    inversion's approximation) and integrated up to ``sigma`` (``diffcore.sampler.invert``)."""
    from diffcore.sampler import invert

    _, lower = split_sigmas(sigmas, sigma)
    grid = lower[:-1].flip(0)  # ascending, without the 0
    if grid.numel() < 2:
        raise ValueError(f"sigma: {sigma:g} leaves no step to invert on this grid")
    with torch.no_grad():
        return invert(denoiser, images, grid, solver=solver, **solver_options)


def detect(
    denoiser,
    images: torch.Tensor,
    sigmas,
    key: RingKey,
    sigma: float,
    *,
    solver: str = "ddim",
    p_value: bool = False,
    key_rank: int = 0,
    return_state: bool = False,
    **solver_options,
) -> dict:
    """Invert ``images`` to ``sigma`` and score them against ``key``: ``{"distance": [B]}``, with
    ``"p_value"`` (Tree-Ring's) when asked and ``"key_rank"`` (:func:`key_rank_p_value` with
    ``key_rank`` references) when ``key_rank > 0``; lower means watermarked. ``return_state`` adds
    the inverted state ``"state"`` [B, ...] (to score other keys without inverting again)."""
    _check_images("images", images, key)
    state = invert_to(denoiser, images, sigmas, sigma, solver=solver, **solver_options)
    out = {"distance": key_distance(state, key, sigma)}
    if p_value:
        out["p_value"] = key_p_value(state, key, sigma)
    if key_rank:
        out["key_rank"] = key_rank_p_value(state, key, sigma, references=key_rank)
    if return_state:
        out["state"] = state
    return out


# ----------------------------------------------------------------------------- the null-space measure


@dataclass
class NullSpaceFraction:
    """Where a perturbation ``delta`` lies relative to the denoiser's Jacobian at ``x``.

    Attributes:
        fraction: [B] ``1 - |P_r delta|^2 / |delta|^2``, P_r the projector on the top-r right
            singular vectors (r = numerical rank): the share of delta's energy in the null space.
        rank: [B] numerical rank r (energy criterion; ``k + 1`` means "more than k", then r = k is used).
        response: [B] ``|J delta| / (|J|_F |delta| / sqrt(d))``: delta's gain relative to an isotropic
            direction's (1 for a random direction, 0 in the exact null space).
        singular_values: [B, k].
    """

    fraction: torch.Tensor
    rank: torch.Tensor
    response: torch.Tensor
    singular_values: torch.Tensor


def null_space_fraction(
    denoiser,
    x: torch.Tensor,
    sigma: float,
    delta: torch.Tensor,
    *,
    k: int = 32,
    ratio: float = 0.99,
    seed: int = 0,
    probes: int = 16,
    **subspace_options,
) -> NullSpaceFraction:
    """The fraction of ``delta`` [B, ...]'s energy in the null space of ``J = dD/dx`` at ``x`` [B, ...]
    (the Shallow Diffuse argument, docs/papers.md section 6): top-``k`` right singular vectors by
    ``diffcore.analysis.jacobian_subspace`` (randomized SVD by default), ``|J|_F^2`` = the top-k
    energy plus a Hutchinson estimate of the rest (``frobenius_norm_sq``), numerical rank by the
    energy criterion at ``ratio``."""
    from diffcore.analysis.jacobian import JacobianOperator, jacobian_subspace
    from diffcore.analysis.rank import frobenius_norm_sq, numerical_rank

    check_tensor("delta", delta)
    if delta.shape != x.shape:
        raise ValueError(f"delta: expected shape {tuple(x.shape)} (like x), got {tuple(delta.shape)}")
    options = {"method": "randomized", **subspace_options}
    sub = jacobian_subspace(denoiser, x, sigma, k, seed=seed, **options)
    s = sub.singular_values.double()
    rest = frobenius_norm_sq(denoiser, x, sigma, basis=sub.V, probes=probes, seed=seed + 1)
    total = s.square().sum(dim=1) + rest.double()
    rank = numerical_rank(s, ratio, criterion="energy", frobenius_sq=total)
    used = rank.clamp_max(k)
    v = sub.V.reshape(x.shape[0], k, -1).double()
    d = delta.reshape(x.shape[0], -1).double()
    coeff = torch.einsum("bkd,bd->bk", v, d).square()
    keep = torch.arange(k)[None, :] < used[:, None]
    energy = d.square().sum(dim=1).clamp_min(1e-300)
    fraction = 1.0 - (coeff * keep).sum(dim=1) / energy
    op = JacobianOperator(denoiser, x, sigma)
    jd = op.matvec(d.to(op.dtype)[:, :, None])[:, :, 0].double()
    response = jd.norm(dim=1) / (total.sqrt() * energy.sqrt() / math.sqrt(d.shape[1])).clamp_min(1e-300)
    return NullSpaceFraction(fraction, rank, response, s)


__all__ = [
    "BANDS",
    "NullSpaceFraction",
    "REFERENCE_SEED",
    "RingKey",
    "WatermarkedSamples",
    "check_time",
    "detect",
    "embed",
    "inject",
    "invert_to",
    "key_distance",
    "key_p_value",
    "key_rank_p_value",
    "masked_coefficients",
    "max_radius",
    "null_space_fraction",
    "reference_keys",
    "ring_key",
    "seeded_normals",
    "sigma_at_time",
    "spectrum",
    "split_sigmas",
    "vp_scale",
]
