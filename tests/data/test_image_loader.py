"""One image reader for the package (issue 32): loco-edit's image and mask files decode 16-bit PNGs
like the image folder does, transparency is refused naming the file, a folder mixing top-level
images and class sub-folders is refused, and an image folder needs no resolution when its images
are square of one size (so ``--set dataset=image_folder`` works in the studies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.data import load_dataset
from diffcore.data.image_folder import load_image_folder, read_image
from diffcore.experiments.loco_edit import image_from_file, mask_from_file


def _gray16(path, scale=1000):
    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * scale  # 0 .. 63000
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    return np.rint(values.astype(np.int64) * 255 / 65535)


def test_loco_edit_image_files_scale_16_bit_pngs_instead_of_saturating(tmp_path):
    want = _gray16(tmp_path / "g16.png")
    image = image_from_file(tmp_path / "g16.png", (1, 8, 8))
    got = ((image[0] + 1) * 127.5).numpy()
    assert np.abs(got - want).max() <= 1.0
    assert (got >= 254.5).mean() < 0.05  # saturated, nearly every pixel was 255


def test_loco_edit_mask_files_scale_16_bit_pngs(tmp_path):
    values = np.zeros((8, 8), dtype=np.uint16)
    values[:, 4:] = 65535
    values[:, :4] = 20000  # 30 % grey: outside; saturating to 255 made it inside
    Image.fromarray(values).save(tmp_path / "m16.png")
    mask = mask_from_file(tmp_path / "m16.png", (1, 8, 8))
    assert mask[0, :, 4:].eq(1).all() and mask[0, :, :4].eq(0).all()


def test_transparent_pixels_are_refused_naming_the_file_and_opaque_alpha_is_dropped(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert np.asarray(read_image(tmp_path / "opaque.png", 3))[..., 0].min() == 200
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "holes.png")
    with pytest.raises(ValueError, match="holes.png.*1 transparent pixels"):
        read_image(tmp_path / "holes.png", 3)
    with pytest.raises(ValueError, match="holes.png.*transparent"):
        load_image_folder(tmp_path, resolution=8)
    with pytest.raises(ValueError, match="holes.png.*transparent"):
        image_from_file(tmp_path / "holes.png", (3, 8, 8))


def test_top_level_images_beside_class_folders_are_refused(tmp_path):
    (tmp_path / "cats").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "cats" / "a.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="1 images at its top level .*'loose.png'.*cats"):
        load_image_folder(tmp_path, resolution=8)
    (tmp_path / "loose.png").unlink()
    (tmp_path / ".cache").mkdir()  # hidden folders are no classes
    assert load_image_folder(tmp_path, resolution=8).num_classes == 1


def test_image_folder_without_resolution_uses_the_images_own_size_and_mode(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = load_dataset({"name": "image_folder", "root": str(tmp_path)})  # no resolution, no channels
    assert ds.values.shape == (3, 1, 8, 8) and ds.values[2].eq(80).all()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    assert load_dataset({"name": "image_folder", "root": str(tmp_path)}).values.shape == (4, 3, 8, 8)
    Image.fromarray(np.zeros((8, 6), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="not all square of one size.*give the dataset a resolution"):
        load_dataset({"name": "image_folder", "root": str(tmp_path)})
    assert load_dataset({"name": "image_folder", "root": str(tmp_path), "resolution": 4}).values.shape[-1] == 4


def _digits_folder(root, count=24):
    from diffcore.data.digits import load_digits

    images, _ = load_digits(as_uint8=True)
    root.mkdir()
    for i in range(count):
        Image.fromarray(images[i, 0].numpy()).save(root / f"{i:03d}.png")
    return images[:count]


def test_image_folder_loads_like_the_images_it_was_made_of(tmp_path):
    images = _digits_folder(tmp_path / "digits")
    loaded = load_dataset({"name": "image_folder", "root": str(tmp_path / "digits")})
    assert torch.equal(loaded.values, images)


@pytest.mark.slow
def test_a_study_runs_on_an_image_folder(tmp_path):
    """``--set dataset=image_folder --set data_root=...`` in the reproducibility study (real stack,
    seconds): the folder's own 8x8 grayscale size feeds the digits UNet."""
    from diffcore.experiments import reproducibility as study
    from diffcore.experiments.base import config_from_preset

    _digits_folder(tmp_path / "digits")
    overrides = [
        "dataset=image_folder",
        f"data_root={tmp_path / 'digits'}",
        "widths=4",
        "sizes=8,24",
        "train_seeds=0",
        "train_steps=3",
        "num_samples=4",
        "sampler_steps=2",
        "grid_samples=0",
    ]
    results = study.run(
        config_from_preset(study.PRESETS, "tiny", overrides), tmp_path / "out", device="cpu", progress=False
    )
    assert results["config"]["dataset"] == "image_folder"
    assert [m["n"] for m in results["models"]] == [8, 24] and all(0 <= m["gl"] <= 1 for m in results["models"])
