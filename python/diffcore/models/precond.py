"""Preconditioning: wrap a network F into a denoiser ``D(x, sigma) -> x0_hat`` (the diffcore contract).

EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), Eq. 7:

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

with the coefficients of EDM Table 1 ("Network and preconditioning" rows) for each formulation:

    ============  ===================  =======================  ======================  ==========================
    formulation   c_skip               c_out                    c_in                    c_noise
    ============  ===================  =======================  ======================  ==========================
    VP            1                    -sigma                   1/sqrt(sigma^2+1)       (M-1) * t(sigma)
    VE            1                    sigma                    1                       ln(sigma / 2)
    EDM           sd^2/(sigma^2+sd^2)  sigma sd/sqrt(s^2+sd^2)  1/sqrt(sigma^2+sd^2)    ln(sigma) / 4
    ============  ===================  =======================  ======================  ==========================

(sd = sigma_data = 0.5.) All wrappers take ``x`` of shape [B, C, H, W] in the VE convention
``x = x0 + sigma * n`` and ``sigma`` as a Python float, a 0-d tensor, or a tensor of shape [B]
(also accepted: [B, 1, 1, 1]). sigma must be > 0; it is not checked value by value, so that the
wrappers stay free of host syncs and data-dependent control flow under ``torch.func`` transforms.
sigma stays differentiable: JVPs and gradients with respect to sigma work too.

The arithmetic runs in x's dtype; the network runs in its parameters' dtype (a float64 sampler
can drive a float32 network); D comes back in x's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffcore.models.layers import check_image_batch


class Precond(nn.Module):
    """Base class: ``forward(x, sigma, class_labels=None)`` from :meth:`coefficients`."""

    sigma_min: float
    sigma_max: float

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.img_resolution = getattr(model, "img_resolution", None)
        self.img_channels = getattr(model, "in_channels", None)
        self.label_dim = getattr(model, "label_dim", 0)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for a sigma tensor of any shape (same shape out)."""
        raise NotImplementedError

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) of the training loss ``lambda(sigma) |D(x0 + sigma n; sigma) - x0|^2``."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        sigma,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, C, H, W]; sigma: float, 0-d or [B]; class_labels: see ``UNet.forward``.
        Returns x0_hat: [B, C, H, W] in x's dtype (EDM Eq. 7)."""
        check_image_batch(x)
        sigma_col = sigma_column(sigma, x)  # [B, 1, 1, 1] in x's dtype
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma_col)
        model_dtype = _parameter_dtype(self.model, x.dtype)
        net_in = (c_in * x).to(model_dtype)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        f_x = self.model(net_in, c_noise.reshape(-1).to(model_dtype), class_labels=class_labels, **extra)
        return c_skip * x + c_out * f_x.to(x.dtype)

    def round_sigma(self, sigma):
        """Samplers may call this; continuous-sigma formulations return sigma unchanged."""
        return torch.as_tensor(sigma)


class EDMPrecond(Precond):
    """EDM preconditioning (EDM Table 1, "ours"; Eq. 7), ``sigma_data = 0.5`` by default."""

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        super().__init__(model)
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.p_mean = p_mean
        self.p_std = p_std

    def coefficients(self, sigma):
        return edm_coefficients(sigma, self.sigma_data)

    def loss_weight(self, sigma):
        """EDM Table 1: lambda = (sigma^2 + sd^2) / (sigma sd)^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def training_sigma(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """EDM Table 1 training noise: ln(sigma) ~ N(p_mean, p_std^2); shape [n], float32."""
        z = torch.randn(n, generator=generator, device=device)
        return (z * self.p_std + self.p_mean).exp()


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM's ``(c_skip, c_out, c_in, c_noise)`` (Table 1, "ours"; Eq. 7) for a sigma tensor of any
    shape (same shape out); shared by :class:`EDMPrecond` and the vector models."""
    sd2 = sigma_data**2
    total = sigma**2 + sd2
    c_skip = sd2 / total  # sd^2 / (sigma^2 + sd^2)
    c_out = sigma * sigma_data / total.sqrt()  # sigma sd / sqrt(sigma^2 + sd^2)
    c_in = 1.0 / total.sqrt()  # 1 / sqrt(sigma^2 + sd^2)
    c_noise = sigma.log() / 4  # ln(sigma) / 4
    return c_skip, c_out, c_in, c_noise


class VPPrecond(Precond):
    """Variance-preserving preconditioning (EDM Table 1, "VP"; Song et al. 2021 DDPM++ setting).

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1, VP schedule) and its inverse
    t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d.
    """

    def __init__(
        self, model: nn.Module, *, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5
    ):
        super().__init__(model)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = self._sigma_of_t_float(epsilon_t)
        self.sigma_max = self._sigma_of_t_float(1.0)

    def _sigma_of_t_float(self, t: float) -> float:
        return math.sqrt(math.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)  # 1
        c_out = -sigma  # -sigma
        c_in = 1.0 / (sigma**2 + 1).sqrt()  # 1 / sqrt(sigma^2 + 1)
        c_noise = (self.M - 1) * self.t_of_sigma(sigma)  # (M - 1) t(sigma)
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma):
        """EDM Table 1: lambda = 1 / sigma^2."""
        return 1.0 / sigma**2

    def training_sigma(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """EDM Table 1: t ~ U(epsilon_t, 1), sigma = sigma(t); shape [n], float32."""
        u = torch.rand(n, generator=generator, device=device)
        return self.sigma_of_t(1 + u * (self.epsilon_t - 1))


class VEPrecond(Precond):
    """Variance-exploding preconditioning (EDM Table 1, "VE"; Song et al. 2021 NCSN++ setting)."""

    def __init__(self, model: nn.Module, *, sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(model)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)  # 1
        c_out = sigma  # sigma
        c_in = torch.ones_like(sigma)  # 1
        c_noise = (0.5 * sigma).log()  # ln(sigma / 2)
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma):
        """EDM Table 1: lambda = 1 / sigma^2."""
        return 1.0 / sigma**2

    def training_sigma(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """EDM Table 1: ln(sigma) ~ U(ln sigma_min, ln sigma_max); shape [n], float32."""
        u = torch.rand(n, generator=generator, device=device)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + u * (hi - lo)).exp()


def sigma_column(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (float, 0-d, [B] or [B, 1, 1, 1]) as a [B, 1, 1, 1] tensor in x's dtype and device."""
    batch = x.shape[0]
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        return torch.full((batch, 1, 1, 1), float(sigma), dtype=x.dtype, device=x.device)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"sigma: expected a float or a tensor of shape [{batch}], got {type(sigma).__name__}")
    if not sigma.is_floating_point():
        sigma = sigma.to(x.dtype)
    if sigma.dim() == 0:
        return sigma.to(device=x.device, dtype=x.dtype).expand(batch).reshape(batch, 1, 1, 1)
    if sigma.shape[0] != batch or any(s != 1 for s in sigma.shape[1:]) or sigma.dim() > x.dim():
        raise ValueError(f"sigma: expected a scalar or shape [{batch}], got shape {tuple(sigma.shape)}")
    return sigma.to(device=x.device, dtype=x.dtype).reshape(batch, 1, 1, 1)


def _parameter_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return default
