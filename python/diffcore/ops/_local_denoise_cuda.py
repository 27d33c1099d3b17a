"""CUDA launchers of the local denoisers (csrc/local_denoise/local_denoise.cu): one thread per
query, exact float64 distances, the running state of the CPU path, one training tile at a time.
Compiled, never run on a GPU yet: not in the auto order."""

from __future__ import annotations

import torch

from diffcore._ext import extension
from diffcore.ops import _local_denoise_cpu as _cpu
from diffcore.ops._launch import cuda_launch_args

TILE_IMAGES = 256  # training images per launch


def _state(queries: int, acc_shape: tuple[int, ...], device) -> dict[str, torch.Tensor]:
    return {
        "dmin": torch.full((queries,), float("inf"), dtype=torch.float64, device=device),
        "total": torch.zeros(queries, dtype=torch.float64, device=device),
        "acc": torch.zeros(acc_shape, dtype=torch.float64, device=device),
    }


def _pointers(state: dict[str, torch.Tensor]) -> dict:
    return {f"{name}_ptr": t.data_ptr() for name, t in state.items()}


def run_els(x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, patch: int, padding: str) -> torch.Tensor:
    """x [B, C, H, W] float32, train [N, C, H, W] (float32 or uint8) on one CUDA device -> [B, C, H, W] float32."""
    batch, channels, height, width = x.shape
    r = patch // 2
    device = x.device
    xq = _cpu.pad_images(x, r, padding)
    ranges = [t.to(device) for axis in (height, width) for t in _cpu.key_ranges(axis, patch, padding)]
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    state = _state(batch * height * width, (batch * height * width, channels), device)
    for start in range(0, train.shape[0], TILE_IMAGES):
        y = _cpu.pad_images(_cpu.as_float32(train[start : start + TILE_IMAGES]), r, padding)
        extension().local_denoise_translated_cuda(
            xq_ptr=xq.data_ptr(),
            y_ptr=y.data_ptr(),
            batch=batch,
            tile=y.shape[0],
            channels=channels,
            height=height,
            width=width,
            patch=patch,
            row_lo_ptr=ranges[0].data_ptr(),
            row_hi_ptr=ranges[1].data_ptr(),
            col_lo_ptr=ranges[2].data_ptr(),
            col_hi_ptr=ranges[3].data_ptr(),
            inv2s2_ptr=inv2s2.data_ptr(),
            band=_cpu.BAND,
            **_pointers(state),
            **cuda_launch_args(x),
        )
    out = state["acc"] / state["total"][:, None]
    return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2).to(torch.float32).contiguous()


def run_same_location(
    x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, supports: _cpu.Supports
) -> torch.Tensor:
    """As ``_local_denoise_cpu.run_same_location`` on CUDA tensors: -> [B, outputs, C] float32."""
    batch, channels, height, width = x.shape
    pixels = height * width
    device = x.device
    locations = supports.offsets.shape[0] - 1
    sup = {
        name: getattr(supports, name).to(device) for name in ("offsets", "index", "weight", "out_offsets", "out_index")
    }
    xf = x.reshape(batch, channels, pixels).contiguous()
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    outputs = int(supports.out_offsets[-1])
    state = _state(batch * locations, (batch, outputs, channels), device)
    for start in range(0, train.shape[0], TILE_IMAGES):
        y = (
            _cpu.as_float32(train[start : start + TILE_IMAGES])
            .reshape(-1, channels, pixels)
            .permute(2, 1, 0)
            .contiguous()
        )
        extension().local_denoise_same_location_cuda(
            x_ptr=xf.data_ptr(),
            y_ptr=y.data_ptr(),
            batch=batch,
            tile=y.shape[2],
            channels=channels,
            pixels=pixels,
            locations=locations,
            support_offsets_ptr=sup["offsets"].data_ptr(),
            support_index_ptr=sup["index"].data_ptr(),
            support_weight_ptr=sup["weight"].data_ptr(),
            out_offsets_ptr=sup["out_offsets"].data_ptr(),
            out_index_ptr=sup["out_index"].data_ptr(),
            inv2s2_ptr=inv2s2.data_ptr(),
            band=_cpu.BAND,
            **_pointers(state),
            **cuda_launch_args(x),
        )
    counts = (supports.out_offsets[1:] - supports.out_offsets[:-1]).to(device)
    total = state["total"].reshape(batch, locations).repeat_interleave(counts, dim=1)
    return (state["acc"] / total[:, :, None]).to(torch.float32)
