"""Adapters to the denoiser contract: epsilon/v/x0 predictions, VP models, diffusers UNets."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import diffcore.sampler as S
from tests.helpers import tiny_diffusers_unet


class PerfectVPModel:
    """The VP-parameterized model that corresponds exactly to a VE denoiser: it maps its
    (fractional) timestep back to sigma by the same log-sigma interpolation, and predicts
    eps, x0 or v as asked."""

    def __init__(self, ve_denoiser, alphas_cumprod, prediction_type):
        self.ve, self.prediction_type = ve_denoiser, prediction_type
        self.log_sigmas = S.sigmas_from_alphas_cumprod(alphas_cumprod).log()
        self.timesteps_seen = []

    def sigma_of(self, t):
        t = t.double()
        low = t.floor().long().clamp(0, len(self.log_sigmas) - 2)
        frac = t - low
        return torch.exp(self.log_sigmas[low] * (1 - frac) + self.log_sigmas[low + 1] * frac)

    def __call__(self, x_vp, t):
        self.timesteps_seen.append(t)
        s = self.sigma_of(t).reshape(-1, *([1] * (x_vp.dim() - 1)))
        alpha = (1 + s * s).rsqrt()
        beta = s * alpha
        x_ve = x_vp / alpha
        x0 = self.ve(x_ve, s.reshape(-1))
        eps = (x_ve - x0) / s
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - beta * x0}[self.prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_vp_adapter_reproduces_the_ve_denoiser(prediction_type, gaussian):
    abar = S.ddpm_alphas_cumprod(1000, "linear")
    model = PerfectVPModel(gaussian, abar, prediction_type)
    denoiser = S.VPDenoiser(model, abar, prediction_type)
    x = 3.0 * torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.3, 1.0, 20.0, 150.0], dtype=torch.float64)
    torch.testing.assert_close(denoiser(x, sigma), gaussian(x, sigma), rtol=1e-9, atol=1e-9)


def test_vp_timestep_lookup():
    abar = S.ddpm_alphas_cumprod(1000, "cosine")
    denoiser = S.VPDenoiser(lambda x, t: x, abar)
    train = S.sigmas_from_alphas_cumprod(abar)
    idx = torch.tensor([0, 1, 17, 500, 999])
    torch.testing.assert_close(denoiser.timestep(train[idx]), idx.double(), rtol=0, atol=1e-9)
    mid = torch.sqrt(train[10] * train[11]).reshape(1)  # halfway in log sigma
    torch.testing.assert_close(denoiser.timestep(mid), torch.tensor([10.5], dtype=torch.float64), rtol=0, atol=1e-9)
    clamped = denoiser.timestep(torch.tensor([1e-9, 1e9], dtype=torch.float64))
    assert clamped.tolist() == [0.0, 999.0]
    rounded = S.VPDenoiser(lambda x, t: x, abar, timestep="round").timestep(mid)
    assert rounded.tolist() in ([10.0], [11.0])


def test_ve_adapter(gaussian):
    x = torch.randn(3, 12, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)

    def eps_model(xx, s):
        return (xx - gaussian(xx, s)) / s.reshape(-1, 1)

    torch.testing.assert_close(S.VEDenoiser(eps_model, "epsilon")(x, sigma), gaussian(x, sigma))
    torch.testing.assert_close(S.VEDenoiser(gaussian, "sample")(x, sigma), gaussian(x, sigma))
    torch.testing.assert_close(S.VEDenoiser(gaussian, "sample")(x, 2.0), gaussian(x, torch.full((3,), 2.0)))
    with pytest.raises(ValueError, match="prediction_type"):
        S.VEDenoiser(gaussian, "v_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        S.VPDenoiser(gaussian, S.ddpm_alphas_cumprod(), "noise")


def test_vp_adapter_samples_like_the_ve_model(gaussian):
    """Sampling through the adapter of the perfect VP model gives the VE model's samples."""
    abar = S.ddpm_alphas_cumprod(1000, "linear")
    denoiser = S.VPDenoiser(PerfectVPModel(gaussian, abar, "v_prediction"), abar, "v_prediction")
    kwargs = dict(seeds=[1, 2, 3], shape=(12,), steps=12, dtype=torch.float64, sigma_min=0.02, sigma_max=80.0)
    torch.testing.assert_close(S.sample(denoiser, **kwargs), S.sample(gaussian, **kwargs), rtol=1e-8, atol=1e-8)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed (optional: pip install diffusers)"
)
def test_diffusers_unet_adapter_matches_diffusers_ddim_loop():
    from diffusers import DDIMScheduler

    unet = tiny_diffusers_unet(sample_size=8).eval()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(10)
    noise = S.noise_from_seeds([0, 1], (3, 8, 8))
    with torch.no_grad():
        x = noise.clone()
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        denoiser = S.DiffusersUNetDenoiser(unet, scheduler, timestep="round")
        sigmas = S.vp_sigmas(10, scheduler.alphas_cumprod, spacing="leading")
        x_ve = noise * float((1 + sigmas[0] ** 2).sqrt())  # x_ve = x_vp / sqrt(abar)
        ours = S.sample_ddim(denoiser, x_ve, sigmas)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
def test_diffusers_folder_loader_names_the_setting_and_what_is_missing(tmp_path):
    from diffcore.sampler.adapters import load_diffusers_folder

    with pytest.raises(FileNotFoundError, match="^model_dir: .* is not a folder"):
        load_diffusers_folder(tmp_path / "absent", argument="model_dir")
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="^diffusers_dir: no UNet config.json in"):
        load_diffusers_folder(tmp_path, argument="diffusers_dir")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="^diffusers_dir: no scheduler_config.json in"):
        load_diffusers_folder(tmp_path, argument="diffusers_dir")
