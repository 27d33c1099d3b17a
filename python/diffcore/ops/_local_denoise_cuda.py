"""CUDA launchers of the local denoisers (csrc/local_denoise/local_denoise.cu): one thread per
query, exact float64 distances, the running state of the CPU path, one training tile at a time.
Compiled, never run on a GPU yet: not in the auto order. The kernel arguments, the running state
and the final division are the CPU path's (``_local_denoise_cpu``); only the tiles' layout and the
launch differ."""

from __future__ import annotations

import torch

from diffcore._ext import extension
from diffcore.ops import _local_denoise_cpu as _cpu
from diffcore.ops._launch import cuda_launch_args

TILE_IMAGES = 256  # training images per launch


def run_els(x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, patch: int, padding: str) -> torch.Tensor:
    """x [B, C, H, W] float32, train [N, C, H, W] (float32 or uint8) on one CUDA device -> [B, C, H, W] float32."""
    batch, channels, height, width = x.shape
    xq = _cpu.pad_images(x, patch // 2, padding)
    ranges = [t.to(x.device) for axis in (height, width) for t in _cpu.key_ranges(axis, patch, padding)]
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    state = _cpu._State.create(batch * height * width, (batch * height * width, channels), x.device)
    for start in range(0, train.shape[0], TILE_IMAGES):
        y = _cpu.pad_images(_cpu.as_float32(train[start : start + TILE_IMAGES]), patch // 2, padding)  # image-major
        extension().local_denoise_translated_cuda(
            **_cpu.translated_arguments(xq, y, patch, ranges, inv2s2, state), tile=y.shape[0], **cuda_launch_args(x)
        )
    return _cpu.translated_means(state, x.shape)


def run_same_location(
    x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, supports: _cpu.Supports
) -> torch.Tensor:
    """As ``_local_denoise_cpu.run_same_location`` on CUDA tensors: -> [B, outputs, C] float32."""
    batch, channels, height, width = x.shape
    on_device = _cpu.Supports(**{name: getattr(supports, name).to(x.device) for name in _cpu.Supports.FIELDS})
    xf = x.reshape(batch, channels, height * width).contiguous()
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    state = _cpu._State.create(
        batch * (supports.offsets.shape[0] - 1), (batch, int(supports.out_offsets[-1]), channels), x.device
    )
    for start in range(0, train.shape[0], TILE_IMAGES):
        y = _cpu.pixel_major(train[start : start + TILE_IMAGES])
        extension().local_denoise_same_location_cuda(
            **_cpu.same_location_arguments(xf, y, on_device, inv2s2, state), **cuda_launch_args(x)
        )
    return _cpu.same_location_means(state, on_device)
