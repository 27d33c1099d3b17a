"""Watermark evaluation: detection ROC, image consistency (PSNR, SSIM) and attacks (docs/papers.md section 6).

Scores follow "higher = more likely watermarked" (pass ``-distance`` for the L1 key distance).

Attacks act on images ``[B, C, H, W]`` in [-1, 1] and return the same shape. Every attack first
quantizes to 8 bits (as saving the image would), so ``none`` is the 8-bit image. Pillow does
JPEG, blur, brightness, resizing and cropping. The papers' parameters (Tree-Ring; Shallow Diffuse's
``arguments.py``) are for 512 px (Stable Diffusion) images; those that are lengths scale with the
image side, relative to ``reference_size`` (default 256, the paper preset's pixel-space model):

| attack | what | parameter |
| --- | --- | --- |
| ``jpeg`` | JPEG round trip | quality 25 |
| ``blur`` | Gaussian blur | radius ``4 * H / reference_size`` px (Pillow's radius = the Gaussian's std) |
| ``noise`` | additive Gaussian noise, clipped | std 0.1 on the [0, 1] scale (0.2 in [-1, 1]), seeded per image |
| ``brightness`` | brightness jitter (as ColorJitter(brightness=6)) | factor uniform in [0, 7], seeded per image |
| ``resize`` | downscale then upscale back (bicubic) | side x 0.5 |
| ``crop`` | centre crop, resized back to the full size (bicubic) | keeps 0.75 of each side |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffcore._checks import check_tensor

ATTACKS = ("none", "jpeg", "blur", "noise", "brightness", "resize", "crop")


# ----------------------------------------------------------------------------- detection


def _scores(name: str, values) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name}: expected at least one score")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return t


def roc_auc(positives, negatives) -> float:
    """Area under the ROC curve: ``P(score_pos > score_neg) + P(tie) / 2`` over all pairs
    (the Mann-Whitney statistic; exact, ties count half)."""
    pos, neg = _scores("positives", positives), _scores("negatives", negatives)
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def tpr_at_fpr(positives, negatives, fpr: float = 0.01) -> float:
    """True-positive rate at a false-positive rate of at most ``fpr``: the threshold is the
    ``(m+1)``-th largest negative score with ``m = floor(fpr * n_neg)`` false positives allowed,
    and a positive counts when its score is strictly above it. With fewer than ``1/fpr`` negatives
    m = 0: the threshold is the largest negative score."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr: expected a value in [0, 1), got {fpr!r}")
    pos, neg = _scores("positives", positives), _scores("negatives", negatives)
    allowed = int(np.floor(fpr * neg.numel() + 1e-9))
    threshold = neg.sort(descending=True).values[allowed]
    return float((pos > threshold).double().mean())


def roc_curve(positives, negatives) -> tuple[list[float], list[float]]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    pos, neg = _scores("positives", positives), _scores("negatives", negatives)
    thresholds = torch.cat([pos, neg]).unique().flip(0)
    fpr, tpr = [0.0], [0.0]
    for t in thresholds.tolist():
        fpr.append(float((neg >= t).double().mean()))
        tpr.append(float((pos >= t).double().mean()))
    return fpr, tpr


# ----------------------------------------------------------------------------- consistency


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    check_tensor("a", a, ndim=4)
    check_tensor("b", b, ndim=4)
    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} (like a), got {tuple(b.shape)}")
    return a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR [B] in dB of images ``a``, ``b`` [B, C, H, W] (``data_range`` 2 for [-1, 1]):
    ``10 log10(range^2 / MSE)`` (``skimage.metrics.peak_signal_noise_ratio``; inf when equal)."""
    from skimage.metrics import peak_signal_noise_ratio

    x, y = _pair(a, b)
    with np.errstate(divide="ignore"):
        return torch.tensor(
            [peak_signal_noise_ratio(x[i], y[i], data_range=data_range) for i in range(len(x))], dtype=torch.float64
        )


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """SSIM [B] of images ``a``, ``b`` [B, C, H, W] (``skimage.metrics.structural_similarity``:
    7x7 uniform window, K1 = 0.01, K2 = 0.03, channels averaged)."""
    from skimage.metrics import structural_similarity

    x, y = _pair(a, b)
    return torch.tensor(
        [structural_similarity(x[i], y[i], data_range=data_range, channel_axis=0) for i in range(len(x))],
        dtype=torch.float64,
    )


# ----------------------------------------------------------------------------- attacks


@dataclass(frozen=True)
class AttackParams:
    """The attacks' parameters (see the module docstring)."""

    jpeg_quality: int = 25
    blur_radius: float = 4.0  # px at reference_size
    noise_std: float = 0.1  # on the [0, 1] scale
    brightness: float = 6.0  # factor uniform in [max(0, 1 - b), 1 + b]
    resize_scale: float = 0.5
    crop_fraction: float = 0.75
    reference_size: int = 256
    seed: int = 0

    def validate(self) -> None:
        checks = {
            "jpeg_quality": 1 <= self.jpeg_quality <= 95,
            "blur_radius": self.blur_radius >= 0,
            "noise_std": self.noise_std >= 0,
            "brightness": self.brightness >= 0,
            "resize_scale": 0 < self.resize_scale <= 1,
            "crop_fraction": 0 < self.crop_fraction <= 1,
            "reference_size": self.reference_size >= 1,
            "seed": self.seed >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: out of range, got {getattr(self, name)!r}")

    def scaled_blur_radius(self, size: int) -> float:
        return self.blur_radius * size / self.reference_size


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C] (rounded, clipped)."""
    x = ((images.detach().double().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _pil_images(array: np.ndarray):
    from PIL import Image

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]


def _from_pil(images, channels: int) -> np.ndarray:
    arrays = [np.asarray(img) for img in images]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])[..., :channels]


def _jpeg(img, p, size, g):
    import io

    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=p.jpeg_quality)
    buf.seek(0)
    return Image.open(buf).convert(img.mode)


def _blur(img, p, size, g):
    from PIL import ImageFilter

    return img.filter(ImageFilter.GaussianBlur(radius=p.scaled_blur_radius(size)))


def _brightness(img, p, size, g):
    from PIL import ImageEnhance

    low, high = max(0.0, 1.0 - p.brightness), 1.0 + p.brightness
    factor = low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))
    return ImageEnhance.Brightness(img).enhance(factor)


def _resize(img, p, size, g):
    from PIL import Image

    w, h = img.size
    small = img.resize((max(1, round(w * p.resize_scale)), max(1, round(h * p.resize_scale))), Image.BICUBIC)
    return small.resize((w, h), Image.BICUBIC)


def _crop(img, p, size, g):
    from PIL import Image

    w, h = img.size
    cw, ch = max(1, round(w * p.crop_fraction)), max(1, round(h * p.crop_fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)


_PIL_ATTACKS = {"jpeg": _jpeg, "blur": _blur, "brightness": _brightness, "resize": _resize, "crop": _crop}


def attack(images: torch.Tensor, name: str, params: AttackParams | None = None) -> torch.Tensor:
    """Apply attack ``name`` (one of :data:`ATTACKS`) to ``images`` [B, C, H, W] in [-1, 1] (C = 1
    or 3); returns float32 [B, C, H, W] in [-1, 1]. Random attacks draw from one generator per
    image seeded with ``params.seed + index``, so image i's attack does not depend on the batch."""
    check_tensor("images", images, ndim=4)
    if name not in ATTACKS:
        raise ValueError(f"name: expected one of {', '.join(ATTACKS)}, got {name!r}")
    channels, size = images.shape[1], min(images.shape[2:])
    if channels not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels (gray or RGB images), got {channels}")
    params = params or AttackParams()
    params.validate()
    array = to_uint8(images)
    generators = [torch.Generator().manual_seed(params.seed + i) for i in range(len(array))]
    if name == "none":
        return from_uint8(array)
    if name == "noise":
        x = from_uint8(array).double()
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in generators])
        return (x + 2.0 * params.noise_std * noise).clamp(-1, 1).float()
    fn = _PIL_ATTACKS[name]
    out = [fn(img, params, size, g) for img, g in zip(_pil_images(array), generators)]
    return from_uint8(_from_pil(out, channels))


__all__ = [
    "ATTACKS",
    "AttackParams",
    "attack",
    "from_uint8",
    "psnr",
    "roc_auc",
    "roc_curve",
    "ssim",
    "to_uint8",
    "tpr_at_fpr",
]
