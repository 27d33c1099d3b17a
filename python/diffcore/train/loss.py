"""Denoising losses for a preconditioned denoiser ``D(x, sigma, class_labels=None) -> x0_hat``.

Each loss draws per-sample noise levels with ``sample_sigma(batch, generator, device)`` and
computes per-sample losses ``[B]`` with ``loss(net, x0, sigma, noise, class_labels)``; the trainer
draws ``sigma`` and ``noise`` for the whole global batch from one generator, so a run's noise
does not depend on how the batch is split across ranks.
"""

from __future__ import annotations

import math

import torch

from diffcore.ops._torch_compat import vmap_batched

TARGETS = ("clean", "empirical")


class EDMLoss:
    """EDM training loss (Karras et al. 2022, Eq. 8 with Table 1's "Ours" column):
    ``ln sigma ~ N(P_mean, P_std^2)``, ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``,
    ``loss = lambda(sigma) |D(x0 + sigma n; sigma) - target|^2`` (mean over pixels).

    ``target="clean"`` (default): the target is the clean image ``x0`` (denoising score matching).
    ``target="empirical"``: at ``sigma >= target_sigma_min`` the target is the posterior mean of the
    clean image over the whole training set (Xu et al. 2023, "Stable Target Field", Eq. 5, with the
    training set as the reference batch): ``E(x, sigma) = sum_j softmax_j(-|x - y_j|^2 / (2 sigma^2))
    y_j``, the empirical denoiser, which is the minimizer of the clean-target loss; the optimum does
    not move, only the target's variance around it drops. The trainer supplies the training set with
    :meth:`set_reference`; below ``target_sigma_min`` the target stays ``x0``.

    ``log_uniform_fraction`` (default 0: EDM's proposal alone): that share of the noise levels is
    drawn log-uniform over ``log_uniform_range`` (``[sigma_lo, sigma_hi]``) instead, a proposal
    that covers the whole range a sampler or a probe visits (EDM's lognormal puts about 1% of its
    draws above sigma 5, none near 80). The weight ``lambda(sigma)`` is unchanged, so the
    minimizer at every sigma is still the posterior mean; only how often each sigma is trained moves.
    """

    target, target_sigma_min, reference = "clean", 0.0, None  # subclasses with their own __init__: clean target
    log_uniform_fraction, log_uniform_range = 0.0, (0.002, 80.0)

    def __init__(
        self,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
        target: str = "clean",
        target_sigma_min: float = 0.0,
        log_uniform_fraction: float = 0.0,
        log_uniform_range=(0.002, 80.0),
        stage_boundaries=(),
    ):
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.log_uniform_fraction, self.log_uniform_range = _check_log_uniform(log_uniform_fraction, log_uniform_range)
        self.stage_boundaries = _check_stage_boundaries(stage_boundaries)
        if self.stage_boundaries and self.log_uniform_fraction > 0:
            raise ValueError(
                "stage_boundaries: one stage per batch is drawn from the lognormal alone; set log_uniform_fraction=0"
            )
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
        if (
            isinstance(target_sigma_min, bool)
            or not isinstance(target_sigma_min, (int, float))
            or not math.isfinite(target_sigma_min)
            or target_sigma_min < 0
        ):
            raise ValueError(f"target_sigma_min: expected a finite number >= 0, got {target_sigma_min!r}")
        if target == "clean" and target_sigma_min:
            raise ValueError(
                "target_sigma_min: only target='empirical' uses it (the threshold above which the "
                f"empirical target replaces x0), got {target_sigma_min} with target='clean'"
            )
        self.target, self.target_sigma_min = target, float(target_sigma_min)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss needs the training set (:meth:`set_reference`) before its first call."""
        return self.target == "empirical"

    def set_reference(self, images: torch.Tensor) -> None:
        """The training set ``[N, ...]`` (float32, the images ``x0`` is drawn from) of the empirical target."""
        if not isinstance(images, torch.Tensor) or images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(
                f"images: expected a non-empty training set [N, ...], got "
                f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
            )
        self.reference = images.detach().to(torch.float32)

    def stage_probabilities(self) -> list[float]:
        """``p_k``: the lognormal's mass in each stage of ``stage_boundaries`` (``[1.0]`` without)."""
        cdf = [0.0] + [_normal_cdf((math.log(b) - self.P_mean) / self.P_std) for b in self.stage_boundaries] + [1.0]
        return [hi - lo for lo, hi in zip(cdf, cdf[1:])]

    def sample_sigma(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """``[B]`` noise levels, ``ln sigma ~ N(P_mean, P_std^2)`` (float32), a
        ``log_uniform_fraction`` share of them log-uniform over ``log_uniform_range`` instead (drawn
        from the same generator after the normals, so the fraction 0 draws exactly EDM's levels).
        With ``stage_boundaries``: one stage for the batch, its sigmas from the truncated lognormal."""
        if self.stage_boundaries:
            return self._sample_one_stage(batch, generator, device)
        normal = torch.randn(batch, generator=generator, device=device)
        sigma = (normal * self.P_std + self.P_mean).exp()
        if self.log_uniform_fraction > 0:
            lo, hi = (math.log(v) for v in self.log_uniform_range)
            pick = torch.rand(batch, generator=generator, device=device) < self.log_uniform_fraction
            uniform = (lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)).exp()
            sigma = torch.where(pick, uniform, sigma)
        return sigma

    def _sample_one_stage(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """Stage k with probability p_k (one uniform), then ``[B]`` sigmas by the inverse CDF of the
        lognormal restricted to stage k: ``z = Phi^-1(Phi(a_k) + u (Phi(b_k) - Phi(a_k)))``."""
        probabilities = self.stage_probabilities()
        pick = float(torch.rand(1, generator=generator, device=device))
        stage = min(sum(pick >= c for c in _cumulative(probabilities)[:-1]), len(probabilities) - 1)
        low = sum(probabilities[:stage])
        u = torch.rand(batch, generator=generator, device=device).double()
        cdf = (low + u * probabilities[stage]).clamp(1e-300, 1 - 1e-16)
        sigma = (torch.special.ndtri(cdf) * self.P_std + self.P_mean).exp()
        edges = (0.0,) + self.stage_boundaries + (math.inf,)
        return sigma.clamp(edges[stage], edges[stage + 1]).float()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def training_target(self, x0: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` float32 regression target: ``x0``, or ``E(noisy, sigma)`` where ``sigma >=
        target_sigma_min`` (``target="empirical"``)."""
        x0 = x0.float()
        if self.target == "clean":
            return x0
        self._check_reference(x0)
        high = sigma >= self.target_sigma_min
        if not bool(high.any()):
            return x0
        from diffcore.ops import empirical_denoise

        target = x0.clone()
        target[high] = empirical_denoise(noisy[high].float(), self.reference, sigma[high].float())
        return target

    def _check_reference(self, x0: torch.Tensor) -> None:
        if vmap_batched(x0):  # under vmap: an ensemble shares one loss object
            raise ValueError(
                "loss_options target='empirical' is not supported by ensembles "
                "(diffcore.train.ensemble): each member needs its own training set as the reference"
            )
        if self.reference is None:
            raise RuntimeError(
                "target='empirical': call set_reference(training_images) before the loss (diffcore.train.Trainer does)"
            )
        if self.reference.shape[1:] != x0.shape[1:] or self.reference.device != x0.device:
            raise ValueError(
                f"reference: expected images of shape [N, {', '.join(map(str, x0.shape[1:]))}] on "
                f"{x0.device} (those of x0), got {tuple(self.reference.shape)} on {self.reference.device}"
            )

    def __call__(self, net, x0, sigma, noise, class_labels=None, augment_labels=None) -> torch.Tensor:
        shape = (-1,) + (1,) * (x0.ndim - 1)
        noisy = x0 + sigma.reshape(shape) * noise
        denoised = net(noisy, sigma, class_labels, **_augment(augment_labels))
        with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):  # the target in float32
            target = self.training_target(x0, noisy, sigma)
        squared = (denoised.float() - target) ** 2
        return self.weight(sigma) * squared.flatten(1).mean(dim=1)


def _check_log_uniform(fraction, sigma_range) -> tuple[float, tuple[float, float]]:
    """The log-uniform share and range of :class:`EDMLoss`'s proposal, checked (ValueError naming the argument)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"log_uniform_fraction: expected a number in [0, 1], got {fraction!r}")
    try:
        lo, hi = (float(v) for v in sigma_range)
    except (TypeError, ValueError):
        raise ValueError(f"log_uniform_range: expected (sigma_lo, sigma_hi), got {sigma_range!r}") from None
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"log_uniform_range: expected 0 < sigma_lo < sigma_hi < inf, got {sigma_range!r}")
    return float(fraction), (lo, hi)


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _cumulative(probabilities: list[float]) -> list[float]:
    out, total = [], 0.0
    for p in probabilities:
        total += p
        out.append(total)
    return out


def _check_stage_boundaries(boundaries) -> tuple[float, ...]:
    """``()`` or strictly increasing finite sigmas > 0 (ValueError naming ``stage_boundaries``)."""
    try:
        values = tuple(float(b) for b in boundaries)
    except (TypeError, ValueError):
        raise ValueError(f"stage_boundaries: expected a sequence of sigmas, got {boundaries!r}") from None
    if any(not (math.isfinite(b) and b > 0) for b in values) or any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"stage_boundaries: expected strictly increasing finite sigmas > 0, got {list(values)}")
    return values


class VPLoss(EDMLoss):
    """EDM's loss for VP preconditioning (Karras et al. 2022, Table 1, "VP" column; Song et al.
    2021's DDPM++ setting): ``t ~ U(epsilon_t, 1)``, ``sigma(t) = sqrt(exp(beta_d t^2 / 2 +
    beta_min t) - 1)``, ``lambda(sigma) = 1 / sigma^2``."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = float(beta_d), float(beta_min), float(epsilon_t)

    def sample_sigma(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        t = 1 + torch.rand(batch, generator=generator, device=device) * (self.epsilon_t - 1)
        return (torch.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1).sqrt()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


def _augment(augment_labels) -> dict:
    """``augment_labels`` as a keyword for models that take them (only when augmenting)."""
    return {} if augment_labels is None else {"augment_labels": augment_labels}


class DDPMLoss:
    """DDPM epsilon loss (Ho et al. 2020, Eq. 14, "L_simple") for a VE-form denoiser.

    ``t ~ U{0..T-1}`` with the linear beta schedule; the VP sample ``sqrt(ab) x0 + sqrt(1-ab) n``
    scaled by ``1/sqrt(ab)`` is the VE sample ``x0 + sigma n`` with ``sigma = sqrt((1-ab)/ab)``
    (what EDM's VP preconditioning does). The predicted noise is ``(x - D(x; sigma)) / sigma`` and
    the loss is ``|n_hat - n|^2`` (mean over pixels), i.e. ``|D - x0|^2 / sigma^2``.
    """

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000):
        betas = torch.linspace(float(beta_start), float(beta_end), int(num_timesteps), dtype=torch.float64)
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1.0 - alpha_bar) / alpha_bar).sqrt().float()  # [T], increasing
        self.num_timesteps = int(num_timesteps)

    def sample_sigma(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)
        return self.sigmas.to(device)[t]

    def __call__(self, net, x0, sigma, noise, class_labels=None, augment_labels=None) -> torch.Tensor:
        shape = (-1,) + (1,) * (x0.ndim - 1)
        x = x0 + sigma.reshape(shape) * noise
        denoised = net(x, sigma, class_labels, **_augment(augment_labels)).float()
        predicted_noise = (x.float() - denoised) / sigma.reshape(shape)
        return ((predicted_noise - noise.float()) ** 2).flatten(1).mean(dim=1)


def build_loss(name: str, options=None):
    """``EDMLoss``, ``VPLoss`` or ``DDPMLoss`` by name (edm, vp, ddpm), with keyword ``options``."""
    losses = {"edm": EDMLoss, "vp": VPLoss, "ddpm": DDPMLoss}
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(losses)}")
    return losses[name](**dict(options or {}))


def lr_at(images_seen_after_step: int, lr: float, warmup_images: int, decay_images: int = 0) -> float:
    """Learning rate with a linear warm-up over ``warmup_images`` (EDM training loop style), then
    constant (``decay_images = 0``) or a cosine decay ``lr (1 + cos(pi t)) / 2`` with
    ``t = (images - warmup) / (decay_images - warmup)`` clamped to [0, 1]."""
    images = images_seen_after_step
    if warmup_images > 0 and images < warmup_images:
        return lr * images / warmup_images
    if decay_images <= 0:
        return lr
    t = min(max((images - warmup_images) / (decay_images - warmup_images), 0.0), 1.0)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def ema_beta(batch_images: int, images_seen: int, halflife_images: float, rampup_ratio: float | None) -> float:
    """Per-step EMA decay for a half-life in images (EDM: ``ema_halflife_kimg`` capped by
    ``ema_rampup_ratio * cur_nimg``): ``beta = 0.5 ** (batch / halflife)``."""
    halflife = float(halflife_images)
    if rampup_ratio is not None:
        halflife = min(halflife, images_seen * float(rampup_ratio))
    return math.pow(0.5, batch_images / max(halflife, 1e-8))
