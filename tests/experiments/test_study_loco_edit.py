"""The LOCO Edit study (issue 13): the tiny preset on a Gaussian stand-in "model" of the digits
(its Jacobian is known, training a UNet would take minutes), the reuse of a reproducibility run's
model, config validation, and the diffusers path on a tiny random UNet2DModel saved to a folder."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffcore.data import load_digits
from diffcore.denoisers import GaussianDenoiser
from diffcore.experiments import loco_edit as study
from diffcore.experiments.base import ConfigError, Workspace
from tests.experiments.conftest import subset
from tests.helpers import assert_outputs, tiny_diffusers_unet

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


class GaussianStack:
    """Stand-in hooks: "training" writes the spec, the "model" is the Gaussian denoiser of the N images
    (the nested subset of the experiments' stand-in stack)."""

    def __init__(self):
        self.pool = load_digits()[0]
        self.trained = 0

    def train(self, images, spec, out_dir, work_dir, device="cpu", progress=True):
        self.trained += 1
        (Path(out_dir) / "model.json").write_text(json.dumps(spec))
        return {}

    def load(self, model_dir, device="cpu"):
        spec = json.loads((Path(model_dir) / "model.json").read_text())
        return GaussianDenoiser.fit(subset(self.pool, spec["n"], spec["subset_seed"])[0])

    def hooks(self):
        return study.LocoHooks(
            load_dataset=lambda name, root="": self.pool,
            subset=subset,
            train=self.train,
            load=self.load,
            load_diffusers=study.load_diffusers_denoiser,
        )


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loco")
    stack = GaussianStack()
    return out, stack, study.run_preset("tiny", out, hooks=stack.hooks(), progress=False)


def test_tiny_run_measures(tiny_run):
    out, _, results = tiny_run
    config = study.PRESETS["tiny"]()
    images = results["images"]
    assert len(images) == len(config.image_indices)
    for im in images:
        # the Gaussian of 1797 digits has full rank 64, but at sigma ~ 2 few directions carry J
        assert 1 <= im["rank_jacobian"] < 64 and 1 <= im["rank_masked"] <= im["rank_jacobian"]
        assert len(im["edits"]) == (config.rank + 1) * 2 * len(config.strengths)
        assert im["direction_seconds"] > 0 and im["direction_cpu_seconds"] > 0
        # the affine model and the linear sampler: +s and -s changes are opposite, growth is linear
        for row in im["linearity"]:
            first = next(
                r for r in im["linearity"] if (r["direction"], r["projected"]) == (row["direction"], row["projected"])
            )
            assert row["cosine_pm"] < -0.9999
            assert abs(row["change_per_strength"] / first["change_per_strength"] - 1) < 1e-4
            assert "gain" not in row  # unnormalized change_per_strength only
        assert im["composition"]["additivity_error"] < 1e-4
    for s in results["summary"]["per_strength"]:
        # the null-space projection moves the change into the mask
        assert s["inside_fraction_projected_mean"] > s["inside_fraction_unprojected_mean"] + 0.05
        assert s["outside_mse_projected_mean"] < s["outside_mse_unprojected_mean"]
        # the Jacobian is the same everywhere: transferred directions are as local as own ones
        assert abs(s["transfer_inside_fraction_mean"] - s["inside_fraction_projected_mean"]) < 1e-3
    n = len(images)
    assert len(results["transfer"]) == n * n * 2 * len(config.strengths)
    assert_outputs(
        out,
        ("results.json", "edits.csv", "transfer.csv", "edits.png", "transfer.png", "spectrum.png", "timings.json"),
        results,
    )
    timings = json.loads((out / "timings.json").read_text())
    assert timings["cpu_seconds"] > 0 and timings["units"]["images"]["units"] == n


def test_controls_decide_on_intervals(tiny_run):
    """On the Gaussian stand-in the learned Jacobian is W_G itself: the Gaussian control must tie
    with LOCO (its interval holds 0, the claim fails), while a random direction under the same
    projection stays less local (the claim holds on the bootstrap interval over images)."""
    out, _, results = tiny_run
    config = study.PRESETS["tiny"]()
    controls, claims = results["controls"], results["claims"]
    assert [r["edit_time"] for r in controls["per_time"]] == list(config.edit_times())
    assert [r["mask"] for r in controls["per_mask"]] == list(config.control_masks)
    tie = claims["loco_more_local_than_gaussian"]
    assert not tie["holds"] and tie["median_difference"]["low"] <= 0 <= tie["median_difference"]["high"] + 1e-6
    beat = claims["loco_more_local_than_random"]
    assert beat["holds"] and beat["median_difference"]["low"] > 0
    for row in controls["per_mask"]:
        # chance: the mask's share of the pixels (halves 0.5, the centre square 0.25)
        assert row["chance_inside_fraction"] == {"center": 0.25}.get(row["mask"], 0.5)
        rate = row["success_rate"]
        assert rate["method"] == "wilson" and rate["low"] <= rate["value"] <= rate["high"]
    for claim in claims.values():
        assert isinstance(claim["holds"], bool)
    assert (out / "controls.png").stat().st_size > 0
    # the controls sample only the headline strength (both signs): the only one their results use
    assert controls["strength"] == study.control_strength(config) == config.strengths[len(config.strengths) // 2]
    saved = torch.load(out / "units" / "controls" / f"t{config.edit_time:g}" / "controls.pt", weights_only=True)
    assert saved["deltas"].shape[:2] == (2, len(config.control_masks))
    assert float(saved["strength"]) == controls["strength"]


def test_saved_directions_reproduce_the_edits(tiny_run):
    from diffcore.analysis import EditTimeline, edit_samples, load_directions

    out, stack, results = tiny_run
    config = study.PRESETS["tiny"]()
    unit = out / "units" / "images" / "image-1"
    tensors = torch.load(unit / "tensors.pt", weights_only=True)
    dirs = load_directions(unit / "directions.safetensors")
    model = stack.load(next(p for p in (out / "units" / "models").iterdir() if not p.name.startswith(".")))
    timeline = EditTimeline()
    sigmas = timeline.sampling_grid(config.edit_time, config.inversion_steps)
    again = edit_samples(
        model,
        tensors["x_t"],
        dirs.directions[:, 0],
        [config.strengths[0]],
        sigmas,
        solver=config.solver,
        stochastic_below=0.0,
        seeds=[config.noise_seed + 1],
    )
    assert torch.equal(again[0].float(), tensors["dir0"][0])
    assert dirs.sigma == pytest.approx(results["edit_sigma"])


def test_resume_reuses_every_unit(tiny_run):
    out, stack, results = tiny_run
    trained = stack.trained
    again = study.run_preset("tiny", out, hooks=stack.hooks(), progress=False)
    assert again == results and stack.trained == trained
    timings = json.loads((out / "timings.json").read_text())
    assert timings["units"]["images"]["reused"] == timings["units"]["images"]["units"]


def test_reuses_the_model_of_a_reproducibility_run(tmp_path):
    stack = GaussianStack()
    config = dataclasses.replace(
        study.PRESETS["tiny"](), image_indices=(5,), transfer=False, rank=1, strengths=(1.0,), control_masks=()
    )
    repro = Workspace(tmp_path / "repro")
    spec = {
        "dataset": "digits",
        "n": config.train_size,
        "subset_seed": 0,
        "data_root": "",
        "model_preset": "x",
        "width": config.width,
        "seed": config.train_seed,
        "train_steps": 5,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "lr_warmup_images": 0,
    }
    repro.run_unit(
        "models",
        f"w{config.width}-n{config.train_size}-s{config.train_seed}",
        spec,
        lambda tmp, work: stack.train(None, spec, tmp, work),
    )
    trained = stack.trained
    results = study.run(
        dataclasses.replace(config, models_from=str(tmp_path / "repro")),
        tmp_path / "out",
        hooks=stack.hooks(),
        progress=False,
    )
    assert stack.trained == trained
    assert results["model"]["source"].startswith("reused from") and results["model"]["spec"] == spec
    with pytest.raises(ConfigError, match="models_from"):
        study.run(
            dataclasses.replace(config, models_from=str(tmp_path / "missing")),
            tmp_path / "out2",
            hooks=stack.hooks(),
            progress=False,
        )


@pytest.mark.parametrize(
    "field,value",
    [
        ("edit_time", 0.0),
        ("edit_time", 1.0),
        ("edit_time", 1.5),
        ("rank", 0),
        ("k_out", -1),
        ("strengths", ()),
        ("strengths", (2.0, 1.0)),
        ("strengths", (-1.0,)),
        ("solver", "rk4"),
        ("image_source", "web"),
        ("image_indices", ()),
        ("image_indices", (1, 1)),
        ("mask", "top"),
        ("mask", "box:0.5,0.2,0,1"),
        ("mask_files", ("a.png", "b.png")),
        ("stochastic_below", 0.5),
        ("inversion_steps", 0),
        ("subspace_tol", 0.0),
        ("rank_ratio", 1.5),
        ("subspace_method", "qr"),
        ("torch_threads", -1),
        ("width", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    config = dataclasses.replace(study.PRESETS["tiny"](), **{field: value})
    with pytest.raises(ConfigError, match=field):
        config.validate()


def test_rank_above_the_mask_pixels_is_refused(tmp_path):
    config = dataclasses.replace(study.PRESETS["tiny"](), image_indices=(0,), rank=33, transfer=False)
    with pytest.raises(ValueError, match="rank"):  # 32 pixels in the upper half
        study.run(config, tmp_path, hooks=GaussianStack().hooks(), progress=False)


def test_grid_masks():
    shape = (3, 8, 8)
    assert float(study.grid_mask("upper-half", shape)[:, :4].min()) == 1
    assert float(study.grid_mask("upper-half", shape)[:, 4:].max()) == 0
    box = study.grid_mask("box:0.25,0.5,0,1", shape)
    assert float(box.sum()) == 3 * 2 * 8 and float(box[:, 2:4].min()) == 1
    assert float(study.grid_mask("center", shape).sum()) == 3 * 16


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    """A tiny random UNet2DModel (with attention) and a DDPM scheduler saved as a diffusers folder."""
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("diffusers") / "model"
    tiny_diffusers_unet(sample_size=8, attention=True).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install -e .[test])")
def test_diffusers_folder_adapter(tmp_path, unet_folder):
    from diffusers import DDPMScheduler, UNet2DModel

    from diffcore.sampler import DiffusersUNetDenoiser

    folder = unet_folder
    denoiser, abar, shape = study.load_diffusers_denoiser(folder)
    assert shape == (3, 8, 8) and abar.shape == (1000,)
    unet = UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    direct = DiffusersUNetDenoiser(unet, DDPMScheduler.from_pretrained(str(folder / "scheduler")))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            denoiser(x, torch.tensor([0.5, 3.0])), direct(x, torch.tensor([0.5, 3.0])), rtol=1e-5, atol=1e-5
        )
    # forward-mode JVPs pass through attention and GroupNorm (what the Jacobian directions need)
    v = torch.randn_like(x)
    jv = torch.func.jvp(lambda z: denoiser(z, torch.tensor([1.0, 1.0])), (x,), (v,))[1]
    eps = 1e-3
    with torch.no_grad():
        fd = (denoiser(x + eps * v, torch.tensor([1.0, 1.0])) - denoiser(x - eps * v, torch.tensor([1.0, 1.0]))) / (
            2 * eps
        )
    assert float((jv - fd).norm() / fd.norm()) < 1e-2
    with pytest.raises(FileNotFoundError, match="diffusers_dir"):
        study.load_diffusers_denoiser(tmp_path / "missing")


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install -e .[test])")
def test_paper_pipeline_on_a_tiny_diffusers_folder(tmp_path, unet_folder):
    from PIL import Image

    folder = unet_folder
    files, masks = [], []
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        mask = torch.zeros(8, 8, dtype=torch.uint8)
        mask[: 4 + i] = 255
        Image.fromarray(mask.numpy()).save(tmp_path / f"mask{i}.png")
        files.append(str(tmp_path / f"img{i}.png"))
        masks.append(str(tmp_path / f"mask{i}.png"))
    config = dataclasses.replace(
        study.PRESETS["paper"](),
        diffusers_dir=str(folder),
        image_files=tuple(files),
        mask_files=tuple(masks),
        inversion_steps=10,
        strengths=(1.0,),
        spectrum_k=2,
        spectrum_probes=2,
        k_out=2,
        subspace_method="subspace",
        subspace_iters=1,
        torch_threads=1,
    )
    results = study.run(config, tmp_path / "out", hooks=GaussianStack().hooks(), progress=False)
    assert results["model"]["kind"] == "diffusers"
    from diffcore.analysis import EditTimeline

    abar = study.load_diffusers_denoiser(folder)[1]  # the scheduler's, not the default
    assert results["edit_sigma"] == pytest.approx(EditTimeline(abar).sigma(0.6))
    for im in results["images"]:
        assert im["reconstruction_rmse"] >= 0 and len(im["edits"]) == 4
        assert all(e["change_norm"] > 0 for e in im["edits"])
    assert len(results["transfer"]) == 2 * 2 * 2
    assert (tmp_path / "out" / "edits.png").stat().st_size > 0


def test_generated_images_and_pool_size(tmp_path):
    stack = GaussianStack()
    config = dataclasses.replace(
        study.PRESETS["tiny"](), image_source="generated", image_seeds=(3, 4), rank=1, strengths=(1.0,), transfer=False
    )
    results = study.run(config, tmp_path / "gen", hooks=stack.hooks(), progress=False)
    assert [im["image"] for im in results["images"]] == ["generated-3", "generated-4"]
    assert all("reconstruction_rmse" not in im for im in results["images"])
    loc = results["summary"]["per_strength"][0]
    assert loc["inside_fraction_projected_mean"] > loc["inside_fraction_unprojected_mean"]
    with pytest.raises(ConfigError, match="train_size"):
        study.run(dataclasses.replace(config, train_size=5000), tmp_path / "big", hooks=stack.hooks(), progress=False)
