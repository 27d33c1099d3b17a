"""Building blocks of the DDPM++ UNet (EDM's "SongUNet" design).

Everything here is written so that ``torch.func.jvp``, ``torch.func.vmap`` and ordinary backward
run through it: no in-place arithmetic on activations, no data-dependent Python control flow, and
all attention goes through :func:`attention`, which calls ``diffcore.ops.attention`` (an autograd
Function with a forward-mode rule).

Parameter and buffer names follow EDM's ``training/networks.py`` (``norm0``, ``conv0``, ``affine``,
``qkv``, ``proj``, ``resample_filter``...) so that a state dict of the same architecture maps onto
these modules key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_image_batch(x) -> None:
    """Raise unless ``x`` is a floating-point tensor of shape [B, C, H, W] (errors name ``x``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The UNet's single entry point to attention: ``softmax(q k^T * scale) v``.

    q, k, v: [B, heads, L, Dh] -> [B, heads, L, Dh]. Delegates to ``diffcore.ops.attention``.
    """
    from diffcore import ops

    return ops.attention(q, k, v, scale=scale)


def xavier_uniform(shape: tuple[int, ...], fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    """Uniform in [-a, a] with ``a = gain * sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio 2010)."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape) * 2.0 - 1.0) * bound


class Linear(nn.Module):
    """Fully connected layer ``y = x W^T + b``, Xavier-uniform init scaled by ``init_gain``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, init_gain: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(xavier_uniform((out_features, in_features), in_features, out_features, init_gain))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_features] -> [B, out_features]."""
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Same-padded 2-D convolution, optionally preceded by 2x up- or downsampling.

    Resampling uses the separable FIR filter ``resample_filter`` (``[1, 1]``: a 2x2 box, i.e. average
    pooling on the way down and nearest-neighbour on the way up, as in DDPM++), applied depthwise
    with stride 2 before the convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter=(1, 1),
        init_gain: float = 1.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        self.up = up
        self.down = down
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = nn.Parameter(
            xavier_uniform((out_channels, in_channels, kernel, kernel), fan_in, fan_out, init_gain)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if up or down:
            taps = torch.as_tensor(resample_filter, dtype=torch.float32)
            box = torch.outer(taps, taps) / taps.sum() ** 2  # unit DC gain
            self.register_buffer("resample_filter", box[None, None])  # [1, 1, f, f]
        else:
            self.resample_filter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H', W'] (H' = 2H, H/2 or H)."""
        if self.resample_filter is not None:
            filt = self.resample_filter.to(x.dtype)
            pad = (filt.shape[-1] - 1) // 2
            depthwise = filt.expand(self.in_channels, 1, -1, -1)
            if self.up:  # x4 keeps the DC gain of a 2x upsampling
                x = F.conv_transpose2d(x, depthwise * 4, stride=2, padding=pad, groups=self.in_channels)
            else:
                x = F.conv2d(x, depthwise, stride=2, padding=pad, groups=self.in_channels)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, padding=self.kernel // 2)


class GroupNorm(nn.Module):
    """GroupNorm with ``min(num_groups, C // min_channels_per_group)`` groups (at least one)."""

    def __init__(self, num_channels: int, *, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-6):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> same shape.

        x is made contiguous first: torch's forward-mode rule of group_norm views its input and
        fails on channels-last strides (seen with torch 2.13 under torch.func.jvp).
        """
        return F.group_norm(x.contiguous(), self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (DDPM++ noise-level embedding).

    ``emb = [sin(c * w_j), cos(c * w_j)]`` with ``w_j = (1/max_positions)^(j / (n/2 - 1))``,
    j = 0..n/2-1 (the "endpoint" spacing, so the lowest frequency is exactly 1/max_positions).
    """

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        if num_channels < 4 or num_channels % 2:
            raise ValueError(f"num_channels: expected an even integer >= 4, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """noise_labels: [B] -> [B, num_channels]."""
        half = self.num_channels // 2
        steps = torch.arange(half, dtype=noise_labels.dtype, device=noise_labels.device) / (half - 1)
        freqs = (1.0 / self.max_positions) ** steps
        angles = noise_labels[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class UNetBlock(nn.Module):
    """Residual block with noise-embedding injection, optional 2x resampling and self-attention.

    ``h = conv0(silu(norm0(x)))``; ``h = silu(norm1(h + affine(emb)))``; ``h = conv1(dropout(h))``;
    ``x = (h + skip(x)) * skip_scale``; then, with attention,
    ``x = (proj(attn(qkv(norm2(x)))) + x) * skip_scale`` (DDPM++: skip_scale = sqrt(1/2)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = 1,
        channels_per_head: int | None = None,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter=(1, 1),
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.num_heads = resolve_heads(out_channels, num_heads, channels_per_head) if attention else 0

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        # Near-zero init of the last layer of each residual branch (EDM's init_weight=1e-5).
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_gain=1e-5)
        needs_skip_proj = in_channels != out_channels or up or down
        self.skip = (
            Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
            if needs_skip_proj
            else None
        )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_gain=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_gain=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W], emb: [B, emb_channels] -> [B, out_channels, H', W']."""
        residual = x if self.skip is None else self.skip(x)
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.affine(emb)[:, :, None, None].to(h.dtype)
        h = F.silu(self.norm1(h))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + residual) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self._self_attention(self.norm2(x))) + x) * self.skip_scale
        return x

    def _self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the H*W positions: [B, C, H, W] -> [B, C, H, W].

        The qkv projection's 3C output channels are read as (head, channel, q/k/v), EDM's layout.
        """
        batch, channels, height, width = x.shape
        heads = self.num_heads
        head_dim = channels // heads
        qkv = self.qkv(x).reshape(batch, heads, head_dim, 3, height * width)
        q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.unbind(3))  # [B, heads, L, Dh]
        out = attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
        return out.transpose(-1, -2).reshape(batch, channels, height, width).contiguous()


def resolve_heads(channels: int, num_heads: int | None, channels_per_head: int | None) -> int:
    """Number of attention heads for ``channels`` from exactly one of the two settings."""
    if (num_heads is None) == (channels_per_head is None):
        raise ValueError("attention heads: give exactly one of num_heads and channels_per_head")
    if num_heads is not None:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide the {channels} channels of an attention block")
        return num_heads
    if channels_per_head < 1 or channels % channels_per_head:
        raise ValueError(
            f"channels_per_head: {channels_per_head} does not divide the {channels} channels of an attention block"
        )
    return channels // channels_per_head
