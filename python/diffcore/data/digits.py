"""The 8x8 handwritten digits that scikit-learn ships (1797 images, 10 classes), embedded.

Stored as uint8 (the original 0..16 intensities scaled to 0..255) in ``files/digits_8x8.npz``,
so no download is needed at run time.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch


def load_digits(as_uint8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(images [1797, 1, 8, 8], labels [1797])``.

    Images are float32 in [-1, 1] by default, or the stored uint8 with ``as_uint8=True``
    (``x = u8 / 127.5 - 1``, the convention of every diffcore op that accepts uint8).
    """
    with resources.files("diffcore.data").joinpath("files/digits_8x8.npz").open("rb") as fh:
        archive = np.load(fh)
        images = torch.from_numpy(archive["images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(archive["labels"].astype(np.int64))
    if as_uint8:
        return images, labels
    return images.float() / 127.5 - 1.0, labels
