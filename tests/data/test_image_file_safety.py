"""Image files are read only when they are regular files, decoded at once, and refused with a
one-line error naming the file when they are FIFOs, truncated or decompression bombs
(issue 32: hangs, tracebacks)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from diffcore.data.image_folder import load_image_folder
from diffcore.experiments.loco_edit import image_from_file, mask_from_file


def write_png(path, size=8):
    Image.fromarray(np.full((size, size), 200, dtype=np.uint8), mode="L").save(path)


def bad_images(folder):
    """name -> (path, message) for each kind of bad image file."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.png")
    write_png(folder / "whole.png", 64)
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:60])
    (folder / "whole.png").unlink()
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 M pixels in a few kB
    return {
        "fifo.png": "is not a regular file",
        "truncated.png": "is not a readable image",
        "bomb.png": "is too large to decode",
    }


def test_loco_edit_image_and_mask_files_refuse_bad_files_naming_them(tmp_path, deadline):
    for name, message in bad_images(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(ValueError, match=f"image file '{path}' {message}"):
            image_from_file(path, (1, 8, 8))
        with pytest.raises(ValueError, match=f"mask file '{path}' {message}"):
            mask_from_file(path, (1, 8, 8))


@pytest.mark.parametrize("name", ["fifo.png", "truncated.png", "bomb.png"])
def test_the_image_folder_loader_refuses_bad_files_naming_them(tmp_path, deadline, name):
    messages = bad_images(tmp_path / "all")
    folder = tmp_path / name.split(".")[0]
    folder.mkdir()
    write_png(folder / "good.png")
    os.replace(tmp_path / "all" / name, folder / name)
    with pytest.raises(ValueError, match=f"image '{folder / name}' {messages[name]}"):
        load_image_folder(folder, resolution=8, channels=1)


def test_good_images_still_load(tmp_path):
    write_png(tmp_path / "a.png")
    assert load_image_folder(tmp_path, resolution=4, channels=1).all().shape == (1, 1, 4, 4)
    assert float(image_from_file(tmp_path / "a.png", (1, 8, 8)).max()) == pytest.approx(200 / 127.5 - 1)
