"""LOCO Edit: local, training-free image editing along low-rank Jacobian directions (docs/papers.md
section 5), on any denoiser (no diffusers needed except to read a diffusers model folder).

Per image (a dataset image inverted to the edit time, a generated sample stopped there, or an image
file): the Jacobian's numerical rank at the edit time (whole image and inside the mask), the top
``rank`` LOCO directions (``diffcore.analysis.loco_directions``: masked Jacobian, null-space
projection of the top ``k_out`` outside directions), edits ``x_t + s v`` at each strength of both
signs sampled back to images (with and without the projection for the first direction), and the
sum of the first two directions (composition). Then every image's first direction applied to
every image (transfer). Measured per edit: locality (energy of the change inside the mask over
outside, and the inside fraction), the outside masked MSE, linearity (cosine of the +s / -s changes,
growth of the change with s; and the posterior-mean predictor's own local linearity), the time per
direction (wall and CPU), and transfer locality.

Controls (small images, full Jacobians; one unit per edit time of the sweep): per image and
mask, the LOCO direction against a random direction and the Gaussian denoiser's top masked
direction under the same null-space projection and strengths, and against itself unprojected; the
Jacobian's numerical rank, the edits' locality and x0_hat's linearity against the edit time; a
per-image success (inside fraction >= ``success_fraction``) with Wilson intervals; claims decided on
bootstrap intervals over images (``results["claims"]``).

Outputs: ``results.json``, ``edits.csv``, ``transfer.csv``, ``edits.png``, ``transfer.png``,
``spectrum.png``, ``controls.png``, ``timings.json``; per image a unit with ``directions.safetensors`` (load with
``diffcore.analysis.load_directions``), the latent and the edited images.

Models: the digits UNet diffcore trains (reused from a reproducibility run's folder with
``models_from`` when it holds the model ``w{width}-n{train_size}-s{train_seed}``, otherwise trained
here as a resumable unit), or a diffusers ``UNet2DModel`` folder with its scheduler
(``diffusers_dir``: the paper preset).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcore._files import load_json, open_image
from diffcore.experiments import base
from diffcore.metrics.intervals import Interval

log = logging.getLogger(__name__)

NAME = "loco-edit"
IMAGE_SOURCES = ("dataset", "generated", "files")
NAMED_MASKS = ("upper-half", "lower-half", "left-half", "right-half", "center")
CONTROL_KINDS = ("loco", "unprojected", "random", "gaussian")  # the controls' directions, in this order
SUBSPACE_METHODS = ("subspace", "randomized", "lanczos")


@dataclass(frozen=True)
class LocoEditConfig:
    """What the study computes (all fields define the results; ``run``'s device and progress do not)."""

    # the model: a diffusers folder, or the digits UNet (reused from models_from, else trained)
    diffusers_dir: str = ""  # local folder: UNet2DModel (root or unet/) + scheduler config
    models_from: str = ""  # a reproducibility study's --out folder
    dataset: str = "digits"
    data_root: str = ""
    model_preset: str = "ddpmpp-digits-light"
    width: int = 32
    train_size: int = 1797  # N training images (1797 = all digits: the generalizing model)
    train_seed: int = 0
    subset_seed: int = 0
    train_steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_warmup_images: int = 1000
    # images and their region of interest
    image_source: str = "dataset"  # dataset | generated | files
    image_indices: tuple[int, ...] = (0, 1, 2, 3)  # dataset images
    image_seeds: tuple[int, ...] = (0, 1, 2, 3)  # generated images: x_T = sigma(t=1) * noise(seed)
    image_files: tuple[str, ...] = ()  # image files (resized to the model's resolution)
    mask: str = "upper-half"  # upper-half | lower-half | left-half | right-half | center |
    # box:r0,r1,c0,c1 (fractions of height/width) | an image file
    mask_files: tuple[str, ...] = ()  # one mask image per image (white = inside); overrides mask
    # the edit
    edit_time: float = 0.6  # fraction of the DDPM horizon T (paper: 0.6 T)
    inversion_steps: int = 100  # steps over the whole horizon (paper: 100)
    solver: str = "ddim"
    stochastic_below: float = 0.0  # ancestral steps below this time (paper's script: 0.2); 0 = none
    noise_seed: int = 0  # seeds of those steps: noise_seed + image position
    rank: int = 2  # directions per image (top of the masked Jacobian)
    k_out: int = 5  # outside directions projected out
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0)  # each used with both signs
    subspace_method: str = "subspace"
    subspace_iters: int = 50
    subspace_tol: float = 1e-4
    spectrum_k: int = 0  # 0: exact full spectrum (small images); else top-k + Hutchinson
    spectrum_probes: int = 32  # Hutchinson probes of the rest of |J|_F^2 (with spectrum_k > 0)
    rank_ratio: float = 0.99  # numerical rank: top k carry ratio^2 of |J|_F^2
    transfer: bool = True
    torch_threads: int = 1  # CPU intra-op threads (0: torch's default)
    # the full per-image units (subspace-iteration directions, composition, transfer, edits.png) run
    # on the first `detail_images` images (0: all); the controls below run on every image
    detail_images: int = 0
    # controls (small images: full Jacobians): per image, mask and edit time the LOCO direction
    # against a random direction and the Gaussian denoiser's top masked direction, all under the
    # same null-space projection and strengths, and the LOCO direction unprojected. () = none.
    control_masks: tuple[str, ...] = ("upper-half", "lower-half", "center")
    sweep_times: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)  # edit times of the sweep (edit_time added)
    control_seed: int = 0  # the random directions: seed control_seed + image position
    success_fraction: float = 0.7  # an image's projected edit succeeds when its inside fraction >= this
    low_rank_fraction: float = 0.5  # "low rank": numerical rank below this fraction of the dimension
    linearity_tolerance: float = 0.1  # "locally linear": x0_hat's relative first-order error below this

    def validate(self) -> None:
        """Raise ConfigError naming the first field that is out of range."""
        base.check_fields(self, FIELD_CHECKS)
        if not self.stochastic_below < self.edit_time:
            raise base.ConfigError(
                f"stochastic_below: expected a time in [0, edit_time = {self.edit_time}), got {self.stochastic_below!r}"
            )
        if list(self.strengths) != sorted(self.strengths):
            raise base.ConfigError(f"strengths: expected distinct values in ascending order, got {self.strengths!r}")
        images, field = self.images(), self.image_field()
        if not images and self.image_source != "files":  # files: the paper preset names none (run checks)
            raise base.ConfigError(f"{field}: expected at least one image for image_source={self.image_source!r}")
        base.check_seed_range("noise_seed", self.noise_seed, len(images))  # noise_seed + image position
        if self.mask_files and len(self.mask_files) != len(images):
            raise base.ConfigError(
                f"mask_files: expected one mask per image ({len(images)}), got {len(self.mask_files)}"
            )
        if not self.mask_files:
            _check_mask_spec(self.mask)
        for i, spec in enumerate(self.control_masks):
            if spec not in NAMED_MASKS and not spec.startswith("box:"):
                raise base.ConfigError(
                    f"control_masks[{i}]: expected one of {', '.join(NAMED_MASKS)} or box:r0,r1,c0,c1, got {spec!r}"
                )
            try:
                _check_mask_spec(spec)
            except base.ConfigError as error:
                raise base.ConfigError(f"control_masks[{i}]: {error}") from None
        if self.control_masks and self.diffusers_dir:
            raise base.ConfigError(
                "control_masks: the controls need full Jacobians (small images, the digits model); "
                "set control_masks= (empty) with diffusers_dir"
            )
        if self.image_source == "dataset" and self.diffusers_dir:
            raise base.ConfigError(
                "image_source: 'dataset' needs the digits model; with diffusers_dir use 'files' or 'generated'"
            )

    def images(self) -> tuple:
        """The images of ``image_source``: dataset indices, seeds or file paths."""
        return getattr(self, self.image_field())

    def detail(self) -> tuple:
        """The images that get the full per-image units (the first ``detail_images``; 0: all)."""
        images = self.images()
        return images if self.detail_images == 0 else images[: self.detail_images]

    def edit_times(self) -> tuple[float, ...]:
        """The sweep's edit times, ascending, ``edit_time`` included."""
        return tuple(sorted({*self.sweep_times, self.edit_time}))

    def image_field(self) -> str:
        return {"dataset": "image_indices", "generated": "image_seeds", "files": "image_files"}[self.image_source]


def _open_fraction(name: str, value) -> None:
    """A number in (0, 1)."""
    _FRACTION(name, value)
    if value >= 1:
        raise base.ConfigError(f"{name}: expected a number in (0, 1), got {value!r}")


def _paths(name: str, value) -> None:
    """A tuple of strings, repeats allowed (one mask file may serve several images)."""
    if not isinstance(value, tuple):
        raise base.ConfigError(f"{name}: expected comma-separated values, got {value!r}")
    for i, item in enumerate(value):
        base.text(f"{name}[{i}]", item)


_FRACTION = base.fraction
MAX_STEPS = 10_000  # inversion / sampling steps: the paper uses 100; beyond this a grid only wastes memory
FIELD_CHECKS: dict[str, base.Check] = {
    "diffusers_dir": base.text,
    "train_size": base.positive,
    "image_source": base.one_of(*IMAGE_SOURCES),
    "image_indices": base.tuple_of(base.count, min_len=0),  # at least one for the chosen image_source: validate
    "image_seeds": base.tuple_of(base.seed, min_len=0),
    "image_files": base.tuple_of(base.text, min_len=0),
    "mask": base.text,
    "mask_files": _paths,
    "edit_time": _open_fraction,
    "inversion_steps": base.integer(1, MAX_STEPS),
    "stochastic_below": base.number(0),
    "noise_seed": base.seed,
    "rank": base.positive,
    "k_out": base.count,
    "strengths": base.tuple_of(base.number(0, 1e4, lo_open=True)),
    "subspace_method": base.one_of(*SUBSPACE_METHODS),
    "subspace_iters": base.positive,
    "subspace_tol": _open_fraction,
    "spectrum_k": base.count,
    "spectrum_probes": base.positive,
    "rank_ratio": _FRACTION,
    "transfer": base.boolean,
    "detail_images": base.count,
    "control_masks": base.tuple_of(base.text, min_len=0),
    "sweep_times": base.tuple_of(_open_fraction, min_len=0),
    "success_fraction": _open_fraction,
    "low_rank_fraction": _open_fraction,
    "linearity_tolerance": _open_fraction,
}
MAX_CONTROL_DIM = 4096  # the controls' full Jacobians are d x d per image (64 x 64 for the digits)


def _check_mask_spec(spec: str) -> None:
    if spec in NAMED_MASKS:
        return
    if spec.startswith("box:"):
        parts = spec[4:].split(",")
        try:
            r0, r1, c0, c1 = (float(p) for p in parts)
        except ValueError:
            raise base.ConfigError(
                f"mask: expected box:r0,r1,c0,c1 (fractions of height and width), got {spec!r}"
            ) from None
        if not (0 <= r0 < r1 <= 1 and 0 <= c0 < c1 <= 1):
            raise base.ConfigError(
                f"mask: box fractions must satisfy 0 <= r0 < r1 <= 1 and 0 <= c0 < c1 <= 1, got {spec!r}"
            )
        return
    if not spec or not Path(spec).is_file():
        raise base.ConfigError(
            f"mask: expected one of {', '.join(NAMED_MASKS)}, box:r0,r1,c0,c1 or an image file, got {spec!r}"
        )


def _quick() -> LocoEditConfig:
    """The digits UNet (width 32, all 1797 digits: the main job's generalizing model; reused with
    ``--set models_from=<reproducibility --out>``, else trained: 207 s CPU with AVX2), 16 dataset
    digits (the first 4 with the full per-image units and transfer, upper-half mask), edit time 0.6 T
    (the paper's), controls on the three masks (upper and lower half, centre square) at edit times
    0.2 .. 0.8 T. Times in docs/studies.md."""
    return LocoEditConfig(edit_time=0.6, image_indices=tuple(range(16)), detail_images=4)


def _tiny() -> LocoEditConfig:
    """Seconds, with stand-in hooks (tests): 3 images, 10 inversion steps, one direction."""
    return LocoEditConfig(
        width=4,
        train_steps=10,
        batch_size=16,
        image_indices=(0, 1, 2),
        edit_time=0.4,
        inversion_steps=10,
        rank=2,
        k_out=3,
        strengths=(1.0, 2.0),
        subspace_iters=30,
        sweep_times=(0.2, 0.8),
    )


def _paper() -> LocoEditConfig:
    """A pixel-space diffusers UNet2DModel with its scheduler (e.g. a DDPM CelebA-HQ 256 folder;
    set diffusers_dir, image_files and mask_files): edit time 0.6 T, 100 inversion steps, strengths
    up to 16 steps of 0.5 (= 8) both ways, one direction, 5 outside directions projected out,
    ancestral steps below 0.2 T as the authors' script does; top-32 spectrum (GPU)."""
    return LocoEditConfig(
        diffusers_dir="models/ddpm-celebahq-256",
        image_source="files",
        image_files=(),
        mask="center",
        edit_time=0.6,
        inversion_steps=100,
        rank=1,
        k_out=5,
        strengths=(2.0, 4.0, 8.0),
        stochastic_below=0.2,
        spectrum_k=32,
        subspace_iters=50,
        torch_threads=0,
        control_masks=(),
    )


PRESETS: dict[str, Callable[[], LocoEditConfig]] = {"quick": _quick, "tiny": _tiny, "paper": _paper}
CONFIG_CLASS = LocoEditConfig


# ----------------------------------------------------------------------------- hooks
@dataclass
class LocoHooks:
    """What the study needs from the stack (injectable for tests).

    - ``load_dataset(name, root) -> images [P, C, H, W]`` in [-1, 1]
    - ``subset(images, n, seed) -> (images [n, ...], indices)``
    - ``train(images, spec, out_dir, work_dir, device=, progress=) -> dict`` writes a model to out_dir
    - ``load(model_dir, device=) -> D(x, sigma)``
    - ``load_diffusers(folder, device=) -> (D(x, sigma), alphas_cumprod [T], image shape (C, H, W))``
    """

    load_dataset: Callable
    subset: Callable
    train: Callable
    load: Callable
    load_diffusers: Callable


def default_hooks() -> LocoHooks:
    from diffcore.experiments import _stack

    return LocoHooks(
        load_dataset=_stack.load_dataset,
        subset=_stack.subset,
        train=_stack.train_model,
        load=_stack.load_model,
        load_diffusers=load_diffusers_denoiser,
    )


def load_diffusers_denoiser(folder, device="cpu"):
    """A local diffusers folder as ``(D(x, sigma), alphas_cumprod [T] float64, (C, H, W))``, offline
    (``diffcore.sampler.load_diffusers_folder``: weights, scheduler, and the JVP-safe attention)."""
    from diffcore.sampler.adapters import load_diffusers_folder

    loaded = load_diffusers_folder(folder, device, argument="diffusers_dir")
    return loaded.denoiser, loaded.alphas_cumprod, loaded.shape


# ----------------------------------------------------------------------------- masks and image files
def grid_mask(spec: str, shape) -> torch.Tensor:
    """A named or box mask [C, H, W] (float 0/1) on the image grid; ``spec`` as the config's ``mask``."""
    c, h, w = shape
    m = torch.zeros(h, w, dtype=torch.float64)
    if spec == "upper-half":
        m[: h // 2] = 1
    elif spec == "lower-half":
        m[h // 2 :] = 1
    elif spec == "left-half":
        m[:, : w // 2] = 1
    elif spec == "right-half":
        m[:, w // 2 :] = 1
    elif spec == "center":
        m[h // 4 : h - h // 4, w // 4 : w - w // 4] = 1
    elif spec.startswith("box:"):
        r0, r1, c0, c1 = (float(p) for p in spec[4:].split(","))
        m[
            round(r0 * h) : max(round(r1 * h), round(r0 * h) + 1), round(c0 * w) : max(round(c1 * w), round(c0 * w) + 1)
        ] = 1
    else:
        return mask_from_file(spec, shape)
    return m.expand(c, h, w).contiguous()


def mask_from_file(path, shape) -> torch.Tensor:
    """An image file as a mask [C, H, W]: grayscale, resized (nearest) to H x W, inside where >= 50 %."""
    import numpy as np
    from PIL import Image

    from diffcore.data.image_folder import read_image

    c, h, w = shape
    gray = read_image(path, channels=1, what="mask file").resize((w, h), Image.NEAREST)
    values = torch.from_numpy(np.array(gray, dtype=np.float64)) / 255.0
    m = (values >= 0.5).to(torch.float64)
    if float(m.sum()) == 0:
        raise ValueError(f"mask: {path} has no pixel inside (white = inside)")
    return m.expand(c, h, w).contiguous()


def image_from_file(path, shape) -> torch.Tensor:
    """An image file as [C, H, W] in [-1, 1] (RGB or grayscale by C, resized bicubically to H x W),
    decoded by the package's one image reader (:func:`diffcore.data.image_folder.read_image`)."""
    import numpy as np
    from PIL import Image

    from diffcore.data.image_folder import read_image

    c, h, w = shape
    if c not in (1, 3):
        raise ValueError(f"image_files: the model has {c} channels; image files give 1 or 3")
    img = read_image(path, channels=c, what="image file").resize((w, h), Image.BICUBIC)
    data = torch.from_numpy(np.array(img, dtype=np.float32)).reshape(h, w, c)
    return data.permute(2, 0, 1) / 127.5 - 1.0


# ----------------------------------------------------------------------------- the study
class _Study:
    def __init__(self, config: LocoEditConfig, out, hooks: LocoHooks, device: str, progress: bool):
        self.c, self.hooks, self.device, self.progress = config, hooks, device, progress
        self.ws = base.Workspace(out)

    # model ----------------------------------------------------------------------
    def model_spec(self) -> dict:
        c = self.c
        if c.diffusers_dir:
            return {
                "diffusers_dir": str(Path(c.diffusers_dir).resolve()),
                "weights_sha256": base.folder_digest(c.diffusers_dir),
            }
        return {
            "dataset": c.dataset,
            "n": c.train_size,
            "subset_seed": c.subset_seed,
            "data_root": c.data_root,
            "model_preset": c.model_preset,
            "width": c.width,
            "seed": c.train_seed,
            "train_steps": c.train_steps,
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "lr_warmup_images": c.lr_warmup_images,
            **base.data_digest(c.data_root),
        }

    def model(self, pool):
        """``(denoiser, timeline, image shape, model description)``."""
        from diffcore.analysis import EditTimeline

        c = self.c
        if c.diffusers_dir:
            denoiser, abar, shape = self.hooks.load_diffusers(c.diffusers_dir, device=self.device)
            return denoiser, EditTimeline(abar), tuple(shape), {"kind": "diffusers", **self.model_spec()}
        name = f"w{c.width}-n{c.train_size}-s{c.train_seed}"
        unit = self.reused_model(name)
        source = f"reused from {c.models_from}" if unit is not None else "trained here"
        if unit is None:
            if c.train_size > pool.shape[0]:
                raise base.ConfigError(f"train_size: {c.train_size} exceeds the {pool.shape[0]} images of {c.dataset}")
            spec = self.model_spec()
            train_images, _ = self.hooks.subset(pool, c.train_size, c.subset_seed)
            unit = self.ws.run_unit(
                "models",
                name,
                spec,
                lambda tmp, work: self.hooks.train(
                    train_images, spec, tmp, work, device=self.device, progress=self.progress
                ),
            )
            self.ws.record(unit)
        denoiser = self.hooks.load(unit.path, device=self.device)
        return (
            denoiser,
            EditTimeline(),
            tuple(pool.shape[1:]),
            {"kind": "diffcore", "name": name, "source": source, "spec": unit.spec},
        )

    def reused_model(self, name: str) -> base.Unit | None:
        """The finished model unit ``name`` of the reproducibility run in ``models_from`` (checked
        against its manifest), or None when that folder has no such model."""
        c = self.c
        if not c.models_from:
            return None
        root = Path(c.models_from)
        if not root.is_dir():
            raise base.ConfigError(f"models_from: {root} is not a folder")
        manifest = root / "units" / "models" / name / "MANIFEST.json"
        if not manifest.is_file():
            log.warning("models_from: %s has no finished model %s; training it here", root, name)
            return None
        spec = load_json(manifest, what="models_from: unit manifest", follow=False)["spec"]
        if spec.get("dataset") != c.dataset or spec.get("subset_seed") != c.subset_seed:
            raise base.ConfigError(
                f"models_from: {name} there was trained on {spec.get('dataset')} (subset_seed "
                f"{spec.get('subset_seed')}); this config asks for {c.dataset} (subset_seed {c.subset_seed})"
            )
        return base.Workspace(root, read_only=True).finished("models", name, spec)

    def check_inputs(self, pool) -> None:
        """ConfigError naming the field for what the config alone cannot show: an image index
        beyond the dataset, an unreadable image or mask file, ``rank`` / ``k_out`` beyond the pixels
        inside / outside a mask, ``spectrum_k`` beyond the image's dimension, a ``models_from`` that
        is not a folder. Runs before the folder is bound (and before any training)."""
        c = self.c
        if c.models_from and not Path(c.models_from).is_dir():
            raise base.ConfigError(f"models_from: {c.models_from} is not a folder")
        for field in ("image_files", "mask_files") if c.image_source == "files" else ("mask_files",):
            for path in getattr(c, field):
                try:
                    open_image(path, what=f"{field}:").close()
                except (OSError, ValueError) as error:  # the message names the field and the file
                    raise base.ConfigError(str(error)) from None
        if pool is None:  # a diffusers model: its shape is known once it is loaded
            return
        shape = tuple(pool.shape[1:])
        if c.image_source == "dataset":
            beyond = [i for i in c.image_indices if i >= pool.shape[0]]
            if beyond:
                raise base.ConfigError(
                    f"image_indices: {beyond[0]} is out of range for the {pool.shape[0]} images of {c.dataset}"
                )
        if c.spectrum_k > math.prod(shape):
            raise base.ConfigError(f"spectrum_k: {c.spectrum_k} exceeds the dimension {math.prod(shape)} of the images")
        for position, image in enumerate(c.images()):
            self.check_mask_fits(self.mask(shape, position), image)
        if c.control_masks and math.prod(shape) > MAX_CONTROL_DIM:
            raise base.ConfigError(
                f"control_masks: the controls need full {math.prod(shape)} x {math.prod(shape)} Jacobians "
                f"(at most {MAX_CONTROL_DIM} pixel values); set control_masks= (empty) for these images"
            )
        for spec in c.control_masks:
            self.check_mask_fits(grid_mask(spec, shape), f"{spec} (control_masks)")

    def check_mask_fits(self, mask: torch.Tensor, image) -> None:
        """``rank`` directions inside and ``k_out`` outside the mask need that many pixel values."""
        c = self.c
        inside, outside = int((mask != 0).sum()), int((mask != 1).sum())
        if c.rank > inside or c.k_out > outside:
            name, value, count, where = (
                ("rank", c.rank, inside, "inside") if c.rank > inside else ("k_out", c.k_out, outside, "outside")
            )
            raise base.ConfigError(
                f"{name}: {value} exceeds the {count} pixel values {where} the mask of image {image!r}"
            )

    # images -----------------------------------------------------------------------
    def latents(
        self, denoiser, timeline, shape, pool, position: int, image, edit_time: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x_t [1, ...], x0 [1, ...] or None)`` of one image at ``edit_time`` (default: the config's)."""
        from diffcore import sampler

        c = self.c
        t = c.edit_time if edit_time is None else edit_time
        if c.image_source == "generated":
            noise = sampler.noise_from_seeds([image], shape, device=self.device, dtype=torch.float32)
            grid = timeline.generation_grid(t, c.inversion_steps)
            with torch.no_grad():
                x_t = sampler.SOLVERS[c.solver](denoiser, noise * float(grid[0]), grid, require_zero_end=False)
            return x_t, None
        if c.image_source == "dataset":
            if image >= pool.shape[0]:
                raise base.ConfigError(
                    f"image_indices: {image} is out of range for the {pool.shape[0]} images of {c.dataset}"
                )
            x0 = pool[image : image + 1].to(self.device, torch.float32)
        else:
            x0 = image_from_file(image, shape)[None].to(self.device)
        with torch.no_grad():
            x_t = sampler.invert(denoiser, x0, timeline.inversion_grid(t, c.inversion_steps), solver=c.solver)
        return x_t, x0

    def mask(self, shape, position: int) -> torch.Tensor:
        c = self.c
        spec = c.mask_files[position] if c.mask_files else c.mask
        return grid_mask(spec, shape).to(torch.float32)

    def image_spec(self, model: dict, position: int, image) -> dict:
        c = self.c
        keys = (
            "image_source",
            "edit_time",
            "inversion_steps",
            "solver",
            "stochastic_below",
            "noise_seed",
            "rank",
            "k_out",
            "strengths",
            "subspace_method",
            "subspace_iters",
            "subspace_tol",
            "spectrum_k",
            "spectrum_probes",
        )
        files = {"image_sha256": base.file_digest(image)} if c.image_source == "files" else {}
        if c.mask_files:
            files["mask_sha256"] = base.file_digest(c.mask_files[position])
        return {
            "model": model,
            "image": image,
            "position": position,
            "mask": c.mask_files[position] if c.mask_files else c.mask,
            **files,
            **{k: getattr(c, k) for k in keys},
        }

    def image_unit(self, denoiser, timeline, shape, model: dict, pool, position: int, image) -> base.Unit:
        from diffcore import analysis

        c = self.c
        mask = self.mask(shape, position)
        self.check_mask_fits(mask, image)  # a diffusers model's masks are checked here, before any work
        sigma = timeline.sigma(c.edit_time)
        sigmas = timeline.sampling_grid(c.edit_time, c.inversion_steps)
        sample_kwargs = self.sample_kwargs(timeline, [c.noise_seed + position])

        def produce(tmp: Path, work: Path) -> dict:
            x_t, x0 = self.latents(denoiser, timeline, shape, pool, position, image)
            original = analysis.sample_back(denoiser, x_t, sigmas, **sample_kwargs)
            spectrum = self.spectrum(denoiser, x_t, sigma, mask)
            dirs = analysis.loco_directions(
                denoiser, x_t, sigma, mask, rank=c.rank, k_out=c.k_out, **self.subspace_kwargs()
            )
            analysis.save_directions(tmp / "directions.safetensors", dirs)
            strengths = [*c.strengths, *(-s for s in c.strengths)]
            edits = {
                f"dir{r}": analysis.edit_samples(
                    denoiser, x_t, dirs.directions[:, r], strengths, sigmas, **sample_kwargs
                )
                for r in range(c.rank)
            }
            edits["unprojected"] = analysis.edit_samples(
                denoiser, x_t, dirs.unprojected[:, 0], strengths, sigmas, **sample_kwargs
            )
            if c.rank >= 2:
                mid = c.strengths[len(c.strengths) // 2]
                both = analysis.compose_directions(dirs.directions[:, :2], (mid, mid))
                edits["composed"] = analysis.edit_samples(denoiser, x_t, both, [1.0], sigmas, **sample_kwargs)
            lin = analysis.local_linearity(denoiser, x_t, sigma, dirs.directions[:, :1], list(c.strengths))
            tensors = {
                "x_t": x_t,
                "original": original,
                "mask": mask,
                **edits,
                "x0_rel_error": lin.rel_error,
                "x0_cosine": lin.cosine,
                **spectrum,
            }
            if x0 is not None:
                tensors["x0"] = x0
            torch.save(
                {
                    k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
                    for k, v in tensors.items()
                },
                tmp / "tensors.pt",
            )
            return {"sigma": sigma, "direction_seconds": dirs.seconds, "direction_cpu_seconds": dirs.cpu_seconds}

        unit = self.ws.run_unit("images", f"image-{position}", self.image_spec(model, position, image), produce)
        self.ws.record(unit)
        return unit

    def sample_kwargs(self, timeline, seeds) -> dict:
        c = self.c
        below = timeline.sigma(c.stochastic_below) if c.stochastic_below > 0 else 0.0
        return {"solver": c.solver, "stochastic_below": below, "seeds": seeds}

    def subspace_kwargs(self) -> dict:
        c = self.c
        return {"method": c.subspace_method, "iters": c.subspace_iters, "tol": c.subspace_tol}

    def spectrum(self, denoiser, x_t, sigma, mask) -> dict:
        from diffcore import analysis

        c = self.c
        k = None if c.spectrum_k == 0 else c.spectrum_k
        out = {}
        for key, m in (("jacobian", None), ("masked", mask)):
            s, frob = analysis.jacobian_spectrum(
                denoiser,
                x_t,
                sigma,
                mask=m,
                k=k,
                **({} if k is None else {"probes": c.spectrum_probes, **self.subspace_kwargs()}),
            )
            out[f"{key}_singular_values"], out[f"{key}_frobenius_sq"] = s, frob
        return out

    def transfer_unit(self, denoiser, timeline, units: list[base.Unit]) -> base.Unit:
        """Every image's first direction applied to every image (including itself), at each strength
        of both signs; the unedited images come from the same batch (strength 0)."""
        from diffcore import analysis

        c = self.c
        spec = {"images": [u.spec for u in units]}
        sigmas = timeline.sampling_grid(c.edit_time, c.inversion_steps)

        def produce(tmp: Path, work: Path) -> dict:
            x_t = torch.cat([_tensors(u)["x_t"] for u in units]).to(self.device)
            kwargs = self.sample_kwargs(timeline, [c.noise_seed + i for i in range(len(units))])
            strengths = [0.0, *c.strengths, *(-s for s in c.strengths)]
            out = []
            for u in units:
                direction = analysis.load_directions(u.file("directions.safetensors"), self.device).directions[0, 0]
                out.append(analysis.edit_samples(denoiser, x_t, direction, strengths, sigmas, **kwargs))
            torch.save(torch.stack(out).float().cpu().contiguous(), tmp / "transfer.pt")  # [src, S+1, tgt, ...]
            return {}

        unit = self.ws.run_unit("transfer", "all", spec, produce)
        self.ws.record(unit)
        return unit

    # results ----------------------------------------------------------------------
    def run(self) -> dict:
        c = self.c
        c.validate()
        pool = self.hooks.load_dataset(c.dataset, c.data_root) if not c.diffusers_dir else None
        self.check_inputs(pool)  # everything checkable against the data before the folder is bound
        self.ws.bind_config(c)
        denoiser, timeline, shape, model = self.model(pool)
        units = [
            self.image_unit(denoiser, timeline, shape, model, pool, i, image) for i, image in enumerate(c.detail())
        ]
        transfer = self.transfer_unit(denoiser, timeline, units) if c.transfer and len(units) > 1 else None
        per_image = [
            measure_image(_tensors(u), u.meta, c, i, image) for i, (u, image) in enumerate(zip(units, c.detail()))
        ]
        control_units = (
            [self.control_unit(denoiser, timeline, shape, model, pool, t) for t in c.edit_times()]
            if c.control_masks
            else []
        )
        controls = (
            summarize_controls([torch.load(u.file("controls.pt"), weights_only=True) for u in control_units], c)
            if control_units
            else None
        )
        transfer_rows = (
            measure_transfer(torch.load(transfer.file("transfer.pt"), weights_only=True), units, c)
            if transfer is not None
            else []
        )
        results = {
            "experiment": NAME,
            "config": dataclasses.asdict(c),
            "model": model,
            "edit_sigma": timeline.sigma(c.edit_time),
            "images": per_image,
            "transfer": transfer_rows,
            "summary": summarize(per_image, transfer_rows, c),
        }
        if controls is not None:
            results["controls"] = controls
            results["claims"] = controls.pop("claims")
        results = json.loads(base.json_dumps(results))
        self.write(results, units, transfer)
        return results

    def gaussian_reference(self, pool):
        """The Gaussian denoiser of the model's training images (mean and covariance, all eigenpairs):
        its Jacobian ``W_G(sigma)`` is the Gaussian baseline's."""
        from diffcore.denoisers import GaussianDenoiser

        c = self.c
        train_images, _ = self.hooks.subset(pool, c.train_size, c.subset_seed)
        return GaussianDenoiser.fit(train_images)

    def control_unit(self, denoiser, timeline, shape, model: dict, pool, edit_time: float) -> base.Unit:
        """At one edit time, for every image: the full Jacobian (rank), and per control mask the
        four directions (LOCO projected, LOCO unprojected, random projected, Gaussian projected)
        edited at the headline strength (:func:`control_strength`) of both signs (one batch), and
        x0_hat's first-order error along the LOCO direction there. Only that strength enters the
        results (the per-image units keep every strength), so only it is sampled."""
        from diffcore import analysis
        from diffcore.analysis.editing import exact_loco_directions, project_out, top_masked_direction

        c = self.c
        images = c.images()
        spec = {
            "model": model,
            "images": list(images),
            "edit_time": edit_time,
            "masks": list(c.control_masks),
            "control_seed": c.control_seed,
            **{
                k: getattr(c, k)
                for k in ("image_source", "inversion_steps", "solver", "stochastic_below", "noise_seed", "k_out")
            },
            "strength": control_strength(c),
        }
        sigma = timeline.sigma(edit_time)
        sigmas = timeline.sampling_grid(edit_time, c.inversion_steps)

        def produce(tmp: Path, work: Path) -> dict:
            x_t = torch.cat(
                [self.latents(denoiser, timeline, shape, pool, i, im, edit_time)[0] for i, im in enumerate(images)]
            )
            batch, d = x_t.shape[0], math.prod(shape)
            jac = analysis.jacobian_full(denoiser, x_t, sigma, mode="rev").double()  # [B, d, d]
            singular = torch.linalg.svdvals(jac)
            w_g = self.gaussian_reference(pool).jacobian(sigma)  # [d, d]
            strength = control_strength(c)
            signed = [strength, -strength]
            directions = []  # [M, K, B, d]
            for m_index, spec_m in enumerate(c.control_masks):
                mask = grid_mask(spec_m, shape)
                exact = exact_loco_directions(jac, mask, c.k_out)
                gen = torch.Generator().manual_seed(c.control_seed * 1000 + m_index)
                noise = torch.randn(batch, d, generator=gen, dtype=torch.float64)
                gauss = top_masked_direction(w_g, mask).expand(batch, d)
                directions.append(
                    torch.stack(
                        [
                            exact.loco,
                            exact.unprojected,
                            project_out(noise, exact.outside),
                            project_out(gauss, exact.outside),
                        ]
                    )
                )
            v = torch.stack(directions).to(x_t.dtype).reshape(len(c.control_masks), len(CONTROL_KINDS), batch, *shape)
            s = torch.tensor(signed, dtype=x_t.dtype).reshape(-1, 1, 1, 1, 1, 1, 1)
            start = (x_t + s * v[None]).reshape(-1, *shape)  # [S2 * M * K * B, ...]
            rows = start.shape[0] // batch
            seeds = [c.noise_seed + i for i in range(batch)]
            kwargs = self.sample_kwargs(timeline, seeds * (rows + 1))
            with torch.no_grad():
                finals = analysis.sample_back(denoiser, torch.cat([x_t, start]), sigmas, **kwargs)
            original, edited = finals[:batch], finals[batch:].reshape(len(signed), *v.shape)
            lin = analysis.local_linearity(denoiser, x_t, sigma, v[:, 0].transpose(0, 1), [strength])
            torch.save(
                {
                    "sigma": torch.tensor(sigma, dtype=torch.float64),
                    "edit_time": torch.tensor(edit_time, dtype=torch.float64),
                    "singular_values": singular.float(),
                    "strength": torch.tensor(strength, dtype=torch.float64),
                    "deltas": (edited - original).float().contiguous(),  # [2, M, K, B, C, H, W]: +s, -s
                    "masks": torch.stack([grid_mask(m, shape) for m in c.control_masks]).float(),
                    "x0_rel_error": lin.rel_error.float(),  # [B, M, 1] along the LOCO direction
                    "x0_cosine": lin.cosine.float(),
                    "original": original.float().cpu(),
                },
                tmp / "controls.pt",
            )
            return {"sigma": sigma}

        unit = self.ws.run_unit("controls", f"t{edit_time:g}", spec, produce)
        self.ws.record(unit)
        return unit

    def write(self, results: dict, units: list[base.Unit], transfer: base.Unit | None) -> None:
        root = self.ws.root
        base.atomic_write_json(root / "results.json", results)
        base.atomic_write_csv(
            root / "edits.csv", [{"image": im["image"], **row} for im in results["images"] for row in im["edits"]]
        )
        base.atomic_write_csv(
            root / "transfer.csv",
            results["transfer"],
            columns=["source", "target", "strength", "locality", "inside_fraction", "outside_mse"],
        )
        tensors = [_tensors(u) for u in units]
        if "controls" in results:
            plot_controls(results, root / "controls.png")
        plot_edits(tensors, results, root / "edits.png")
        plot_spectrum(tensors, results, root / "spectrum.png")
        if transfer is not None:
            plot_transfer(
                torch.load(transfer.file("transfer.pt"), weights_only=True), tensors, results, root / "transfer.png"
            )


def _tensors(unit: base.Unit) -> dict:
    return torch.load(unit.file("tensors.pt"), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- measures
def measure_image(t: dict, meta: dict, c: LocoEditConfig, position: int, image) -> dict:
    """One image's row of results.json (see docs/studies.md for each number)."""
    from diffcore import analysis

    mask, original = t["mask"], t["original"]
    n = len(c.strengths)
    ranks = {
        key: int(
            analysis.numerical_rank(t[f"{key}_singular_values"], c.rank_ratio, frobenius_sq=t[f"{key}_frobenius_sq"])[0]
        )
        for key in ("jacobian", "masked")
    }
    edits, linearity = [], []
    for key in [*(f"dir{r}" for r in range(c.rank)), "unprojected"]:
        delta = t[key][:, 0] - original[0]  # [2S, C, H, W]
        loc = analysis.edit_locality(delta, mask)
        direction = 0 if key == "unprojected" else int(key[3:])
        for i, s in enumerate([*c.strengths, *(-s for s in c.strengths)]):
            edits.append(
                {
                    "direction": direction,
                    "projected": key != "unprojected",
                    "strength": s,
                    "change_norm": float(delta[i].norm()),
                    **{k: float(loc[k][i]) for k in ("locality", "inside_fraction", "outside_mse")},
                }
            )
        lin = analysis.edit_linearity(delta[:n, None], delta[n:, None], c.strengths)
        for i, s in enumerate(c.strengths):
            row = {
                "direction": direction,
                "projected": key != "unprojected",
                "strength": s,
                "cosine_pm": float(lin["cosine_pm"][i, 0]),
                "change_per_strength": float(lin["change_per_strength"][i, 0]),
            }
            if key == "dir0":
                row.update(x0_rel_error=float(t["x0_rel_error"][0, 0, i]), x0_cosine=float(t["x0_cosine"][0, 0, i]))
            linearity.append(row)
    row = {
        "image": f"{c.image_source}-{image}",
        "position": position,
        "sigma": meta["sigma"],
        "rank_jacobian": ranks["jacobian"],
        "rank_masked": ranks["masked"],
        "jacobian_singular_values": t["jacobian_singular_values"][0, :32].tolist(),
        "masked_singular_values": t["masked_singular_values"][0, :32].tolist(),
        "direction_seconds": meta["direction_seconds"] / c.rank,
        "direction_cpu_seconds": meta["direction_cpu_seconds"] / c.rank,
        "edits": edits,
        "linearity": linearity,
    }
    if "x0" in t:
        row["reconstruction_rmse"] = float((original - t["x0"]).square().mean().sqrt())
    if "composed" in t:
        mid = c.strengths[n // 2]
        i = c.strengths.index(mid)
        single = (t["dir0"][i, 0] - original[0]) + (t["dir1"][i, 0] - original[0])
        both = t["composed"][0, 0] - original[0]
        loc = analysis.edit_locality(both, mask)
        row["composition"] = {
            "strength": mid,
            "additivity_error": float((both - single).norm() / both.norm()),
            **{k: float(loc[k]) for k in ("locality", "inside_fraction", "outside_mse")},
        }
    return row


def measure_transfer(edits: torch.Tensor, units: list[base.Unit], c: LocoEditConfig) -> list[dict]:
    """Rows (source, target, strength) of the transfer: edits [src, 1 + 2S, tgt, C, H, W], index 0 unedited."""
    from diffcore import analysis

    rows = []
    images = c.images()
    for src in range(edits.shape[0]):
        for tgt in range(edits.shape[2]):
            mask = _tensors(units[tgt])["mask"]
            delta = edits[src, 1:, tgt] - edits[src, 0, tgt]
            loc = analysis.edit_locality(delta, mask)
            for i, s in enumerate([*c.strengths, *(-s for s in c.strengths)]):
                rows.append(
                    {
                        "source": f"{c.image_source}-{images[src]}",
                        "target": f"{c.image_source}-{images[tgt]}",
                        "own": src == tgt,
                        "strength": s,
                        **{k: float(loc[k][i]) for k in ("locality", "inside_fraction", "outside_mse")},
                    }
                )
    return rows


def _median(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(torch.tensor(values, dtype=torch.float64).median()) if values else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarize(images: list[dict], transfer: list[dict], c: LocoEditConfig) -> dict:
    """Medians / means over images (and both signs) per strength."""
    per_strength = []
    for s in c.strengths:

        def at(projected, key, s=s):
            return [
                e[key]
                for im in images
                for e in im["edits"]
                if e["projected"] == projected and abs(e["strength"]) == s and e["direction"] == 0
            ]

        lin = [
            r for im in images for r in im["linearity"] if r["strength"] == s and r["projected"] and r["direction"] == 0
        ]
        moved = [r for r in transfer if abs(r["strength"]) == s and not r["own"]]
        per_strength.append(
            {
                "strength": s,
                "locality_projected_median": _median(at(True, "locality")),
                "locality_unprojected_median": _median(at(False, "locality")),
                "inside_fraction_projected_mean": _mean(at(True, "inside_fraction")),
                "inside_fraction_unprojected_mean": _mean(at(False, "inside_fraction")),
                "outside_mse_projected_mean": _mean(at(True, "outside_mse")),
                "outside_mse_unprojected_mean": _mean(at(False, "outside_mse")),
                "cosine_pm_mean": _mean([r["cosine_pm"] for r in lin]),
                "change_per_strength_mean": _mean([r["change_per_strength"] for r in lin]),
                "x0_rel_error_mean": _mean([r["x0_rel_error"] for r in lin]),
                "transfer_locality_median": _median([r["locality"] for r in moved]),
                "transfer_inside_fraction_mean": _mean([r["inside_fraction"] for r in moved]),
            }
        )
    return {
        "rank_jacobian_median": _median([im["rank_jacobian"] for im in images]),
        "rank_masked_median": _median([im["rank_masked"] for im in images]),
        "direction_seconds_mean": _mean([im["direction_seconds"] for im in images]),
        "direction_cpu_seconds_mean": _mean([im["direction_cpu_seconds"] for im in images]),
        "reconstruction_rmse_mean": _mean([im.get("reconstruction_rmse") for im in images]),
        "composition_additivity_error_mean": _mean(
            [im["composition"]["additivity_error"] for im in images if "composition" in im]
        ),
        "per_strength": per_strength,
    }


# ----------------------------------------------------------------------------- controls
def _median_interval(rows) -> Interval:
    """Median of all entries of ``rows`` [images, ...] with a bootstrap interval over images (the
    masks of one image stay together: they share its latent and Jacobian)."""
    from diffcore.metrics import intervals

    arr = np.asarray(rows, dtype=np.float64)
    return intervals.bootstrap_interval(arr, lambda a: float(np.median(a)))


def _mean_interval(rows) -> Interval:
    from diffcore.metrics import intervals

    arr = np.asarray(rows, dtype=np.float64)
    return intervals.bootstrap_interval(arr, lambda a: float(np.mean(a)))


def control_strength(c: LocoEditConfig) -> float:
    """The headline strength of the controls, fixed before looking: the middle of ``strengths``
    (``strengths[len // 2]``, 2 in the quick preset)."""
    return c.strengths[len(c.strengths) // 2]


def control_measures(t: dict, c: LocoEditConfig) -> dict:
    """Per-image measures of one control unit (one edit time, the headline strength) as numpy arrays.

    ``inside_fraction``, ``locality`` [M, K, B]: energies of both signs summed (inside over
    inside + outside, inside over outside); ``cosine_pm`` [M, K, B]; ``change_per_strength``
    [M, K, B] = |delta(+s)| / s (unnormalized); ``rank`` [B] (numerical rank of the full Jacobian,
    ratio ``rank_ratio``), ``x0_rel_error`` [M, B]; ``area`` [M] (the mask's share of the pixels:
    the inside fraction of a change spread evenly, the chance level)."""
    from diffcore import analysis

    deltas = t["deltas"].double()  # [2, M, K, B, C, H, W]: +s, -s
    if deltas.shape[0] != 2 or "strength" not in t:
        raise ValueError(
            "controls.pt: expected the deltas of one strength of both signs [2, M, K, B, ...] "
            f"(made by this version), got shape {tuple(deltas.shape)}; use a new --out folder"
        )
    strength = float(t["strength"])
    inside, outside = [], []
    for m_index in range(deltas.shape[1]):
        mask = t["masks"][m_index]
        loc = analysis.edit_locality(deltas[:, m_index], mask)
        inside.append(loc["inside"])
        outside.append(loc["outside"])
    inside_e = torch.stack(inside, 1)  # [2, M, K, B]
    outside_e = torch.stack(outside, 1)
    both_in, both_out = inside_e[0] + inside_e[1], outside_e[0] + outside_e[1]
    flat_p, flat_m = deltas[0].flatten(3), deltas[1].flatten(3)
    d = t["singular_values"].shape[-1]
    return {
        "inside_fraction": (both_in / (both_in + both_out).clamp_min(1e-300)).numpy(),
        "locality": (both_in / both_out.clamp_min(1e-300)).numpy(),
        "cosine_pm": torch.nn.functional.cosine_similarity(flat_p, flat_m, dim=-1, eps=1e-300).numpy(),
        "change_per_strength": (flat_p.norm(dim=-1) / strength).numpy(),
        "rank": analysis.numerical_rank(t["singular_values"].double(), c.rank_ratio).numpy(),
        "dimension": d,
        "x0_rel_error": t["x0_rel_error"].double()[:, :, 0].T.numpy(),
        "area": t["masks"].double().flatten(1).mean(1).numpy(),
        "sigma": float(t["sigma"]),
        "edit_time": float(t["edit_time"]),
    }


def summarize_controls(units: list[dict], c: LocoEditConfig) -> dict:
    """results.json's ``controls`` (per edit time and, at ``edit_time``, per mask) and ``claims``
    (decided on 95 % bootstrap intervals over images; see docs/studies.md)."""
    from diffcore.metrics import intervals

    per_time, at_edit = [], None
    for t in units:
        m = control_measures(t, c)  # at the headline strength, fixed before looking
        frac = m["inside_fraction"]  # [M, K, B]
        row = {
            "edit_time": m["edit_time"],
            "sigma": m["sigma"],
            "rank": _median_interval(m["rank"]).as_dict(),
            "rank_fraction": _median_interval(m["rank"] / m["dimension"]).as_dict(),
            "x0_rel_error": _median_interval(m["x0_rel_error"].T).as_dict(),
            **{
                f"inside_fraction_{kind}": _median_interval(frac[:, k].T).as_dict()
                for k, kind in enumerate(CONTROL_KINDS)
            },
            **{
                f"locality_{kind}": _median_interval(m["locality"][:, k].T).as_dict()
                for k, kind in enumerate(CONTROL_KINDS)
            },
            "cosine_pm_loco": _median_interval(m["cosine_pm"][:, 0].T).as_dict(),
            "change_per_strength_loco": _median_interval(m["change_per_strength"][:, 0].T).as_dict(),
        }
        per_time.append(row)
        if abs(m["edit_time"] - c.edit_time) < 1e-12:
            at_edit = m
    assert at_edit is not None  # edit_times() holds edit_time
    m = at_edit
    frac = m["inside_fraction"]  # [M, K, B]
    area = m["area"]  # [M]
    success = frac[:, 0] >= c.success_fraction  # [M, B]
    per_mask = []
    for j, spec in enumerate(c.control_masks):
        hits = int(success[j].sum())
        per_mask.append(
            {
                "mask": spec,
                "chance_inside_fraction": float(area[j]),
                "chance_locality": float(area[j] / (1 - area[j])),
                "success_rate": intervals.wilson_interval(hits, success.shape[1]).as_dict(),
                "successes": hits,
                **{
                    f"inside_fraction_{kind}": _median_interval(frac[j, k]).as_dict()
                    for k, kind in enumerate(CONTROL_KINDS)
                },
                **{
                    f"locality_{kind}": _median_interval(m["locality"][j, k]).as_dict()
                    for k, kind in enumerate(CONTROL_KINDS)
                },
                "per_image_inside_fraction_loco": frac[j, 0].tolist(),
            }
        )

    def paired(k_other: int | None) -> Interval:
        other = area[:, None] if k_other is None else frac[:, k_other]
        return _median_interval((frac[:, 0] - other).T)

    pooled_success = _mean_interval(success.T.astype(np.float64))
    rank_fraction = _median_interval(m["rank"] / m["dimension"])
    x0_error = _median_interval(m["x0_rel_error"].T)
    differences = {
        "random": paired(CONTROL_KINDS.index("random")),
        "gaussian": paired(CONTROL_KINDS.index("gaussian")),
        "unprojected": paired(CONTROL_KINDS.index("unprojected")),
        "chance": paired(None),
    }
    claims = {
        f"loco_more_local_than_{name}": intervals.claim(
            diff.low > 0,
            median_difference=diff,
            measure="inside fraction, LOCO (projected) minus the control, same image and mask",
        )
        for name, diff in differences.items()
    }
    claims["most_edits_succeed"] = intervals.claim(
        pooled_success.low > 0.5,
        success_rate=pooled_success,
        threshold=c.success_fraction,
        measure="share of (image, mask) pairs whose projected LOCO edit has inside fraction >= threshold",
    )
    claims["low_rank_at_edit_time"] = intervals.claim(
        rank_fraction.high < c.low_rank_fraction, rank_fraction=rank_fraction, tolerance=c.low_rank_fraction
    )
    claims["locally_linear_at_edit_time"] = intervals.claim(
        x0_error.high < c.linearity_tolerance, x0_rel_error=x0_error, tolerance=c.linearity_tolerance
    )
    return {
        "strength": control_strength(c),
        "kinds": list(CONTROL_KINDS),
        "images": len(c.images()),
        "per_time": per_time,
        "per_mask": per_mask,
        "success_rate_pooled": pooled_success.as_dict(),
        "claims": claims,
    }


def plot_controls(results: dict, path) -> Path:
    """Inside fraction per mask and direction at the edit time (median, 95 % bootstrap interval,
    chance level), and against the edit time: inside fraction, Jacobian rank fraction, linearity."""
    from diffcore.experiments.plotting import finish, plt  # the Agg backend, set in one place

    ctl = results["controls"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    ax = axes[0]
    kinds = ctl["kinds"]
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        xs = [j + (k - (len(kinds) - 1) / 2) * width for j in range(len(ctl["per_mask"]))]
        vals = [r[f"inside_fraction_{kind}"] for r in ctl["per_mask"]]
        ax.bar(
            xs,
            [v["value"] for v in vals],
            width,
            yerr=[[v["value"] - v["low"] for v in vals], [v["high"] - v["value"] for v in vals]],
            capsize=2,
            label=kind,
        )
    for j, r in enumerate(ctl["per_mask"]):
        ax.hlines(r["chance_inside_fraction"], j - 0.45, j + 0.45, colors="k", linestyles=":", lw=1)
    ax.set_xticks(range(len(ctl["per_mask"])), [r["mask"] for r in ctl["per_mask"]], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("inside fraction (median over images)")
    ax.set_title(f"t = {results['config']['edit_time']} T, |s| = {ctl['strength']:g} (dotted: chance)", fontsize=9)
    ax.legend(fontsize=7)
    times = [r["edit_time"] for r in ctl["per_time"]]

    def band(ax, key, label, style="o-", transform=lambda v: v):
        vals = [r[key] for r in ctl["per_time"]]
        lo = [transform(v["low"]) for v in vals]
        hi = [transform(v["high"]) for v in vals]
        ax.plot(times, [transform(v["value"]) for v in vals], style, label=label)
        ax.fill_between(times, np.minimum(lo, hi), np.maximum(lo, hi), alpha=0.2)

    for kind in kinds:
        band(axes[1], f"inside_fraction_{kind}", kind)
    axes[1].set_ylim(0, 1.02)
    axes[1].set_ylabel("inside fraction (all masks)")
    band(axes[2], "rank_fraction", "numerical rank / dimension")
    axes[2].set_ylim(0, 1.02)
    band(axes[3], "x0_rel_error", "x0_hat first-order rel. error (LOCO dir.)")
    band(axes[3], "cosine_pm_loco", "cos(change(+s), change(-s)) + 1", "s--", transform=lambda v: v + 1)
    axes[3].set_ylim(bottom=0)
    for ax, title in zip(axes[1:], ("locality against edit time", "Jacobian rank", "linearity (0 = linear)")):
        ax.set_xlabel("edit time t / T")
        ax.set_title(title, fontsize=9)
    return finish(fig, path, axes[1:])


# ----------------------------------------------------------------------------- figures
def _show(ax, image: torch.Tensor, title: str | None = None, diff: float | None = None) -> None:
    """[C, H, W] in [-1, 1] (or a difference map with color limit ``diff``)."""
    img = image.detach().float().cpu()
    if diff is not None:
        ax.imshow(img.mean(0).numpy(), cmap="RdBu_r", vmin=-diff, vmax=diff, interpolation="nearest")
    elif img.shape[0] == 1:
        ax.imshow(((img[0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _figure(rows: int, cols: int, size: float = 1.05):
    from diffcore.experiments.plotting import plt  # the Agg backend, set in one place

    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.4, size * rows + 0.5), squeeze=False)
    return fig, axes


def plot_edits(tensors: list[dict], results: dict, path) -> Path:
    """Per image two rows: original, mask, edits at -s..+s; below, the difference maps (and the
    unprojected edit's at the largest strength in the first column)."""
    strengths = results["config"]["strengths"]
    order = [*(-s for s in reversed(strengths)), *strengths]
    cols = 2 + len(order)
    fig, axes = _figure(2 * len(tensors), cols)
    for k, (t, im) in enumerate(zip(tensors, results["images"])):
        n = len(strengths)
        signed = [*strengths, *(-s for s in strengths)]
        edits = {s: t["dir0"][i, 0] for i, s in enumerate(signed)}
        original = t["original"][0]
        limit = max(float((e - original).abs().max()) for e in edits.values()) or 1.0
        top, bottom = axes[2 * k], axes[2 * k + 1]
        _show(top[0], original, f"{im['image']}")
        _show(top[1], t["mask"] * 2 - 1, "mask")
        unproj = t["unprojected"][n - 1, 0] - original
        _show(bottom[0], unproj, f"no proj. +{strengths[-1]:g}", diff=limit)
        bottom[1].axis("off")
        bottom[1].text(
            0.5,
            0.5,
            f"rank J {im['rank_jacobian']}\nrank MJ {im['rank_masked']}",
            ha="center",
            va="center",
            fontsize=6,
            transform=bottom[1].transAxes,
        )
        for j, s in enumerate(order):
            _show(top[2 + j], edits[s], f"s = {s:+g}")
            _show(bottom[2 + j], edits[s] - original, None, diff=limit)
    fig.suptitle(
        f"LOCO edits at sigma = {results['edit_sigma']:.3g} (t = {results['config']['edit_time']} T); "
        "rows: image, change (red +, blue -)",
        fontsize=8,
    )
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def plot_transfer(edits: torch.Tensor, tensors: list[dict], results: dict, path) -> Path:
    """Rows: the direction's source image; columns: target images; each cell the change of the
    target edited at the largest strength (diagonal: the image's own direction), with the mask's
    border. First row: the unedited targets; first column: the sources."""
    strengths = results["config"]["strengths"]
    col = len(strengths)  # index of +s_max (index 0 is unedited)
    n = edits.shape[0]
    fig, axes = _figure(n + 1, n + 1)
    axes[0][0].axis("off")
    names = [im["image"] for im in results["images"]]
    changes = edits[:, col] - edits[:, 0]  # [src, tgt, C, H, W]
    limit = float(changes.abs().max()) or 1.0
    for j in range(n):
        _show(axes[0][j + 1], edits[0, 0, j], names[j])
    for i in range(n):
        _show(axes[i + 1][0], tensors[i]["original"][0], f"dir. of {names[i]}")
        for j in range(n):
            _show(axes[i + 1][j + 1], changes[i, j], None, diff=limit)
            axes[i + 1][j + 1].contour(tensors[j]["mask"].mean(0).numpy(), levels=[0.5], colors="k", linewidths=0.6)
    fig.suptitle(
        f"transfer: change of column j's image along row i's direction (s = +{strengths[-1]:g}; "
        "red +, blue -; black line: mask border)",
        fontsize=7,
    )
    fig.tight_layout()
    return base.atomic_save_figure(fig, path)


def plot_spectrum(tensors: list[dict], results: dict, path) -> Path:
    """Singular values at the edit time; locality with and without the projection; linearity."""
    from diffcore.experiments.plotting import finish, plt  # the Agg backend, set in one place

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for t, im in zip(tensors, results["images"]):
        for key, style in (("jacobian", "-"), ("masked", "--")):
            s = t[f"{key}_singular_values"][0].double()
            (line,) = ax.plot(
                range(1, s.numel() + 1),
                (s / s[0]).numpy(),
                style,
                lw=1,
                label=f"{im['image']} {'J' if key == 'jacobian' else 'MJ'} (rank {im['rank_' + key]})",
            )
    ax.set_yscale("log")
    ax.set_ylim(1e-6, 1.5)
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1")
    ax.set_title(f"Jacobian spectrum at sigma = {results['edit_sigma']:.3g}", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    summary = results["summary"]["per_strength"]
    s = [r["strength"] for r in summary]
    ax = axes[1]
    ax.plot(s, [r["inside_fraction_projected_mean"] for r in summary], "o-", label="null-space projected")
    ax.plot(s, [r["inside_fraction_unprojected_mean"] for r in summary], "s--", label="no projection")
    if any(r["transfer_inside_fraction_mean"] is not None for r in summary):
        ax.plot(s, [r["transfer_inside_fraction_mean"] for r in summary], "^:", label="transferred (projected)")
    ax.set_xlabel("strength |s|")
    ax.set_ylabel("inside / (inside + outside) energy")
    ax.set_ylim(0, 1.02)
    ax.set_title("locality of the change", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(s, [-r["cosine_pm_mean"] for r in summary], "o-", label="-cos(change(+s), change(-s))")
    ax.plot(s, [1 - r["x0_rel_error_mean"] for r in summary], "^:", label="1 - rel. error of x0_hat's J v")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("strength |s|")
    ax.set_title("linearity (1 = linear)", fontsize=9)
    ax.legend(fontsize=7)
    return finish(fig, path, axes, legend_fontsize=None)


# ----------------------------------------------------------------------------- entry points
STUDY = base.Study(NAME, LocoEditConfig, presets=PRESETS, make=base.standard_make(_Study, default_hooks=default_hooks))


def run(
    config: LocoEditConfig, out, *, hooks: LocoHooks | None = None, device: str = "auto", progress: bool = True
) -> dict:
    """Run (or resume) the study into ``out`` (:meth:`base.Study.run`) once the config is checked to
    name at least one image; returns results.json's content."""
    config.validate()
    if not config.images():
        raise base.ConfigError("image_files: expected at least one image file (--set image_files=a.png,b.png)")
    return STUDY.run(config, out, hooks=hooks, device=device, progress=progress)


def run_preset(preset: str, out, overrides=(), **kwargs) -> dict:
    return run(base.config_from_preset(PRESETS, preset, overrides), out, **kwargs)
