"""DDPM++ UNet (Song et al. 2021, as re-implemented in EDM, Karras et al. 2022: "SongUNet").

The network ``F(x_in, c_noise, class_labels)`` that the preconditioning wrappers of
``diffcore.models.precond`` turn into a denoiser ``D(x, sigma)``.

Layout for ``channel_mult = (m_0, ..., m_{n-1})`` and ``num_blocks = b`` at image size R:

- mapping: sinusoidal embedding of c_noise (+ linear map of the class label, + augmentation
  labels) -> two Linear+SiLU layers -> ``emb`` of width ``4 * model_channels``;
- encoder level i at resolution ``R / 2^i``: (level 0) a 3x3 conv to ``model_channels``, (level > 0)
  a downsampling block; then b residual blocks of width ``model_channels * m_i``, with self-attention
  where the resolution is in ``attn_resolutions``; every output is kept as a skip connection;
- decoder, deepest level first: (deepest) two blocks, the first always with attention; (others) an
  upsampling block; then b + 1 blocks that each take one skip connection (concatenated), the last
  with attention at ``attn_resolutions``; finally GroupNorm, SiLU and a 3x3 conv to ``out_channels``.

Sizes: the resolution is halved ``len(channel_mult) - 1`` times, so ``img_resolution`` must be
divisible by ``2^(len(channel_mult) - 1)``. The resolutions are computed from it, so
non-powers of two work whenever that holds: 28x28 with three levels runs at 28, 14 and 7
(attention resolutions are matched against these values, e.g. ``attn_resolutions=(14,)``).
Other sizes raise a ValueError at construction naming ``img_resolution``; pad the images
(e.g. 28 -> 32) or use fewer levels.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.models.layers import (
    Conv2d,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    check_image_batch,
    resolve_heads,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a DDPM++ UNet. Defaults: EDM's DDPM++ for CIFAR-10 (about 56M parameters).

    ``model_channels`` is the base width ("UNet-32/64/128/256" in the reproducibility papers).
    Attention heads: ``num_heads`` (DDPM++: one head, head dim = channels) or, instead,
    ``channels_per_head`` (set ``num_heads=None``).
    """

    img_resolution: int = 32
    in_channels: int = 3
    out_channels: int | None = None  # None: same as in_channels
    label_dim: int = 0  # number of classes; 0 = unconditional
    augment_dim: int = 0  # width of augmentation labels (EDM's non-leaky augmentation); 0 = none
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    channel_mult_emb: int = 4
    channel_mult_noise: int = 1
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    num_heads: int | None = 1
    channels_per_head: int | None = None
    dropout: float = 0.13
    label_dropout: float = 0.0
    resample_filter: tuple[int, ...] = (1, 1)

    def replace(self, **changes) -> UNetConfig:
        """A copy with some fields changed (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)

    def resolutions(self) -> list[int]:
        """Feature-map side length at each level, e.g. [32, 16, 8]."""
        return [self.img_resolution >> level for level in range(len(self.channel_mult))]

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for name in (
            "img_resolution",
            "in_channels",
            "model_channels",
            "num_blocks",
            "channel_mult_emb",
            "channel_mult_noise",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("label_dim", "augment_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels < 1):
            raise ValueError(f"out_channels: expected None or an integer >= 1, got {self.out_channels!r}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult: expected a non-empty sequence of integers >= 1, got {self.channel_mult!r}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.img_resolution % factor:
            raise ValueError(
                f"img_resolution: {self.img_resolution} is not divisible by 2^(len(channel_mult)-1) = {factor} "
                f"(channel_mult={tuple(self.channel_mult)}); pad the images or use fewer levels"
            )
        if (self.model_channels * self.channel_mult_noise) % 2 or self.model_channels * self.channel_mult_noise < 4:
            raise ValueError(
                "model_channels: the noise embedding needs model_channels * channel_mult_noise even and >= 4"
            )
        for p_name in ("dropout", "label_dropout"):
            p = getattr(self, p_name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{p_name}: expected a probability in [0, 1), got {p!r}")
        attn_levels = [res for res in self.resolutions() if res in self.attn_resolutions]
        for level, res in enumerate(self.resolutions()):  # the deepest level always attends
            if res in self.attn_resolutions or level == len(self.channel_mult) - 1:
                resolve_heads(self.model_channels * self.channel_mult[level], self.num_heads, self.channels_per_head)
        missing = sorted(set(self.attn_resolutions) - set(attn_levels))
        if missing:
            log.warning(
                "attn_resolutions %s match no level (levels run at %s); only the bottleneck attends there",
                missing,
                self.resolutions(),
            )


class UNet(nn.Module):
    """DDPM++ UNet ``F(x, noise_labels, class_labels) -> [B, out_channels, R, R]``.

    Build it from a :class:`UNetConfig` (or keyword fields of one). See the module docstring for the
    layout and the supported image sizes.
    """

    def __init__(self, config: UNetConfig | None = None, **fields):
        super().__init__()
        config = (config or UNetConfig()).replace(**fields)
        config = config.replace(
            channel_mult=tuple(config.channel_mult),
            attn_resolutions=tuple(config.attn_resolutions),
            resample_filter=tuple(config.resample_filter),
        )
        config.validate()
        self.config = config
        self.img_resolution = config.img_resolution
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels or config.in_channels
        self.label_dim = config.label_dim
        self.augment_dim = config.augment_dim
        self.label_dropout = config.label_dropout

        noise_channels = config.model_channels * config.channel_mult_noise
        emb_channels = config.model_channels * config.channel_mult_emb
        block = dict(
            emb_channels=emb_channels,
            num_heads=config.num_heads,
            channels_per_head=config.channels_per_head,
            dropout=config.dropout,
            resample_filter=config.resample_filter,
        )

        # Noise-level / label mapping network.
        self.map_noise = PositionalEmbedding(noise_channels)
        self.map_label = Linear(config.label_dim, noise_channels) if config.label_dim else None
        self.map_augment = Linear(config.augment_dim, noise_channels, bias=False) if config.augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder: every module's output becomes one skip connection.
        self.enc = nn.ModuleDict()
        width = config.in_channels
        for level, (mult, res) in enumerate(zip(config.channel_mult, config.resolutions())):
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(width, config.model_channels, 3)
                width = config.model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(width, width, down=True, **block)
            for idx in range(config.num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    width, config.model_channels * mult, attention=res in config.attn_resolutions, **block
                )
                width = config.model_channels * mult
        skip_widths = [m.out_channels for m in self.enc.values()]

        self._build_decoders(config, width, skip_widths, block)

    def _build_decoders(self, config: UNetConfig, width: int, skip_widths: list[int], block: dict) -> None:
        """Build ``self.dec`` (one decoder at the config's width); subclasses may build several."""
        self.dec, self._takes_skip = build_decoder(config, width, skip_widths, self.out_channels, block)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, in_channels, R, R]; noise_labels: [B]; class_labels: [B, label_dim] (one-hot or
        weights) or [B] integer class ids, None = the all-zero "dropped" label; augment_labels:
        [B, augment_dim] or None. Returns [B, out_channels, R, R]."""
        self._check_input(x)
        batch = x.shape[0]
        if noise_labels.dim() != 1 or noise_labels.shape[0] != batch:
            raise ValueError(f"noise_labels: expected shape [{batch}], got {tuple(noise_labels.shape)}")
        emb = self._embed(x, noise_labels, class_labels, augment_labels)
        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        return self._decode(x, skips, emb, noise_labels)

    def _embed(self, x, noise_labels, class_labels, augment_labels) -> torch.Tensor:
        """The mapping network: noise/class/augment labels -> emb [B, 4 * model_channels]."""
        batch = x.shape[0]
        emb = self.map_noise(noise_labels.to(x.dtype))
        if self.map_label is not None:
            labels = self._label_vectors(class_labels, batch, x)
            if self.training and self.label_dropout:
                keep = torch.rand(batch, 1, device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        elif class_labels is not None:
            raise ValueError("class_labels: this UNet is unconditional (label_dim=0)")
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(x.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def _decode(self, x, skips: list[torch.Tensor], emb, noise_labels) -> torch.Tensor:
        """Bottleneck features x and the encoder's skip connections -> the output [B, C, R, R]."""
        return run_decoder(self.dec, self._takes_skip, x, list(skips), emb)

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels, got shape {tuple(x.shape)}")
        res = self.img_resolution
        if tuple(x.shape[2:]) != (res, res):
            raise ValueError(f"x: this UNet was built for {res}x{res} images, got shape {tuple(x.shape)}")

    def _label_vectors(self, class_labels, batch: int, x: torch.Tensor) -> torch.Tensor:
        """Class labels as [B, label_dim] vectors in x's dtype (integer ids become one-hot)."""
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, dtype=x.dtype, device=x.device)
        if not isinstance(class_labels, torch.Tensor):
            raise TypeError(f"class_labels: expected a tensor, got {type(class_labels).__name__}")
        if not class_labels.is_floating_point():
            if class_labels.shape != (batch,):
                raise ValueError(
                    f"class_labels: integer ids must have shape [{batch}], got {tuple(class_labels.shape)}"
                )
            return F.one_hot(class_labels.long(), self.label_dim).to(x.dtype)
        if class_labels.shape != (batch, self.label_dim):
            raise ValueError(
                f"class_labels: expected shape [{batch}, {self.label_dim}], got {tuple(class_labels.shape)}"
            )
        return class_labels.to(x.dtype)


def build_decoder(
    config: UNetConfig, width: int, skip_widths: list[int], out_channels: int, block: dict
) -> tuple[nn.ModuleDict, set[str]]:
    """A decoder at width ``config.model_channels * channel_mult`` (see the module docstring).

    ``width``: channels of the bottleneck input; ``skip_widths``: channels of the encoder's skip
    connections in encoder order (they may differ from this decoder's widths). Returns the modules in
    call order and the names of the blocks that concatenate the next skip connection first.
    """
    skip_widths = list(skip_widths)
    dec = nn.ModuleDict()
    takes_skip: set[str] = set()
    last_level = len(config.channel_mult) - 1
    for level in reversed(range(len(config.channel_mult))):
        mult, res = config.channel_mult[level], config.resolutions()[level]
        if level == last_level:
            dec[f"{res}x{res}_in0"] = UNetBlock(width, config.model_channels * mult, attention=True, **block)
            width = config.model_channels * mult
            dec[f"{res}x{res}_in1"] = UNetBlock(width, width, **block)
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(width, width, up=True, **block)
        for idx in range(config.num_blocks + 1):
            name = f"{res}x{res}_block{idx}"
            attend = idx == config.num_blocks and res in config.attn_resolutions
            dec[name] = UNetBlock(width + skip_widths.pop(), config.model_channels * mult, attention=attend, **block)
            takes_skip.add(name)
            width = config.model_channels * mult
    res0 = config.img_resolution
    dec[f"{res0}x{res0}_aux_norm"] = GroupNorm(width, eps=1e-6)
    dec[f"{res0}x{res0}_aux_conv"] = Conv2d(width, out_channels, 3, init_gain=1e-5)
    return dec, takes_skip


def run_decoder(
    dec: nn.ModuleDict, takes_skip: set[str], x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor
) -> torch.Tensor:
    """Run a :func:`build_decoder` decoder; consumes ``skips`` (a list, popped from the end)."""
    out = None
    for name, module in dec.items():
        if name.endswith("_aux_norm"):
            out = module(x)
        elif name.endswith("_aux_conv"):
            out = module(F.silu(out))
        else:
            if name in takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
    return out
