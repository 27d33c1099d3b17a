"""Images from a local folder (PNG/JPEG, read with Pillow), resized and center-cropped.

Layout: either ``root/<class_name>/*.png`` (one sub-folder per class; labels are the sorted
class names' indices) or ``root/*.png`` (all labels 0). A folder with images at its top level
*and* class sub-folders is refused (which label would the top-level images get?); hidden
sub-folders (``.name``) are ignored. Each image is converted to RGB (or L for ``channels=1``),
its shorter side resized to ``resolution`` (bicubic), then center-cropped to
``resolution x resolution``. Stored as uint8 ``[N, C, R, R]``. Without ``resolution`` the images
must all be square of one size, which is used; without ``channels`` it is 1 when every image is
grayscale, else 3.

:func:`read_image` is the package's one image decoder (the image folder, loco-edit's
``image_files`` and ``mask_files``): 16-bit grayscale PNGs are scaled by their bit depth
(``v * 255 / 65535``), never clipped; an alpha channel that is fully opaque is dropped, and an
image with any transparent pixel is refused (ValueError naming the file): diffcore does not
guess the background the transparent pixels stand on (Pillow alone would turn them black, or
whatever color they hide); flatten such images onto the background you mean first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffcore._files import MAX_IMAGE_BYTES, open_image, read_regular_file
from diffcore.data.dataset import ArrayDataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _pil():
    try:
        from PIL import Image
    except ImportError as error:  # pillow ships with matplotlib, a diffcore dependency
        raise ImportError("load_image_folder needs Pillow (pip install pillow)") from error
    return Image


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir()


def _list_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_level = sorted(p for p in root.iterdir() if _is_image(p))
    if class_dirs and top_level:
        raise ValueError(
            f"image folder {str(root)!r} holds {len(top_level)} images at its top level (e.g. "
            f"{top_level[0].name!r}) and class sub-folders ({', '.join(p.name for p in class_dirs[:3])}"
            f"{', ...' if len(class_dirs) > 3 else ''}): use one layout, root/*.png or "
            "root/<class>/*.png (move the top-level images into a class folder)"
        )
    if class_dirs:
        names = [p.name for p in class_dirs]
        files, labels = [], []
        for label, folder in enumerate(class_dirs):
            found = sorted(p for p in folder.iterdir() if _is_image(p))
            files += found
            labels += [label] * len(found)
        return files, labels, names
    return top_level, [0] * len(top_level), []


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


GRAYSCALE_MODES = ("1", "L", "LA", "I", "F") + SIXTEEN_BIT_MODES


def read_image(path, channels: int | None = 3, *, what: str = "image"):
    """The image file ``path`` as a PIL image of mode ``"RGB"`` (``channels=3``) or ``"L"`` (1),
    or as stored (``None``; only 16-bit scaling and alpha handling applied). 16-bit grayscale is
    scaled to 8 bits, an opaque alpha channel dropped, and transparency refused (module
    docstring). ValueError naming the file for an unreadable or transparent image."""
    _pil()
    opened = open_image(path, what=what)  # regular files only, bounded size, bombs refused
    try:
        image = _without_alpha(to_eight_bit(opened), path)
    except (OSError, ValueError) as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from error
    if channels is None:
        return image
    return image.convert("RGB" if channels == 3 else "L")


def _without_alpha(image, path):
    """``image`` without its alpha channel when every pixel is opaque; ValueError otherwise."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image
    alpha = np.asarray(image.getchannel("A"))
    if alpha.size and int(alpha.min()) < 255:
        raise ValueError(
            f"image {str(path)!r} has {int((alpha < 255).sum())} transparent pixels; diffcore "
            "does not guess their background: flatten it onto the background you mean "
            "(e.g. Image.alpha_composite) and save it without alpha"
        )
    return image.convert("L" if image.mode in ("LA", "La") else "RGB")


def _infer_layout(files: list[Path], root: Path) -> tuple[int, int]:
    """(resolution, channels) of images that all have one square size; channels 1 when all are
    grayscale. ValueError naming the folder otherwise."""
    sizes, gray = set(), True
    for path in files:
        size, mode = _header(path)
        sizes.add(size)
        gray = gray and mode in GRAYSCALE_MODES
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        raise ValueError(
            f"image folder {str(root)!r}: no resolution given and the images are not all square "
            f"of one size ({shown}); give the dataset a resolution"
        )
    return next(iter(sizes))[0], 1 if gray else 3


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


def load_image_folder(root, resolution: int | None = None, channels: int | None = None) -> ArrayDataset:
    """Every PNG/JPEG image under ``root`` as uint8 ``[N, channels, resolution, resolution]``.

    ``resolution`` None: the images' own size (all square, one size); ``channels`` None: 1 when
    every image is grayscale, else 3. Raises ``FileNotFoundError`` for a missing folder or a
    folder without images, and ``ValueError`` naming the file for an image that cannot be read
    or has transparent pixels (module docstring), or the folder for a mixed layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    files, labels, class_names = _list_images(root)
    if not files:
        raise FileNotFoundError(f"no PNG/JPEG images in {str(root)!r} (or its class sub-folders)")
    if resolution is None:
        resolution, own_channels = _infer_layout(files, root)
        channels = own_channels if channels is None else channels
    elif channels is None:
        channels = 1 if all(_is_grayscale(p) for p in files) else 3
    resolution = int(resolution)
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    arrays = []
    for path in files:
        array = np.asarray(resize_center_crop(read_image(path, channels), resolution), dtype=np.uint8)
        arrays.append(array.reshape(resolution, resolution, channels).transpose(2, 0, 1))
    log.info("loaded %d images from %s (%d classes)", len(files), root, max(1, len(class_names)))
    values = torch.from_numpy(np.stack(arrays))
    return ArrayDataset(
        values,
        torch.tensor(labels, dtype=torch.int64),
        num_classes=max(1, len(class_names)),
        name=f"folder:{root.name}",
    )


def _is_grayscale(path: Path) -> bool:
    return _header(path)[1] in GRAYSCALE_MODES


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(size, mode) from the image file's header, read as a bounded regular file (a FIFO or device
    is refused, never opened for reading)."""
    import io

    Image = _pil()
    data = read_regular_file(path, MAX_IMAGE_BYTES, what="image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size, image.mode
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from error
