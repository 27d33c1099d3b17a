"""Adapters that turn other model families into the denoiser contract ``D(x, sigma) -> x0_hat``.

VE/EDM convention: ``x = x0 + sigma * n``. VP (DDPM) models see ``x_vp = sqrt(abar) x0 +
sqrt(1 - abar) eps``; the two are related by ``x_ve = x_vp / sqrt(abar)`` and
``sigma = sqrt((1 - abar)/abar)``, i.e. ``abar = 1/(1 + sigma^2)``. Prediction types are named as
in diffusers: ``epsilon`` (eps), ``sample`` (x0), ``v_prediction``
(``v = sqrt(abar) eps - sqrt(1 - abar) x0``, so ``x0 = sqrt(abar) x_vp - sqrt(1 - abar) v``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffcore.sampler.schedules import sigmas_from_alphas_cumprod

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _per_row(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (scalar or [B]) as a tensor [B, 1, ..., 1] broadcastable against x, in x's dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(x.shape[0])
    if s.numel() != x.shape[0]:
        raise ValueError(f"sigma: expected a scalar or shape [{x.shape[0]}], got {s.numel()} values")
    return s.reshape(-1, *([1] * (x.dim() - 1)))


def _check_prediction_type(prediction_type: str, allowed=PREDICTION_TYPES) -> str:
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type: expected one of {', '.join(allowed)}, got {prediction_type!r}")
    return prediction_type


class VEDenoiser:
    """A model in VE parameterization, ``model(x, sigma [B])``, predicting eps or x0.

    ``epsilon``: ``D = x - sigma * eps``; ``sample``: ``D = model(x, sigma)``.
    """

    def __init__(self, model: Callable, prediction_type: str = "epsilon"):
        self.model = model
        self.prediction_type = _check_prediction_type(prediction_type, ("epsilon", "sample"))

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = _per_row(sigma, x)
        out = self.model(x, s.reshape(-1))
        return x - s * out if self.prediction_type == "epsilon" else out


class VPDenoiser:
    """A discrete-time VP model ``model(x_vp, t [B])`` trained on ``alphas_cumprod`` [T].

    ``D(x_ve, sigma)``: ``abar = 1/(1 + sigma^2)``, ``x_vp = sqrt(abar) x_ve``; the model's
    timestep is found by linear interpolation of t in log-sigma over the training sigmas
    (``timestep="interpolate"``, fractional t; ``"round"`` rounds to the nearest integer), clamped
    to [0, T-1]; the output is converted by ``prediction_type``. No host synchronization.

    Args:
        model: callable ``(x_vp [B, ...], t [B] float) -> prediction [B, ...]``.
        alphas_cumprod: [T] (e.g. ``scheduler.alphas_cumprod``).
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        model_dtype: dtype fed to the model (default: x's dtype).
    """

    def __init__(
        self,
        model: Callable,
        alphas_cumprod,
        prediction_type: str = "epsilon",
        *,
        timestep: str = "interpolate",
        model_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.prediction_type = _check_prediction_type(prediction_type)
        if timestep not in ("interpolate", "round"):
            raise ValueError(f"timestep: expected 'interpolate' or 'round', got {timestep!r}")
        self.timestep_mode = timestep
        self.model_dtype = model_dtype
        self.train_sigmas = sigmas_from_alphas_cumprod(torch.as_tensor(alphas_cumprod).detach().cpu())
        if not bool((self.train_sigmas[1:] > self.train_sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod: expected strictly decreasing values (sigma increasing with t)")
        self._log_sigmas: dict[torch.device, torch.Tensor] = {}

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep [B] (float64) of noise levels ``sigma`` [B]: interpolation in log sigma."""
        device = sigma.device
        log_sigmas = self._log_sigmas.get(device)
        if log_sigmas is None:
            log_sigmas = self._log_sigmas[device] = self.train_sigmas.log().to(device)
        log_s = sigma.to(torch.float64).clamp_min(1e-300).log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_s).clamp(1, log_sigmas.numel() - 1)
        low = high - 1
        frac = (log_s - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        t = low.to(torch.float64) + frac
        if self.timestep_mode == "round":
            t = t.round()
        return t

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = _per_row(sigma, x)
        alpha = torch.rsqrt(1.0 + s * s)  # sqrt(abar)
        beta = s * alpha  # sqrt(1 - abar)
        x_vp = x * alpha
        dtype = self.model_dtype or x.dtype
        t = self.timestep(s.reshape(-1))
        # float32 timesteps for float32/16 models (what UNets expect), float64 for float64 models
        out = self.model(x_vp.to(dtype), t if dtype == torch.float64 else t.float()).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out  # x_ve = x0 + sigma eps
        if self.prediction_type == "sample":
            return out
        return alpha * x_vp - beta * out  # x0 = sqrt(abar) x_vp - sqrt(1 - abar) v


class DiffusersUNetDenoiser(VPDenoiser):
    """A diffusers ``UNet2DModel`` (or any module called as ``unet(sample, timestep).sample``) with
    its scheduler's ``alphas_cumprod`` and ``prediction_type``. diffusers itself is not imported:
    pass ``scheduler`` (any object with ``alphas_cumprod`` and ``config.prediction_type``) or
    ``alphas_cumprod`` and ``prediction_type``.
    """

    def __init__(
        self,
        unet,
        scheduler=None,
        *,
        alphas_cumprod=None,
        prediction_type: str | None = None,
        timestep: str = "interpolate",
    ):
        if scheduler is not None:
            alphas_cumprod = scheduler.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
            prediction_type = prediction_type or getattr(scheduler.config, "prediction_type", "epsilon")
        if alphas_cumprod is None:
            raise ValueError("alphas_cumprod: required (or pass the scheduler the UNet was trained with)")
        self.unet = unet
        dtype = getattr(unet, "dtype", None)
        super().__init__(
            self._call_unet,
            alphas_cumprod,
            prediction_type or "epsilon",
            timestep=timestep,
            model_dtype=dtype if isinstance(dtype, torch.dtype) else None,
        )

    def _call_unet(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.unet(x_vp, t)
        return out.sample if hasattr(out, "sample") else out[0]


@dataclass(frozen=True)
class DiffusersFolder:
    """A local diffusers folder loaded by :func:`load_diffusers_folder`.

    Attributes: ``denoiser`` (``D(x [B, C, H, W], sigma) -> x0_hat``, a :class:`DiffusersUNetDenoiser`),
    ``alphas_cumprod`` [T] float64, ``shape`` (C, H, W) of one image, ``timestep_spacing`` (the
    scheduler's, e.g. ``leading``; for ``diffcore.sampler.vp_sigmas``), ``unet`` and ``scheduler``."""

    denoiser: DiffusersUNetDenoiser
    alphas_cumprod: torch.Tensor
    shape: tuple[int, int, int]
    timestep_spacing: str
    unet: object
    scheduler: object


def load_diffusers_folder(folder, device="cpu", *, argument: str = "folder") -> DiffusersFolder:
    """A local diffusers folder as a denoiser, offline: the one loader of the studies.

    The folder holds a pixel-space ``UNet2DModel`` (``config.json`` and weights at the root, or in
    ``unet/``) and its scheduler config (``scheduler_config.json`` at the root, or in
    ``scheduler/``). Weights are read by diffusers (safetensors, or ``.bin`` through
    ``torch.load(weights_only=True)``); nothing in the folder runs code. Only the scheduler's betas,
    prediction type and timestep spacing are read (through ``DDIMScheduler``, whatever class the
    config names). So that forward-mode JVPs pass through (the Jacobian analyses), attention runs
    diffusers' plain-math processor (torch's fused CPU attention has no forward AD in torch 2.13)
    and GroupNorm inputs are made contiguous (its forward AD refuses strided inputs); one
    processor for every call also keeps results independent of which units ran in a process.
    ``argument`` names the setting in error messages (``model_dir``, ``diffusers_dir``).
    """
    from pathlib import Path

    from diffusers import DDIMScheduler, UNet2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{argument}: {root} is not a folder")
    unet_sub = "unet" if (root / "unet" / "config.json").is_file() else None
    sched_sub = "scheduler" if (root / "scheduler" / "scheduler_config.json").is_file() else None
    if not (root / (unet_sub or "") / "config.json").is_file():
        raise FileNotFoundError(f"{argument}: no UNet config.json in {root} or {root / 'unet'}")
    if not (root / (sched_sub or "") / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{argument}: no scheduler_config.json in {root} or {root / 'scheduler'}")
    unet = UNet2DModel.from_pretrained(str(root), subfolder=unet_sub, local_files_only=True)
    unet = unet.to(device).eval().requires_grad_(False)
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(), *args[1:]))
    scheduler = DDIMScheduler.from_pretrained(str(root), subfolder=sched_sub, local_files_only=True)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return DiffusersFolder(
        DiffusersUNetDenoiser(unet, scheduler),
        torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64),
        (int(unet.config.in_channels), int(h), int(w)),
        str(getattr(scheduler.config, "timestep_spacing", "leading")),
        unet,
        scheduler,
    )
