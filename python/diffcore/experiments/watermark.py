"""Shallow Diffuse watermarks against the Tree-Ring x_T baseline (docs/papers.md section 6).

One model, one key, one set of seeds, one set of attacks, two places to write the key:

- ``shallow``: sample deterministically to the shallow time ``time`` (0.3 T), overwrite the key's
  disc in the spectrum of one channel (``diffcore.analysis.watermark``), continue to the image;
- ``xT``: the same key written into the initial noise x_T (Tree-Ring style).

Each watermarked image has an unwatermarked twin from the same noise (consistency: PSNR, SSIM).
Detection inverts the (attacked) image back to the time of injection with the same solver and grid
and scores the masked Fourier coefficients against the key (mean L1 distance; Tree-Ring's p-value
too); ROC-AUC and TPR at 1 % FPR compare watermarked images with unwatermarked ones from other
seeds (``diffcore.metrics.watermark``). At the injection state, the fraction of the key's energy
in the null space of the denoiser's Jacobian (``null_space_fraction``) is measured: the paper's
explanation of Shallow Diffuse's consistency.

Models (``model``):

- ``molrg`` (quick): a mixture of low-rank Gaussians on random subspaces
  (``diffcore.denoisers.mixture.ScaledMoLRGDenoiser``), the model of the paper's low-rank-Jacobian argument, sized
  after the digits at 32x32: ``components`` = 10 subspaces of dimension ``latent_dim`` = 20 (95 % of
  a digit class's variance), per-pixel variance ``pixel_variance`` = 0.23 (the digits'), isotropic
  ``variance_floor`` (the probability-flow map stays invertible, so the part of the key off the
  subspaces reaches the image and inversion recovers it). Its images are not digits; its subspaces
  are incoherent with the Fourier basis, as the paper assumes of the key.
- ``mixture``: one full-rank Gaussian per digit class fitted to the embedded 8x8 digits
  upsampled to ``resolution`` (Pillow bicubic), eigenvalues plus ``variance_floor``
  (``diffcore.denoisers.mixture.GaussianMixtureDenoiser``): closed-form, nonlinear through the class posterior, and
  invertible. 8x8 leaves no room for a ring key (the spectrum's radius is 3); at 32x32 the key's
  disc has radius 5 (10/64 of the side, the paper's 10 on SD's 64x64 latent). The upsampled digits
  have no variance in the key's band (only the floor), so there the flow is linear and the same for
  every class. Along a direction of data variance ``lam`` a key component of VP size 1 reaches the
  image with gain ``sqrt(lam)`` from x_T and ``sqrt(lam (1 + sigma_t^2) / (lam + sigma_t^2))`` from
  x_t: larger from x_t wherever ``lam < 1``, as in that band, so here Shallow Diffuse is not more
  consistent (docs/studies.md, measured).
- ``unet``: a small EDM DDPM++ UNet trained here (``diffcore.train``, a resumable unit) on the
  same images (``--set model=unet``; ``train_steps`` decide its quality).
- ``gaussian`` (tiny): the Gaussian denoiser of those images, eigenvalues plus ``variance_floor``;
  a linear model, where inversion is exact up to solver error (tests) and the key's effect on the
  image follows the gain law above (no class to change).
- ``diffusers``: a pixel-space ``UNet2DModel`` and its scheduler from the local folder
  ``model_dir`` (safetensors weights), e.g. a CelebA-HQ 256 DDPM; DDIM on the scheduler's
  timesteps (``vp_sigmas``).

The ``learned`` preset trains the UNet on the digits at 16x16 with the key in the low band (where
the digits' variance is: ``data_spectrum`` measures it) and sweeps the injection time
(``sweep_times``); every preset reports AUC / TPR / SSIM with bootstrap intervals (``sweep``) and
claims decided on them (``claims``).

Outputs: ``results.json``, ``detection.csv`` (method x attack), ``consistency.csv`` (per image),
``watermark-roc.png``, ``watermark-images.png``, ``watermark-consistency.png``,
``watermark-sweep.png``, ``timings.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcore.experiments import _stack, base
from diffcore.metrics.intervals import Interval
from diffcore.metrics.watermark import AttackParams

log = logging.getLogger(__name__)

NAME = "watermark"
METHODS = ("shallow", "xT")
MODELS = ("molrg", "mixture", "gaussian", "unet", "diffusers")
SCORES = ("distance", "p_value", "key_rank")


@dataclass(frozen=True)
class WatermarkConfig:
    model: str = "molrg"  # molrg | mixture | gaussian | unet | diffusers
    model_dir: str = ""  # diffusers: folder with the UNet2DModel and its scheduler
    resolution: int = 32  # digits upsampled to this side (unet, gaussian)
    width: int = 16  # unet: model_channels of ddpmpp-digits-light at `resolution`
    train_steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    lr_warmup_images: int = 2000
    train_seed: int = 0
    variance_floor: float = 1e-2  # molrg, mixture, gaussian: added to every eigenvalue
    components: int = 10  # molrg: subspaces (the digits' classes)
    latent_dim: int = 20  # molrg: their dimension (95 % of a digit class's variance at 32x32)
    pixel_variance: float = 0.23  # molrg: data variance per pixel (the digits' at 32x32, [-1, 1])
    basis_seed: int = 0  # molrg: the random subspaces
    solver: str = "ddim"  # deterministic solver of sampling and inversion
    sampler_steps: int = 50  # sampling grid: Karras (EDM models) or the scheduler's DDIM steps
    time: float = 0.3  # shallow injection time, fraction of T (DDPM timestep time * T)
    radius_fraction: float = 10 / 64  # key radius = round(fraction * side) (the paper: 10 on 64x64)
    channel: int = 0
    band: str = "high"  # high (the public code's complex2) | low (Tree-Ring's complex)
    key_seed: int = 0
    num_images: int = 32  # watermarked images (seeds sample_seed_start ..)
    num_negatives: int = 32  # unwatermarked images from the next seeds
    sample_seed_start: int = 100000
    sample_batch: int = 64  # images per sampler / inversion batch
    attacks: tuple[str, ...] = ("none", "jpeg", "blur", "noise", "brightness", "resize", "crop")
    # the attacks' parameters (defaults: diffcore.metrics.watermark.AttackParams)
    jpeg_quality: int = AttackParams.jpeg_quality
    blur_radius: float = AttackParams.blur_radius  # px at attack_reference_size, scaled with the side
    noise_std: float = AttackParams.noise_std  # on the [0, 1] scale
    brightness: float = AttackParams.brightness  # factor uniform in [max(0, 1 - b), 1 + b]
    resize_scale: float = AttackParams.resize_scale
    crop_fraction: float = AttackParams.crop_fraction
    attack_reference_size: int = AttackParams.reference_size
    attack_seed: int = AttackParams.seed
    p_value: bool = True  # Tree-Ring's chi-square p-value beside the L1 distance
    rank_references: int = 99  # key-rank p-value against this many other keys (0: off)
    wrong_keys: int = 20  # other keys scored on the unattacked images (0: off)
    nullspace_images: int = 4  # images whose Jacobian is analysed (0: skip)
    nullspace_k: int = 32  # top singular vectors computed
    grid_images: int = 6
    # the injection-time sweep: Shallow Diffuse also at these times (fractions of T; ``time`` is the
    # headline), each with its own samples, detection under every attack, consistency and null space
    sweep_times: tuple[float, ...] = ()
    null_fraction_threshold: float = 0.5  # claim: the key's null-space fraction above this
    low_rank_fraction: float = 0.5  # claim: the Jacobian's numerical rank below this share of d

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        base.check_fields(self, FIELD_CHECKS)
        if self.resolution % 2:
            raise base.ConfigError(f"resolution: expected an even integer in [8, 512], got {self.resolution!r}")
        base.check_seed_range("sample_seed_start", self.sample_seed_start, self.num_images + self.num_negatives)
        for name in ("nullspace_images", "grid_images"):
            if getattr(self, name) > self.num_images:
                raise base.ConfigError(
                    f"{name}: expected at most num_images = {self.num_images}, got {getattr(self, name)!r}"
                )
        if self.model == "molrg" and self.components * self.latent_dim > self.resolution**2:
            raise base.ConfigError(
                f"latent_dim: components * latent_dim must be at most resolution^2 = "
                f"{self.resolution**2} (orthogonal subspaces), "
                f"got {self.components} * {self.latent_dim}"
            )
        if self.model == "molrg" and not self.pixel_variance > self.variance_floor:
            raise base.ConfigError(
                f"pixel_variance: expected more than variance_floor = {self.variance_floor:g}, "
                f"got {self.pixel_variance!r}"
            )
        if self.model != "diffusers":  # the image shape is known here: check the key fits
            try:
                self.key((1, self.resolution, self.resolution))
            except ValueError as error:
                raise base.ConfigError(str(error)) from error

    def key(self, shape):
        """The ring key for images of ``shape`` (C, H, W): radius ``round(radius_fraction * side)``."""
        from diffcore.analysis import watermark as wm

        radius = max(1, round(self.radius_fraction * min(shape[1:])))
        return wm.ring_key(shape, radius=radius, channel=self.channel, band=self.band, seed=self.key_seed)

    def attack_params(self) -> AttackParams:
        return AttackParams(
            jpeg_quality=self.jpeg_quality,
            blur_radius=self.blur_radius,
            noise_std=self.noise_std,
            brightness=self.brightness,
            resize_scale=self.resize_scale,
            crop_fraction=self.crop_fraction,
            reference_size=self.attack_reference_size,
            seed=self.attack_seed,
        )

    def positive_seeds(self) -> list[int]:
        return list(range(self.sample_seed_start, self.sample_seed_start + self.num_images))

    def negative_seeds(self) -> list[int]:
        start = self.sample_seed_start + self.num_images
        return list(range(start, start + self.num_negatives))


MAX_REFERENCE_KEYS = 9_999  # key-rank p-values resolve 1e-4; each key is one more pass over the images
MAX_WRONG_KEYS = 1_000
_FRACTION = base.fraction
_NON_NEGATIVE = base.number(0)
FIELD_CHECKS: dict[str, base.Check] = {
    "model": base.one_of(*MODELS),
    "model_dir": base.text,
    "resolution": base.integer(8, 512),
    "variance_floor": _FRACTION,
    "components": base.positive,
    "pixel_variance": base.number(0, 10, lo_open=True),
    "basis_seed": base.seed,
    "sampler_steps": base.integer(2),  # the grid is split at the injection time: two or more steps
    "time": base.below(1),
    "radius_fraction": base.below(0.5),
    "channel": base.count,
    "band": base.registered("diffcore.analysis.watermark", "BANDS"),
    "key_seed": base.seed,
    "num_images": base.positive,
    "num_negatives": base.integer(2),
    "attacks": base.tuple_of(base.registered("diffcore.metrics.watermark", "ATTACKS")),
    "jpeg_quality": base.integer(1, 95),
    "blur_radius": _NON_NEGATIVE,
    "noise_std": _NON_NEGATIVE,
    "brightness": _NON_NEGATIVE,
    "resize_scale": _FRACTION,
    "crop_fraction": _FRACTION,
    "attack_reference_size": base.positive,
    "p_value": base.boolean,
    "rank_references": base.integer(0, MAX_REFERENCE_KEYS),
    "wrong_keys": base.integer(0, MAX_WRONG_KEYS),
    "nullspace_images": base.count,
    "nullspace_k": base.positive,
    "grid_images": base.count,
    "sweep_times": base.tuple_of(base.below(1), min_len=0),
    "null_fraction_threshold": _FRACTION,
    "low_rank_fraction": _FRACTION,
}


def _quick() -> WatermarkConfig:
    """Ten random 20-dimensional subspaces at 32x32 with the digits' pixel variance (``molrg``), 50
    DDIM steps, 64 + 64 images, seven attacks; the Jacobian's top 256 singular vectors (its rank at
    x_T is about components * latent_dim = 200). Time measured in docs/studies.md."""
    return WatermarkConfig(num_images=64, num_negatives=64, nullspace_k=256)


def _tiny() -> WatermarkConfig:
    """Seconds: the Gaussian denoiser of the digits at 16x16, 12 steps, 8 + 8 images (tests)."""
    return WatermarkConfig(
        model="gaussian",
        variance_floor=1e-3,
        resolution=16,
        sampler_steps=12,
        radius_fraction=0.2,
        num_images=8,
        num_negatives=8,
        attacks=("none", "jpeg", "noise"),
        nullspace_images=2,
        nullspace_k=4,
        grid_images=4,
        rank_references=19,
        wrong_keys=4,
        sweep_times=(0.6,),
    )


def _paper() -> WatermarkConfig:
    """A pixel-space diffusers DDPM (e.g. CelebA-HQ 256) from ``model_dir``, 50 DDIM steps, the
    key in channel 0 with radius 10/64 of the side, 1000 + 1000 images (a GPU run)."""
    return WatermarkConfig(
        model="diffusers",
        sampler_steps=50,
        num_images=1000,
        num_negatives=1000,
        sample_batch=16,
        nullspace_images=8,
        nullspace_k=64,
        grid_images=6,
    )


def _learned() -> WatermarkConfig:
    """The learned model: a DDPM++ UNet trained here on the digits upsampled to 16x16, the key in the
    *low* band (Tree-Ring's, radius 2: the band that holds the digits' variance; the high band holds
    none of it, measured in ``data_spectrum``), Shallow Diffuse at 0.3 T and swept over 0.1 .. 0.7 T
    against x_T; 32 + 32 images, four attacks. Fixed before any run (docs/studies.md)."""
    return WatermarkConfig(
        model="unet",
        resolution=16,
        width=16,
        train_steps=600,
        band="low",
        radius_fraction=0.125,
        sampler_steps=40,
        num_images=32,
        num_negatives=32,
        attacks=("none", "jpeg", "noise", "blur"),
        rank_references=0,
        wrong_keys=0,
        p_value=False,
        nullspace_images=8,
        nullspace_k=128,
        grid_images=6,
        sweep_times=(0.1, 0.5, 0.7),
    )


PRESETS: dict[str, Callable[[], WatermarkConfig]] = {
    "quick": _quick,
    "tiny": _tiny,
    "paper": _paper,
    "learned": _learned,
}
CONFIG_CLASS = WatermarkConfig


# ----------------------------------------------------------------------------- data and models


def digits_at(resolution: int) -> torch.Tensor:
    """The embedded digits upsampled to ``resolution`` (Pillow bicubic), uint8 [1797, 1, R, R]."""
    import numpy as np
    from PIL import Image

    from diffcore.data import load_digits

    images, _ = load_digits(as_uint8=True)
    out = [
        np.asarray(Image.fromarray(img[0].numpy()).resize((resolution, resolution), Image.BICUBIC)) for img in images
    ]
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


@dataclass
class _Model:
    denoiser: Callable
    sigmas: torch.Tensor  # descending sampling grid ending in 0 (sigma_t inserted)
    sigma_t: float
    shape: tuple
    info: dict


def injection_sigma(method: str, m: _Model) -> float:
    """Where ``method`` writes the key: sigma_t (shallow) or the grid's first value (x_T)."""
    return m.sigma_t if method == "shallow" else float(m.sigmas[0])


class _Study:
    def __init__(self, config: WatermarkConfig, out, device: str, progress: bool):
        config.validate()
        if config.model == "diffusers" and not config.model_dir:  # a local folder, needed to run (not a range)
            raise base.ConfigError(f"model_dir: expected a folder for model=diffusers, got {config.model_dir!r}")
        self.c = config
        self.ws = base.Workspace(out)
        self.device = torch.device(device)
        self.progress = progress

    # models --------------------------------------------------------------------
    def model(self) -> _Model:
        c = self.c
        if c.model == "diffusers":
            return self.diffusers_model()
        shape = (1, c.resolution, c.resolution)
        if c.model == "molrg":
            from diffcore.denoisers.mixture import ScaledMoLRGDenoiser

            denoiser = ScaledMoLRGDenoiser.random(
                c.components,
                shape,
                c.latent_dim,
                pixel_variance=c.pixel_variance,
                floor=c.variance_floor,
                seed=c.basis_seed,
            ).to(self.device)
            info = {
                "kind": "molrg",
                "components": c.components,
                "latent_dim": c.latent_dim,
                "latent_std": denoiser.scale,
                "pixel_variance": c.pixel_variance,
                "basis_seed": c.basis_seed,
            }
        else:
            images = digits_at(c.resolution)
        if c.model == "mixture":
            from diffcore.data import load_digits
            from diffcore.denoisers.mixture import GaussianMixtureDenoiser

            denoiser = GaussianMixtureDenoiser.fit(images, load_digits()[1], c.variance_floor).to(self.device)
            info = {"kind": "mixture", "components": int(denoiser.means.shape[0])}
        elif c.model == "gaussian":
            from diffcore.denoisers import GaussianDenoiser

            fit = GaussianDenoiser.fit(images)
            denoiser = GaussianDenoiser(fit.mean, fit.eigvecs, fit.eigvals + c.variance_floor, shape=shape)
            denoiser = denoiser.to(self.device)
            info = {"kind": "gaussian", "rank": int(fit.eigvals.numel())}
        elif c.model == "unet":
            denoiser, info = self.trained_unet(images)
        from diffcore import sampler

        grid = sampler.karras_sigmas(c.sampler_steps)
        return self.with_time(denoiser, grid, None, shape, info)

    def with_time(self, denoiser, grid, alphas_cumprod, shape, info, time: float | None = None) -> _Model:
        from diffcore.analysis import watermark as wm

        time = self.c.time if time is None else time
        sigma_t = wm.sigma_at_time(time, alphas_cumprod)
        upper, lower = wm.split_sigmas(grid, sigma_t)
        sigmas = lower if upper is None else torch.cat([upper, lower[1:]])
        model = _Model(
            denoiser,
            sigmas,
            sigma_t,
            shape,
            {**info, "sigma_t": sigma_t, "sigma_max": float(sigmas[0]), "grid_steps": sigmas.numel() - 1},
        )
        model.base = (grid, alphas_cumprod)  # type: ignore[attr-defined]
        return model

    def at_time(self, m: _Model, time: float) -> _Model:
        """The same model with its grid for a Shallow Diffuse injection at ``time``."""
        grid, abar = m.base  # type: ignore[attr-defined]
        info = {k: v for k, v in m.info.items() if k not in ("sigma_t", "sigma_max", "grid_steps")}
        return self.with_time(m.denoiser, grid, abar, m.shape, info, time)

    def trained_unet(self, images: torch.Tensor):
        c = self.c
        spec = {
            "resolution": c.resolution,
            "width": c.width,
            "train_steps": c.train_steps,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "lr_warmup_images": c.lr_warmup_images,
            "seed": c.train_seed,
            "model": self.unet_spec(),
        }

        def produce(tmp: Path, work: Path):
            import shutil

            from PIL import Image

            from diffcore import train

            folder = work / "images"
            if not (folder / "DONE").exists():  # the training set, written once (resumable)
                folder.mkdir(parents=True, exist_ok=True)
                for i, img in enumerate(images):
                    Image.fromarray(img[0].numpy()).save(folder / f"{i:05d}.png")
                (folder / "DONE").write_text("ok\n")
            config = _stack.training_request(
                spec,
                work / "run",
                self.device,
                self.progress,
                model=self.unet_spec(),
                data={"name": "image_folder", "root": str(folder), "resolution": c.resolution, "channels": 1},
                checkpoint_every=max(1, c.train_steps // 4),
            )
            result = train.train_from_config(config, resume="auto")
            shutil.copytree(result.checkpoint, tmp / "checkpoint")
            return {"final_loss": result.final_loss, "step": result.step}

        unit = self.ws.run_unit("models", "unet", spec, produce)
        self.ws.record(unit)
        from diffcore import train

        model = train.load_trained_model(unit.file("checkpoint"), which="ema").to(self.device).eval()
        return model, {"kind": "unet", **unit.meta}

    def unet_spec(self) -> dict:
        c = self.c
        return {
            "name": "ddpmpp",
            "preset": "ddpmpp-digits-light",
            "img_resolution": c.resolution,
            "model_channels": c.width,
            "channel_mult": [1, 2, 2],
        }

    def diffusers_model(self) -> _Model:
        from diffcore import sampler
        from diffcore.sampler.adapters import load_diffusers_folder

        c = self.c
        if not Path(c.model_dir).is_dir():
            raise base.ConfigError(f"model_dir: {c.model_dir} is not a folder")
        loaded = load_diffusers_folder(c.model_dir, self.device, argument="model_dir")
        abar = loaded.scheduler.alphas_cumprod
        grid = sampler.vp_sigmas(c.sampler_steps, abar, spacing=loaded.timestep_spacing)
        return self.with_time(
            loaded.denoiser, grid, abar, loaded.shape, {"kind": "diffusers", "model_dir": str(Path(c.model_dir))}
        )

    # units ---------------------------------------------------------------------
    def key(self, shape):
        try:
            return self.c.key(shape)
        except ValueError as error:
            raise base.ConfigError(str(error)) from error

    def model_spec(self, m: _Model) -> dict:
        c = self.c
        return {
            "model": {k: v for k, v in m.info.items() if k not in ("final_loss", "step")},
            "solver": c.solver,
            "steps": c.sampler_steps,
            "time": c.time,
            "variance_floor": c.variance_floor if c.model in ("molrg", "mixture", "gaussian") else None,
        }

    def noise(self, seeds, m: _Model) -> torch.Tensor:
        """x_T of the seeds: unit noise times sqrt(1 + sigma_max^2) (the VP prior in VE units)."""
        from diffcore.sampler import noise_from_seeds

        scale = math.sqrt(1.0 + float(m.sigmas[0]) ** 2)
        return noise_from_seeds(seeds, m.shape, device=self.device) * scale

    def batches(self, seeds):
        b = self.c.sample_batch
        return [seeds[i : i + b] for i in range(0, len(seeds), b)]

    def samples_unit(self, method: str, m: _Model, key, name: str | None = None) -> dict:
        from diffcore.analysis import watermark as wm

        c = self.c
        sigma = injection_sigma(method, m)
        spec = {
            **self.model_spec(m),
            **({} if name in (None, method) else {"time": m.info["sigma_t"]}),
            "method": method,
            "key": _key_spec(key),
            "seeds": [c.sample_seed_start, c.num_images],
        }

        def produce(tmp: Path, work: Path):
            parts = []
            for seeds in self.batches(c.positive_seeds()):
                out = wm.embed(m.denoiser, self.noise(seeds, m), m.sigmas, key, sigma, solver=c.solver)
                parts.append({k: getattr(out, k).float().cpu() for k in ("watermarked", "clean", "state", "delta")})
            torch.save({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, tmp / "samples.pt")
            return {"sigma": sigma}

        unit = self.ws.run_unit("samples", name or method, spec, produce)
        self.ws.record(unit)
        return torch.load(unit.file("samples.pt"), map_location="cpu", weights_only=True)

    def negatives_unit(self, m: _Model) -> torch.Tensor:
        from diffcore.sampler import SOLVERS

        c = self.c
        spec = {**self.model_spec(m), "seeds": [c.sample_seed_start + c.num_images, c.num_negatives]}

        def produce(tmp: Path, work: Path):
            with torch.no_grad():
                parts = [
                    SOLVERS[c.solver](m.denoiser, self.noise(s, m), m.sigmas).float().cpu()
                    for s in self.batches(c.negative_seeds())
                ]
            torch.save(torch.cat(parts), tmp / "images.pt")

        unit = self.ws.run_unit("samples", "negatives", spec, produce)
        self.ws.record(unit)
        return torch.load(unit.file("images.pt"), map_location="cpu", weights_only=True)

    def detection_unit(
        self, method: str, attack_name: str, m: _Model, key, positives, negatives, name: str | None = None
    ) -> dict:
        from diffcore.analysis import watermark as wm
        from diffcore.metrics import watermark as mw

        c = self.c
        sigma = injection_sigma(method, m)
        params = c.attack_params()
        spec = {
            **self.model_spec(m),
            "method": method,
            "attack": attack_name,
            "params": dataclasses.asdict(params),
            "key": _key_spec(key),
            "seeds": [c.sample_seed_start, c.num_images, c.num_negatives],
            "p_value": c.p_value,
        }

        wrong = wm.reference_keys(key, c.wrong_keys) if attack_name == "none" and c.wrong_keys else []
        spec["wrong_keys"] = len(wrong)

        def score(images: torch.Tensor) -> tuple[dict, list]:
            attacked = mw.attack(images, attack_name, params)
            parts = [
                wm.detect(
                    m.denoiser,
                    attacked[i : i + c.sample_batch].to(self.device),
                    m.sigmas,
                    key,
                    sigma,
                    solver=c.solver,
                    p_value=c.p_value,
                    key_rank=c.rank_references,
                    return_state=True,
                )
                for i in range(0, len(attacked), c.sample_batch)
            ]
            state = torch.cat([p.pop("state") for p in parts])
            others = [wm.key_distance(state, k, sigma).tolist() for k in wrong]
            return {k: torch.cat([p[k] for p in parts]).tolist() for k in parts[0]}, others

        def produce(tmp: Path, work: Path):
            (pos, pos_wrong), (neg, neg_wrong) = score(positives), score(negatives)
            result = {"positives": pos, "negatives": neg}
            base.atomic_write_json(tmp / "scores.json", result)
            meta = summarize_detection(result)
            if wrong:
                meta["wrong_keys"] = wrong_key_rates(pos_wrong, neg_wrong)
            return meta

        unit = self.ws.run_unit("detection", f"{name or method}-{attack_name}", spec, produce)
        self.ws.record(unit)
        return {
            "method": method,
            "variant": name or method,
            "attack": attack_name,
            **unit.meta,
            "scores": json.loads(unit.file("scores.json").read_text()),
        }

    def nullspace_unit(self, method: str, m: _Model, samples: dict, name: str | None = None) -> dict:
        from diffcore.analysis import watermark as wm

        c = self.c
        sigma = injection_sigma(method, m)
        n = c.nullspace_images
        spec = {
            **self.model_spec(m),
            "method": method,
            "images": n,
            "k": c.nullspace_k,
            "seeds": [c.sample_seed_start, c.num_images],
        }

        def produce(tmp: Path, work: Path):
            x = samples["state"][:n].to(self.device)
            delta = samples["delta"][:n].to(self.device)
            k = min(c.nullspace_k, x[0].numel())
            r = wm.null_space_fraction(m.denoiser, x, sigma, delta, k=k, seed=c.key_seed)
            return {
                "fraction": r.fraction.tolist(),
                "rank": r.rank.tolist(),
                "response": r.response.tolist(),
                "k": k,
                "singular_values": r.singular_values.tolist(),
            }

        unit = self.ws.run_unit("nullspace", name or method, spec, produce)
        self.ws.record(unit)
        return unit.meta

    # the study -----------------------------------------------------------------
    def run(self) -> dict:
        from diffcore import _env

        c = self.c
        self.ws.bind_config(c)
        m = self.model()
        key = self.key(m.shape)
        negatives = self.negatives_unit(m)
        samples, detection, consistency, nullspace = {}, [], {}, {}
        from tqdm.auto import tqdm

        variants = [(method, method, m) for method in METHODS] + [
            ("shallow", variant_name(t), self.at_time(m, t)) for t in c.sweep_times if t != c.time
        ]
        bar = tqdm(
            total=len(variants) * len(c.attacks),
            desc=NAME,
            unit="attack",
            disable=not _env.progress_enabled(self.progress),
        )
        sweep_models = {}
        for method, name, mv in variants:
            sweep_models[name] = mv
            s = samples[name] = self.samples_unit(method, mv, key, name)
            consistency[name] = self.consistency(method, mv, s)
            if c.nullspace_images:
                nullspace[name] = self.nullspace_unit(method, mv, s, name)
            for attack_name in c.attacks:
                detection.append(self.detection_unit(method, attack_name, mv, key, s["watermarked"], negatives, name))
                bar.set_postfix_str(f"{name}/{attack_name}: AUC {detection[-1]['distance']['auc']:.3f}")
                bar.update(1)
        bar.close()
        evidence = self.evidence(m, key, variants, detection, consistency, nullspace)
        results = json.loads(
            base.json_dumps(
                {
                    "experiment": NAME,
                    "config": dataclasses.asdict(c),
                    "model": m.info,
                    "key": {**_key_spec(key), "size": key.size, "energy": float(key.values.abs().square().sum())},
                    "detection": [{k: v for k, v in d.items() if k != "scores"} for d in detection],
                    "consistency": {method: consistency_summary(values) for method, values in consistency.items()},
                    "nullspace": {method: _nullspace_summary(v) for method, v in nullspace.items()},
                    **evidence,
                }
            )
        )
        self.write(results, detection, consistency, samples, m)
        return results

    def data_spectrum(self, key) -> dict | None:
        """The training images' share of variance on the key's disc (in the key's band and channel)
        against the disc's share of the spectrum (the share of a white spectrum: chance), with a
        bootstrap interval over images; None for models without images (molrg, diffusers)."""
        from diffcore.analysis import watermark as wm
        from diffcore.metrics import intervals

        c = self.c
        if c.model not in ("unet", "gaussian", "mixture"):
            return None
        x = digits_at(c.resolution).double() / 127.5 - 1.0
        centred = x[:, c.channel] - x[:, c.channel].mean(0)
        power = wm.spectrum(centred, c.band).abs().square()  # [N, H, W]
        rows = torch.stack([power[:, key.mask].sum(1), power.flatten(1).sum(1)], 1).numpy()
        share = intervals.bootstrap_sums(rows, lambda t: t[:, 0] / t[:, 1])
        chance = key.size / float(key.mask.numel())
        return {
            "variance_share_on_key": share.as_dict(),
            "chance_share": chance,
            "overlaps": intervals.claim(share.low > chance, variance_share=share, chance=chance),
        }

    def evidence(self, m: _Model, key, variants, detection, consistency, nullspace) -> dict:
        """``sweep`` (per variant: time, sigma, AUC and TPR per attack, SSIM mean and worst tail,
        null-space fraction and rank, with 95 % bootstrap intervals), ``data_spectrum`` and
        ``claims`` (decided on those intervals; docs/studies.md)."""
        from diffcore.metrics import intervals

        c = self.c
        dimension = math.prod(m.shape)
        sweep = []
        by_variant = {}
        for method, name, mv in variants:
            rows = [d for d in detection if d["variant"] == name]
            ssim = consistency[name]["ssim"]
            entry = {
                "variant": name,
                "method": method,
                "time": c.time if name == "shallow" else (1.0 if method == "xT" else float(name.split("-t")[1])),
                "sigma": injection_sigma(method, mv),
                "ssim_mean": intervals.bootstrap_interval(ssim).as_dict(),
                "ssim_p05": intervals.bootstrap_interval(ssim, lambda a: float(np.quantile(a, 0.05))).as_dict(),
                "ssim_min": float(min(ssim)),
                "psnr_mean_finite": _finite_mean_interval(consistency[name]["psnr"]),
                "detection": {
                    d["attack"]: {
                        "auc": detection_interval(d["scores"], "auc").as_dict(),
                        "tpr_at_1pct_fpr": detection_interval(d["scores"], "tpr").as_dict(),
                    }
                    for d in rows
                },
            }
            if name in nullspace:
                ns = nullspace[name]
                entry["null_space_fraction"] = intervals.bootstrap_interval(ns["fraction"]).as_dict()
                entry["rank_fraction"] = intervals.bootstrap_interval(
                    [r / dimension for r in ns["rank"]], lambda a: float(np.median(a))
                ).as_dict()
                entry["rank_capped_at_k"] = any(r > ns["k"] for r in ns["rank"])
            sweep.append(entry)
            by_variant[name] = entry
        claims = {}
        diff = intervals.bootstrap_interval(
            np.asarray(consistency["shallow"]["ssim"]) - np.asarray(consistency["xT"]["ssim"])
        )
        claims["shallow_more_consistent_than_xT"] = intervals.claim(
            diff.low > 0, ssim_difference=diff, measure="SSIM to the unmarked twin, shallow minus xT, same seeds"
        )
        worst = intervals.bootstrap_interval(
            np.stack([consistency["shallow"]["ssim"], consistency["xT"]["ssim"]], 1),
            lambda a: float(np.quantile(a[:, 0], 0.05) - np.quantile(a[:, 1], 0.05)),
        )
        claims["shallow_worst_tail_better_than_xT"] = intervals.claim(
            worst.low > 0, ssim_p05_difference=worst, measure="5th percentile of SSIM, shallow minus xT"
        )
        for attack_name in c.attacks:
            a, b = (by_variant[v]["detection"][attack_name]["auc"] for v in ("shallow", "xT"))
            claims[f"shallow_auc_not_below_xT_{attack_name}"] = intervals.claim(
                not a["high"] < b["low"], shallow_auc=a, xT_auc=b
            )
        if "null_space_fraction" in by_variant["shallow"]:
            frac = by_variant["shallow"]["null_space_fraction"]
            claims["key_mostly_in_null_space"] = intervals.claim(
                frac["low"] > c.null_fraction_threshold, null_space_fraction=frac, threshold=c.null_fraction_threshold
            )
            rank = by_variant["shallow"]["rank_fraction"]
            claims["jacobian_low_rank_at_injection"] = intervals.claim(
                rank["high"] < c.low_rank_fraction, rank_fraction=rank, threshold=c.low_rank_fraction
            )
        spectrum_overlap = self.data_spectrum(key)
        if spectrum_overlap is not None:
            claims["key_band_overlaps_data"] = spectrum_overlap.pop("overlaps")
        sweep.sort(key=lambda e: e["time"])
        return {"sweep": sweep, "data_spectrum": spectrum_overlap, "claims": claims}

    def consistency(self, method: str, m: _Model, s: dict) -> dict:
        """Per image: PSNR and SSIM against the unwatermarked twin; ``gain`` = |image change| / |key
        change of the state in VP units| (how the key propagates through the remaining steps); with a
        class-conditional model, ``class_changed`` (1.0 when the key moved the image to another
        component: the most probable one at the grid's smallest noise level differs)."""
        from diffcore.analysis import watermark as wm
        from diffcore.metrics import watermark as mw

        marked, clean = s["watermarked"], s["clean"]
        injected = s["delta"].flatten(1).double().norm(dim=1) * wm.vp_scale(injection_sigma(method, m))
        values = {
            "psnr": mw.psnr(marked, clean).tolist(),
            "ssim": mw.ssim(marked, clean).tolist(),
            "gain": ((marked - clean).flatten(1).double().norm(dim=1) / injected.clamp_min(1e-300)).tolist(),
        }
        classify = getattr(m.denoiser, "classify", None)
        if classify is not None:
            low = float(m.sigmas[-2])
            with torch.no_grad():
                marked_class, clean_class = (classify(x.to(self.device).double(), low) for x in (marked, clean))
            values["class_changed"] = (marked_class != clean_class).double().cpu().tolist()
        return values

    def write(self, results: dict, detection: list, consistency: dict, samples: dict, m: _Model) -> None:
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(
            root / "detection.csv",
            [
                {
                    "method": d["method"],
                    "variant": d["variant"],
                    "attack": d["attack"],
                    **{f"{s}_{k}": d[s][k] for s in SCORES if s in d for k in ("auc", "tpr_at_1pct_fpr")},
                }
                for d in results["detection"]
            ],
        )
        base.atomic_write_csv(
            root / "consistency.csv",
            [
                {"method": method, "image": i, "seed": self.c.sample_seed_start + i, **{k: v[k][i] for k in v}}
                for method, v in consistency.items()
                for i in range(len(v["psnr"]))
            ],
        )
        plot_roc(detection, root / "watermark-roc.png")
        plot_images(samples, self.c.grid_images, root / "watermark-images.png", m)
        plot_consistency(results, consistency, root / "watermark-consistency.png")
        plot_sweep(results, root / "watermark-sweep.png")


def _finite_mean_interval(values) -> dict | None:
    """The mean of the finite values (PSNR is infinite for an unchanged image) with a bootstrap
    interval, or None when none is finite."""
    from diffcore.metrics import intervals

    finite = [v for v in values if math.isfinite(v)]
    return intervals.bootstrap_interval(finite).as_dict() if finite else None


def variant_name(time: float) -> str:
    """The units' and results' name of Shallow Diffuse at a sweep time."""
    return f"shallow-t{time:g}"


def detection_interval(scores: dict, which: str) -> Interval:
    """ROC-AUC (``which="auc"``) or TPR at 1 % FPR (``"tpr"``) of the L1 distance score with a 95 %
    bootstrap interval: positives and negatives (independent images) are resampled as rows of
    ``[n, 2]`` pairs in seed order (equal counts), or the positives alone over the fixed negatives
    (unequal counts: the interval then omits the negatives' share of the spread)."""
    from diffcore.metrics import intervals, watermark as mw

    pos = -np.asarray(scores["positives"]["distance"], dtype=np.float64)
    neg = -np.asarray(scores["negatives"]["distance"], dtype=np.float64)

    def stat(p, n):
        return mw.roc_auc(p.tolist(), n.tolist()) if which == "auc" else mw.tpr_at_fpr(p.tolist(), n.tolist(), 0.01)

    if pos.size == neg.size:
        return intervals.bootstrap_interval(np.stack([pos, neg], 1), lambda a: stat(a[:, 0], a[:, 1]), resamples=500)
    return intervals.bootstrap_interval(pos, lambda a: stat(a, neg), resamples=500)


def _key_spec(key) -> dict:
    """What defines the key, with a digest of its values (units made with another key never match)."""
    import hashlib

    digest = hashlib.sha256(key.values.numpy().tobytes()).hexdigest()[:16]
    return {
        "radius": key.radius,
        "channel": key.channel,
        "band": key.band,
        "seed": key.seed,
        "shape": list(key.shape),
        "values_sha256": digest,
    }


def summarize_detection(scores: dict) -> dict:
    """ROC-AUC and TPR at 1 % FPR for each score (lower score = watermarked, so negated)."""
    from diffcore.metrics import watermark as mw

    out = {}
    for name in SCORES:
        if name not in scores["positives"]:
            continue
        pos = [-v for v in scores["positives"][name]]
        neg = [-v for v in scores["negatives"][name]]
        out[name] = {
            "auc": mw.roc_auc(pos, neg),
            "tpr_at_1pct_fpr": mw.tpr_at_fpr(pos, neg, 0.01),
            "positives_median": _median(scores["positives"][name]),
            "negatives_median": _median(scores["negatives"][name]),
        }
    return out


def wrong_key_rates(positives: list, negatives: list) -> dict:
    """Images marked with the study's key, scored (L1 distance) against other keys: the fraction
    detected at each other key's own 1 %-FPR threshold (from the unmarked images), mean over keys."""
    from diffcore.metrics import watermark as mw

    rates = [mw.tpr_at_fpr([-v for v in pos], [-v for v in neg], 0.01) for pos, neg in zip(positives, negatives)]
    return {"keys": len(rates), "detected_fraction_mean": sum(rates) / len(rates), "detected_fraction_max": max(rates)}


def _median(values) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def _mean_std(values: dict) -> dict:
    out = {}
    for name, v in values.items():
        t = torch.tensor(v, dtype=torch.float64)
        finite = t[torch.isfinite(t)]
        out[name] = {
            "mean": float(finite.mean()) if finite.numel() else None,
            "std": float(finite.std()) if finite.numel() > 1 else None,
            "min": float(t.min()),
            "infinite": int((~torch.isfinite(t)).sum()),
        }
    return out


def consistency_summary(values: dict) -> dict:
    """Mean, std and min of each per-image value; with ``class_changed``, its fraction and PSNR
    separately over the images that kept their class and those that changed it."""
    out = _mean_std(values)
    if "class_changed" in values:
        changed = [bool(v) for v in values["class_changed"]]
        out["class_changed_fraction"] = sum(changed) / len(changed)
        for name, keep in (("psnr_same_class", False), ("psnr_class_changed", True)):
            psnr = [p for p, c in zip(values["psnr"], changed) if c == keep]
            out[name] = _mean_std({"psnr": psnr})["psnr"] if psnr else None
    return out


def _nullspace_summary(meta: dict) -> dict:
    fraction = torch.tensor(meta["fraction"], dtype=torch.float64)
    return {
        "fraction_mean": float(fraction.mean()),
        "fraction": meta["fraction"],
        "rank": meta["rank"],
        "response": meta["response"],
        "k": meta["k"],
    }


# ----------------------------------------------------------------------------- figures

LABELS = {"shallow": "Shallow Diffuse (key at 0.3 T)", "xT": "x_T baseline (Tree-Ring style)"}


def _pyplot():
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    return plt


def plot_roc(detection: list, path) -> Path:
    """ROC curves (L1 distance score) per attack, both methods in each panel."""
    from diffcore.experiments.plotting import finish
    from diffcore.metrics import watermark as mw

    plt = _pyplot()
    attacks = list(dict.fromkeys(d["attack"] for d in detection))
    cols = min(4, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.0 * rows), squeeze=False)
    for ax, attack_name in zip(axes.flat, attacks):
        for d in detection:
            if d["attack"] != attack_name:
                continue
            pos = [-v for v in d["scores"]["positives"]["distance"]]
            neg = [-v for v in d["scores"]["negatives"]["distance"]]
            fpr, tpr = mw.roc_curve(pos, neg)
            ax.plot(
                fpr,
                tpr,
                drawstyle="steps-post",
                label=f"{d.get('variant', d['method'])}: AUC {d['distance']['auc']:.3f}",
            )
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
        ax.set_title(attack_name, fontsize=9)
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(attacks) :]:
        ax.axis("off")
    return finish(
        fig,
        path,
        suptitle="Detection ROC (mean L1 key distance after ODE inversion); shallow = key at 0.3 T, "
        "xT = key in the initial noise",
    )


def plot_images(samples: dict, k: int, path, m: _Model) -> Path:
    """Rows: unwatermarked; Shallow Diffuse and its difference; x_T baseline and its difference
    (differences x5, mid-gray = 0)."""
    from diffcore.experiments import plotting

    rows = [samples["shallow"]["clean"][:k]]
    labels = ["clean"]
    for method in METHODS:
        wm_images = samples[method]["watermarked"][:k]
        rows += [wm_images, ((wm_images - samples[method]["clean"][:k]) * 5).clamp(-1, 1)]
        labels += [method, f"{method} diff x5"]
    title = f"{m.info['kind']}: key at sigma {m.sigma_t:.3g} / {m.info['sigma_max']:.3g}"
    return plotting.image_rows(rows, labels, path, suptitle=title)


def plot_consistency(results: dict, consistency: dict, path) -> Path:
    """PSNR and SSIM of watermarked vs unwatermarked twins per method (each image a dot, red where the
    key changed the image's class), and AUC per attack."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    jitter = torch.Generator().manual_seed(0)
    for ax, metric in zip(axes[:2], ("psnr", "ssim")):
        values = [[v for v in consistency[method][metric] if math.isfinite(v)] for method in METHODS]
        ax.boxplot(values, showmeans=True, showfliers=False)
        for i, method in enumerate(METHODS, start=1):
            v = consistency[method]
            changed = v.get("class_changed", [0.0] * len(v[metric]))
            for flag, color in ((0.0, "tab:blue"), (1.0, "tab:red")):
                points = [p for p, c in zip(v[metric], changed) if c == flag and math.isfinite(p)]
                x = (i + 0.25 * (torch.rand(len(points), generator=jitter) - 0.5)).tolist()
                label = ("class kept" if flag == 0.0 else "class changed") if i == 1 else None
                ax.scatter(x, points, s=6, alpha=0.6, color=color, label=label)
        if any("class_changed" in consistency[method] for method in METHODS):
            ax.legend(fontsize=7, loc="lower left")
        ax.set_xticks(range(1, len(METHODS) + 1), [LABELS[method].split(" (")[0] for method in METHODS], fontsize=8)
        ax.set_ylabel(metric.upper() + (" (dB)" if metric == "psnr" else ""))
        ax.set_title(f"consistency with the unwatermarked twin: {metric.upper()}", fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[2]
    attacks = list(dict.fromkeys(d["attack"] for d in results["detection"]))
    width = 0.38
    for j, method in enumerate(METHODS):
        auc = [
            next(d["distance"]["auc"] for d in results["detection"] if d["method"] == method and d["attack"] == a)
            for a in attacks
        ]
        ax.bar([i + (j - 0.5) * width for i in range(len(attacks))], auc, width, label=LABELS[method])
    ax.set_xticks(range(len(attacks)), attacks, fontsize=7, rotation=30)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_ylabel("ROC-AUC")
    ax.set_title("robustness: AUC per attack", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def plot_sweep(results: dict, path) -> Path:
    """Against the injection time (x_T at t = 1): SSIM to the unmarked twin (mean and 5th
    percentile), AUC per attack, the key's null-space fraction and the Jacobian's rank share; each
    with its 95 % bootstrap interval."""
    from diffcore.experiments.plotting import finish

    plt = _pyplot()
    sweep = results["sweep"]
    times = [e["time"] for e in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))

    def line(ax, values, label, style="o-"):
        ok = [(t, v) for t, v in zip(times, values) if v is not None]
        if not ok:
            return
        ts = [t for t, _ in ok]
        ax.plot(ts, [v["value"] for _, v in ok], style, label=label)
        ax.fill_between(ts, [v["low"] for _, v in ok], [v["high"] for _, v in ok], alpha=0.2)

    line(axes[0], [e["ssim_mean"] for e in sweep], "SSIM mean")
    line(axes[0], [e["ssim_p05"] for e in sweep], "SSIM 5th percentile", "s--")
    axes[0].set_ylabel("SSIM to the unmarked twin")
    for attack_name in sweep[0]["detection"]:
        line(axes[1], [e["detection"][attack_name]["auc"] for e in sweep], attack_name)
    axes[1].axhline(0.5, color="gray", lw=0.8, ls=":")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_ylabel("ROC-AUC")
    line(axes[2], [e.get("null_space_fraction") for e in sweep], "key's null-space fraction")
    capped = [t for t, e in zip(times, sweep) if e.get("rank_capped_at_k")]
    rank_label = "Jacobian rank / dimension" + (" (hollow: rank above k, a lower bound)" if capped else "")
    line(axes[2], [e.get("rank_fraction") for e in sweep], rank_label, "s--")
    for t, e in zip(times, sweep):
        if e.get("rank_capped_at_k"):
            axes[2].plot([t], [e["rank_fraction"]["value"]], "s", mfc="white", mec="tab:orange", zorder=3)
    axes[2].set_ylim(0, 1.05)
    for ax, title in zip(axes, ("consistency", "detection", "Jacobian at the injection state")):
        ax.set_xlabel("injection time t / T (x_T: 1)")
        ax.set_title(f"{title} ({results['model']['kind']})", fontsize=9)
    return finish(fig, path, axes)


# No hooks: the tiny preset runs the closed-form Gaussian denoiser instead of stand-ins.
STUDY = base.Study(
    NAME, WatermarkConfig, takes_hooks=False, presets=PRESETS, make=base.standard_make(_Study, hooks=False)
)
run, run_preset = STUDY.run, STUDY.run_preset
