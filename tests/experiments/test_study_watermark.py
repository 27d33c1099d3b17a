"""The watermark study (diffcore run watermark): tiny preset end to end, resume, config validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffcore.experiments import EXPERIMENTS, experiment, watermark as study
from diffcore.experiments.base import ConfigError, apply_overrides
from tests.helpers import assert_outputs, tiny_diffusers_unet


def test_registered():
    assert "watermark" in EXPERIMENTS and experiment("watermark") is study
    assert set(study.PRESETS) == {"quick", "tiny", "paper", "learned"}
    for make in study.PRESETS.values():
        make().validate()  # the paper preset's model_dir is checked when the study runs


def test_tiny_run_outputs(tiny_run):
    out, results = tiny_run
    assert_outputs(
        out,
        (
            "detection.csv",
            "consistency.csv",
            "watermark-roc.png",
            "watermark-images.png",
            "watermark-consistency.png",
            "watermark-sweep.png",
            "timings.json",
        ),
        results,
    )
    rows = {(d["method"], d["attack"]): d for d in results["detection"] if d["variant"] == d["method"]}
    assert set(rows) == {(m, a) for m in study.METHODS for a in ("none", "jpeg", "noise")}
    for method in study.METHODS:
        none = rows[(method, "none")]
        # without attack the key comes back (the 8-bit image of a linear model): every score separates
        assert none["distance"]["auc"] == 1.0 and none["p_value"]["auc"] == 1.0
        assert none["distance"]["positives_median"] < none["distance"]["negatives_median"]
        assert 0.0 <= none["wrong_keys"]["detected_fraction_mean"] <= 1.0
        cons = results["consistency"][method]
        assert cons["psnr"]["mean"] > 25 and 0.9 < cons["ssim"]["mean"] <= 1.0
        null = results["nullspace"][method]
        assert all(0.0 <= f <= 1.0 for f in null["fraction"]) and len(null["rank"]) == 2
    assert results["model"]["kind"] == "gaussian" and 0 < results["model"]["sigma_t"] < results["model"]["sigma_max"]
    assert results["key"]["radius"] == 3 and results["key"]["size"] > 0


def test_sweep_and_claims_on_intervals(tiny_run):
    """The sweep holds x_T (t = 1) and Shallow Diffuse at each time, with intervals; the high band of
    the upsampled digits holds almost none of their variance (the interval lies below the disc's
    share of the spectrum: the overlap claim fails), which is why the learned preset uses the low band."""
    _, results = tiny_run
    config = study.PRESETS["tiny"]()
    times = [e["time"] for e in results["sweep"]]
    assert times == sorted({config.time, *config.sweep_times, 1.0})
    for e in results["sweep"]:
        for attack_name in config.attacks:
            auc = e["detection"][attack_name]["auc"]
            assert auc["method"] == "bootstrap" and auc["low"] <= auc["value"] <= auc["high"]
        assert e["ssim_p05"]["value"] <= e["ssim_mean"]["high"] and e["ssim_min"] <= e["ssim_p05"]["value"]
    spectrum = results["data_spectrum"]
    assert spectrum["variance_share_on_key"]["high"] < spectrum["chance_share"]
    assert results["claims"]["key_band_overlaps_data"]["holds"] is False
    assert all(isinstance(c["holds"], bool) for c in results["claims"].values())


def test_rerun_reuses_every_unit(tiny_run):
    out, results = tiny_run
    again = study.run_preset("tiny", out, progress=False)
    assert again == results
    timings = json.loads((out / "timings.json").read_text())
    assert all(v["reused"] == v["units"] for v in timings["units"].values())


@pytest.mark.parametrize(
    "override, field",
    [
        ("time=1.0", "time"),
        ("time=0", "time"),
        ("channel=1", "channel"),
        ("radius_fraction=0.49", "radius"),
        ("radius_fraction=0.6", "radius_fraction"),
        ("model=vae", "model"),
        ("attacks=none,rotate", "attacks"),
        ("solver=rk4", "solver"),
        ("num_negatives=1", "num_negatives"),
        ("jpeg_quality=0", "jpeg_quality"),
        ("band=mid", "band"),
        ("sampler_steps=1", "sampler_steps"),
        ("grid_images=99", "grid_images"),
        ("model=diffusers", "model_dir"),
    ],
)
def test_bad_config_names_the_field(tmp_path, override, field):
    config = apply_overrides(study.PRESETS["tiny"](), [override])
    with pytest.raises(ConfigError, match=field):
        study.run(config, tmp_path / "out", progress=False)


def test_mixture_denoiser_is_tweedie():
    """D = x + sigma^2 grad log p_sigma for the Gaussian mixture of the quick preset (float64)."""
    from diffcore.data import load_digits
    from diffcore.denoisers.mixture import GaussianMixtureDenoiser

    images = study.digits_at(8)
    model = GaussianMixtureDenoiser.fit(images, load_digits()[1], 1e-3)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for sigma in (0.05, 1.0, 20.0):
        (grad,) = torch.autograd.grad(model.log_density(x, sigma).sum(), x)
        expected = x.detach() + sigma**2 * grad
        assert torch.allclose(model(x.detach(), sigma), expected, rtol=1e-10, atol=1e-10)


def _small_analysis(preset: str, images: int, **changes) -> study.WatermarkConfig:
    """The preset with a test-sized analysis: ``images`` marked images and as many negatives, the
    unattacked images only, 2 grid images, 3 reference keys, no wrong keys, no p-value; then
    ``changes``."""
    analysis = dict(
        num_images=images,
        num_negatives=images,
        attacks=("none",),
        grid_images=2,
        rank_references=3,
        wrong_keys=0,
        p_value=False,
    )
    return dataclasses.replace(study.PRESETS[preset](), **{**analysis, **changes})


@pytest.mark.slow
def test_unet_path_trains_and_runs(tmp_path):
    """model=unet: a few training steps through diffcore.train (resumable unit), then the study."""
    config = _small_analysis(
        "tiny",
        2,
        model="unet",
        width=8,
        train_steps=2,
        batch_size=8,
        sampler_steps=2,
        nullspace_images=0,
        sweep_times=(),
    )
    results = study.run(config, tmp_path / "out", progress=False)
    assert results["model"]["kind"] == "unet" and results["model"]["step"] == 2
    assert (tmp_path / "out" / "units" / "models" / "unet" / "MANIFEST.json").is_file()
    assert {d["method"] for d in results["detection"]} == set(study.METHODS)


@pytest.mark.slow
def test_diffusers_path_runs(tmp_path):
    """model=diffusers: a tiny random UNet2DModel and DDIM scheduler saved to a folder (safetensors)."""
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path / "model"
    tiny_diffusers_unet(sample_size=16).save_pretrained(folder, safe_serialization=True)
    diffusers.DDIMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    config = _small_analysis(
        "paper",
        2,
        model_dir=str(folder),
        sampler_steps=3,
        sample_batch=4,
        attacks=("none", "jpeg"),
        nullspace_images=1,
        nullspace_k=1,
        wrong_keys=2,
        p_value=True,
        channel=2,
    )
    results = study.run(config, tmp_path / "out", progress=False)
    model = results["model"]
    # timestep 300 of the scheduler (its alphas_cumprod is float32)
    assert model["kind"] == "diffusers" and model["sigma_t"] == pytest.approx(study_sigma(300), rel=1e-6)
    assert results["key"]["shape"] == [3, 16, 16] and results["key"]["channel"] == 2
    assert len(results["detection"]) == 4


def study_sigma(timestep: int) -> float:
    """sigma of DDPM timestep ``timestep`` of the linear schedule (the DDIM scheduler's default)."""
    from diffcore.sampler import ddpm_alphas_cumprod

    abar = float(ddpm_alphas_cumprod()[timestep])
    return ((1 - abar) / abar) ** 0.5


def test_scaled_molrg_denoiser_is_tweedie():
    """D = x + sigma^2 grad log p_sigma for the scaled MoLRG of the quick preset (float64), and its
    pixel variance is the one asked for."""
    from diffcore.denoisers.mixture import ScaledMoLRGDenoiser

    model = ScaledMoLRGDenoiser.random(3, (1, 8, 8), 4, pixel_variance=0.3, floor=1e-2, seed=1)
    assert model.scale**2 * 4 / 64 + 1e-2 == pytest.approx(0.3, rel=1e-12)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for sigma in (0.05, 1.0, 20.0):
        (grad,) = torch.autograd.grad(model.log_density(x, sigma).sum(), x)
        expected = x.detach() + sigma**2 * grad
        assert torch.allclose(model(x.detach(), sigma), expected, rtol=1e-10, atol=1e-10)
    # a point on subspace k (scaled) is classified as k at a small noise level
    bases = model.unit.bases
    on_subspace = torch.stack([model.scale * bases[k, :, 0] for k in range(3)]).reshape(3, 1, 8, 8)
    assert model.classify(on_subspace, 0.01).tolist() == [0, 1, 2]


def test_mixture_classifies_its_class_means():
    from diffcore.data import load_digits
    from diffcore.denoisers.mixture import GaussianMixtureDenoiser

    model = GaussianMixtureDenoiser.fit(study.digits_at(8), load_digits()[1], 1e-3)
    assert model.classify(model.means.reshape(-1, 1, 8, 8), 0.01).tolist() == list(range(10))


@pytest.mark.slow
def test_molrg_shallow_key_is_more_consistent(tmp_path):
    """The quick preset's claim on a small scaled MoLRG (16x16, 4 subspaces of dimension 6): the key
    written at 0.3 T changes the image less than the same key written into x_T, never changes its
    class, and the Jacobian at the shallow state has the subspace's rank; both are detected."""
    config = _small_analysis(
        "quick",
        8,
        resolution=16,
        radius_fraction=0.2,
        components=4,
        latent_dim=6,
        sampler_steps=12,
        nullspace_images=2,
        nullspace_k=10,
        grid_images=4,
        rank_references=9,
    )
    results = study.run(config, tmp_path / "out", progress=False)
    cons = results["consistency"]
    assert cons["shallow"]["psnr"]["mean"] > cons["xT"]["psnr"]["mean"] + 3
    assert cons["shallow"]["class_changed_fraction"] == 0.0
    assert cons["shallow"]["gain"]["mean"] < cons["xT"]["gain"]["mean"]
    # the subspace's 6 directions (+ at most one from the class posterior's gradient)
    assert all(6 <= r <= 7 for r in results["nullspace"]["shallow"]["rank"])
    for row in results["detection"]:
        assert row["distance"]["auc"] == 1.0, row["method"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("latent_dim=30", "latent_dim"),
        ("pixel_variance=0.0005", "pixel_variance"),
        ("components=0", "components"),
    ],
)
def test_bad_molrg_config_names_the_field(tmp_path, override, field):
    config = apply_overrides(dataclasses.replace(study.PRESETS["tiny"](), model="molrg", components=10), [override])
    with pytest.raises(ConfigError, match=field):
        study.run(config, tmp_path / "out", progress=False)
