"""Images from a local folder (PNG/JPEG, read with Pillow), resized and center-cropped.

Layout: either ``root/<class_name>/*.png`` (one sub-folder per class; labels are the sorted
class names' indices) or ``root/*.png`` (all labels 0). Each image is converted to RGB (or L for
``channels=1``), its shorter side resized to ``resolution`` (bicubic), then center-cropped to
``resolution x resolution``. Stored as uint8 ``[N, C, R, R]``. 16-bit grayscale PNGs are scaled
by their bit depth (``v * 255 / 65535``), never clipped.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffcore._files import open_image
from diffcore.data.dataset import ArrayDataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _pil():
    try:
        from PIL import Image
    except ImportError as error:  # pillow ships with matplotlib, a diffcore dependency
        raise ImportError("load_image_folder needs Pillow (pip install pillow)") from error
    return Image


def _list_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if class_dirs:
        names = [p.name for p in class_dirs]
        files, labels = [], []
        for label, folder in enumerate(class_dirs):
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
        return files, labels, names
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files, [0] * len(files), []


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes of 16-bit grayscale PNGs


def to_eight_bit(image):
    """A PIL image whose 16-bit grayscale pixels are scaled to 8 bits (``round(v * 255 / 65535)``);
    8-bit images unchanged. Raises ValueError for values beyond 16 bits."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{image.mode} pixels outside 0 .. 65535 (expected a 16-bit grayscale image)")
    eight = np.rint(values * (255 / 65535)).astype(np.uint8)
    return _pil().fromarray(eight, mode="L")


def resize_center_crop(image, resolution: int):
    """PIL image -> PIL image of ``resolution x resolution``: shorter side resized, center crop."""
    Image = _pil()
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.BICUBIC)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image_folder(root, resolution: int, channels: int = 3) -> ArrayDataset:
    """Every PNG/JPEG image under ``root`` as uint8 ``[N, channels, resolution, resolution]``.

    Raises ``FileNotFoundError`` for a missing folder or a folder without images, and
    ``ValueError`` naming the file for an image Pillow cannot read.
    """
    root = Path(root)
    resolution = int(resolution)
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    files, labels, class_names = _list_images(root)
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG images in {str(root)!r} (or its class sub-folders)")
    _pil()
    arrays = []
    for path in files:
        image = open_image(path, what="image")  # regular files only, decoded, bombs refused
        try:
            image = to_eight_bit(image).convert("RGB" if channels == 3 else "L")
            array = np.asarray(resize_center_crop(image, resolution), dtype=np.uint8)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read image {str(path)!r}: {error}") from error
        arrays.append(array.reshape(resolution, resolution, channels).transpose(2, 0, 1))
    log.info("loaded %d images from %s (%d classes)", len(files), root, max(1, len(class_names)))
    values = torch.from_numpy(np.stack(arrays))
    return ArrayDataset(values, torch.tensor(labels, dtype=torch.int64),
                        num_classes=max(1, len(class_names)), name=f"folder:{root.name}")
