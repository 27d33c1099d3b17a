"""EDM's non-leaky augmentation: geometric and colour transforms whose parameters are passed to the
model as augment labels (Karras et al. 2022, Appendix F.2; the pipeline of Karras et al. 2020).

Each image is transformed with probability ``p`` per transform (times the transform's multiplier),
and the model is conditioned on the labels ``[B, label_dim]`` that describe what was done; at
sampling time the labels are zero (no augmentation), so the augmentations do not leak into the
generated distribution. ``AugmentPipe()`` with its defaults is EDM's ``--augment=0.12`` setting:
x-flip (always drawn: half of the images), y-flip, isotropic scaling, rotation, anisotropic
scaling and translation, each with probability 0.12, and 9 labels (EDM's ``augment_dim=9``).
Colour transforms (brightness, contrast, saturation, hue) are off by default, as in EDM's
training script; enabling them adds labels.

Labels, in this order (a transform that is off contributes none): x-flip ``w``, y-flip ``w``,
scale ``w`` (``s = 2^(w scale_std)``), rotation ``cos(a) - 1, sin(a)``, anisotropic ``w cos(r),
w sin(r)``, translation ``w_x, w_y`` (``t = w * size * translate_std`` pixels), brightness ``w``,
contrast ``w``, hue ``cos(h) - 1, sin(h)``, saturation ``w``. A zero label row means the image
is unchanged (bitwise).

Resampling: the geometric transforms compose one inverse affine map per image (in pixel
coordinates about the image centre; output pixel ``p`` reads input ``G_inv p``), applied with
bicubic ``grid_sample`` and reflection padding. EDM instead pads by reflection, upsamples 2x with
a wavelet filter, resamples bilinearly and downsamples (less aliasing); the labels and the
distribution of transforms are the same.

Randomness comes from the ``torch.Generator`` passed in; :meth:`AugmentPipe.draw` draws the
parameters of a whole (global) batch, so that a rank can apply its slice and the result does not
depend on how the batch is split across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

GEOMETRIC = ("xflip", "yflip", "scale", "rotate", "aniso", "translate")
COLOUR = ("brightness", "contrast", "hue", "saturation")
_LABELS_PER_TRANSFORM = {
    "xflip": 1,
    "yflip": 1,
    "scale": 1,
    "rotate": 2,
    "aniso": 2,
    "translate": 2,
    "brightness": 1,
    "contrast": 1,
    "hue": 2,
    "saturation": 1,
}
_LUMA = (1.0 / math.sqrt(3.0),) * 3  # EDM's luma axis for hue and saturation (equal RGB weights)


@dataclass(frozen=True)
class AugmentPipe:
    """EDM's augmentation pipeline. ``p``: overall probability; each transform's value multiplies it
    (0 = off); the ``*_std``/``*_max`` fields set the spread of the transform parameters.

    ``pipe(images [B, C, H, W], generator) -> (augmented [B, C, H, W], labels [B, label_dim])``.
    """

    p: float = 0.12
    xflip: float = 1e8
    yflip: float = 1.0
    scale: float = 1.0
    rotate: float = 1.0
    aniso: float = 1.0
    translate: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0
    hue: float = 0.0
    saturation: float = 0.0
    scale_std: float = 0.2
    rotate_max: float = 1.0  # fraction of a half turn: angles in [-pi, pi] * rotate_max
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_std: float = 0.125  # relative to the image size
    brightness_std: float = 0.2
    contrast_std: float = 0.5
    hue_max: float = 1.0
    saturation_std: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"AugmentPipe: {f.name} must be a finite number >= 0, got {value!r}")
        if self.p > 1:
            raise ValueError(f"AugmentPipe: p must lie in [0, 1], got {self.p}")

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in GEOMETRIC + COLOUR if getattr(self, name) > 0)

    @property
    def label_dim(self) -> int:
        """Width of the augment labels (the model's ``augment_dim``): 9 for EDM's defaults."""
        return sum(_LABELS_PER_TRANSFORM[name] for name in self.enabled)

    # ------------------------------------------------------------------ drawing
    def draw(self, batch: int, generator: torch.Generator, device=None) -> dict[str, torch.Tensor]:
        """The random parameters of ``batch`` images, ``{transform: [batch, ...]}`` (float32).

        Index the rows (``{k: v[rows] for ...}``) to apply a slice of a global batch."""
        draws: dict[str, torch.Tensor] = {}

        def uniform(*shape):
            return torch.rand(shape, generator=generator, device=device)

        def normal(*shape):
            return torch.randn(shape, generator=generator, device=device)

        def gate(name, value):  # keep the value with probability multiplier * p, else 0
            keep = uniform(batch) < getattr(self, name) * self.p
            return torch.where(keep.reshape(-1, *([1] * (value.dim() - 1))), value, torch.zeros_like(value))

        if self.xflip > 0:
            draws["xflip"] = gate("xflip", torch.randint(0, 2, (batch,), generator=generator, device=device).float())
        if self.yflip > 0:
            draws["yflip"] = gate("yflip", torch.randint(0, 2, (batch,), generator=generator, device=device).float())
        if self.scale > 0:
            draws["scale"] = gate("scale", normal(batch))
        if self.rotate > 0:
            draws["rotate"] = gate("rotate", (uniform(batch) * 2 - 1) * math.pi * self.rotate_max)
        if self.aniso > 0:
            w = gate("aniso", normal(batch))
            r = (uniform(batch) * 2 - 1) * math.pi
            r = torch.where(uniform(batch) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            draws["aniso"] = torch.stack([w, r], dim=1)
        if self.translate > 0:
            draws["translate"] = gate("translate", normal(batch, 2))
        for name in COLOUR:
            if getattr(self, name) > 0:
                value = (uniform(batch) * 2 - 1) * math.pi * self.hue_max if name == "hue" else normal(batch)
                draws[name] = gate(name, value)
        return draws

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images, self.draw(images.shape[0], generator, images.device))

    # ------------------------------------------------------------------ applying
    def apply(self, images: torch.Tensor, draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform ``images [B, C, H, W]`` with ``draws`` (from :meth:`draw`); returns ``(images, labels)``."""
        if images.dim() != 4:
            raise ValueError(f"AugmentPipe: images must be [B, C, H, W], got {tuple(images.shape)}")
        if ("hue" in draws or "saturation" in draws) and images.shape[1] != 3:
            raise ValueError(f"AugmentPipe: hue and saturation need 3 channels, images have {images.shape[1]}")
        n, _, height, width = images.shape
        x = images
        if "xflip" in draws:
            x = torch.where(draws["xflip"].reshape(n, 1, 1, 1) > 0, x.flip(3), x)
        if "yflip" in draws:
            x = torch.where(draws["yflip"].reshape(n, 1, 1, 1) > 0, x.flip(2), x)
        x = self._geometric(x, draws)
        x = self._colour(x, draws)
        return x, self.labels(draws, n, images.device)

    def labels(self, draws: dict[str, torch.Tensor], batch: int, device=None) -> torch.Tensor:
        """The augment labels ``[batch, label_dim]`` of ``draws`` (zero where nothing was done)."""
        columns = []
        for name in self.enabled:
            d = draws[name]
            if name in ("rotate", "hue"):
                columns += [d.cos() - 1, d.sin()]
            elif name == "aniso":
                columns += [d[:, 0] * d[:, 1].cos(), d[:, 0] * d[:, 1].sin()]
            elif name == "translate":
                columns += [d[:, 0], d[:, 1]]
            else:
                columns.append(d)
        if not columns:
            return torch.zeros(batch, 0, device=device)
        return torch.stack(columns, dim=1).float()

    def inverse_matrix(self, draws: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """``[B, 3, 3]`` float64: output pixel ``p`` (centred pixel coordinates, x right, y down)
        reads input pixel ``G_inv p``. Scale ``s``, rotation ``a``, anisotropy and translation ``t``
        compose as in EDM: ``G_inv = S(1/s) R(a) [R(r) S(1/s', s') R(-r)] T(-t)``."""
        draws = {name: value.detach().cpu() for name, value in draws.items()}  # small: composed on the CPU
        batch = next(iter(draws.values())).shape[0]
        g = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
        if "scale" in draws:
            s = (draws["scale"].double() * self.scale_std).exp2()
            g = g @ _scale(1 / s, 1 / s)
        if "rotate" in draws:
            g = g @ _rotate(draws["rotate"].double())
        if "aniso" in draws:
            w, r = draws["aniso"].double().unbind(1)
            s = (w * self.aniso_std).exp2()
            g = g @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)
        if "translate" in draws:
            t = draws["translate"].double()
            g = g @ _translate(-t[:, 0] * width * self.translate_std, -t[:, 1] * height * self.translate_std)
        return g

    def _geometric(self, x: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        if not any(name in draws for name in ("scale", "rotate", "aniso", "translate")):
            return x
        n, _, height, width = x.shape
        g = self.inverse_matrix(draws, height, width)
        moved = (g - torch.eye(3, dtype=torch.float64)).abs().amax(dim=(1, 2)) > 0
        if not moved.any():
            return x
        # pixel coordinates about the centre -> grid_sample's [-1, 1] (align_corners=False): x * 2 / W
        to_unit = torch.diag(torch.tensor([2.0 / width, 2.0 / height, 1.0], dtype=torch.float64))
        theta = (to_unit @ g[moved] @ torch.linalg.inv(to_unit))[:, :2, :]
        grid = F.affine_grid(
            theta.to(x.device, torch.float32), [int(moved.sum()), x.shape[1], height, width], align_corners=False
        )
        resampled = F.grid_sample(
            x[moved.to(x.device)].float(), grid, mode="bicubic", padding_mode="reflection", align_corners=False
        )
        out = x.clone()
        out[moved.to(x.device)] = resampled.to(x.dtype)
        return out

    def _colour(self, x: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        if "brightness" in draws:
            x = x + (draws["brightness"] * self.brightness_std).reshape(n, 1, 1, 1).to(x.dtype)
        if "contrast" in draws:  # about 0, the middle of [-1, 1] (as EDM's colour matrix)
            x = x * (draws["contrast"] * self.contrast_std).exp2().reshape(n, 1, 1, 1).to(x.dtype)
        if "hue" in draws or "saturation" in draws:
            x = self._luma_transforms(x, draws)
        return x

    def _luma_transforms(self, x: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hue: rotation about the luma axis; saturation: scaling away from it (3 channels)."""
        n = x.shape[0]
        axis = torch.tensor(_LUMA, dtype=torch.float64)
        along = torch.outer(axis, axis)  # projection on the luma axis
        m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        if "hue" in draws:
            h = draws["hue"].double().cpu()
            cross = torch.tensor(
                [[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64
            )
            rot = (
                h.cos().reshape(n, 1, 1) * (torch.eye(3, dtype=torch.float64) - along)
                + along
                + h.sin().reshape(n, 1, 1) * cross
            )  # Rodrigues' rotation about the axis
            m = rot @ m
        if "saturation" in draws:
            s = (draws["saturation"].double().cpu() * self.saturation_std).exp2().reshape(n, 1, 1)
            m = (along + (torch.eye(3, dtype=torch.float64) - along) * s) @ m
        return torch.einsum("nij,njhw->nihw", m.to(x.device, x.dtype), x)


def _stack_matrix(rows, like: torch.Tensor) -> torch.Tensor:
    entries = [
        entry if isinstance(entry, torch.Tensor) else torch.full_like(like, float(entry))
        for row in rows
        for entry in row
    ]
    return torch.stack(entries, dim=-1).reshape(*like.shape, 3, 3)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _stack_matrix(((sx, 0, 0), (0, sy, 0), (0, 0, 1)), sx)


def _rotate(angle: torch.Tensor) -> torch.Tensor:
    c, s = angle.cos(), angle.sin()
    return _stack_matrix(((c, -s, 0), (s, c, 0), (0, 0, 1)), angle)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _stack_matrix(((1, 0, tx), (0, 1, ty), (0, 0, 1)), tx)
