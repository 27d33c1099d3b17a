"""CUDA launcher of the empirical denoiser (csrc/empirical_denoise/empirical_denoise.cu): exact
double distances, the training set split into ranges merged by log-sum-exp (flash-decoding style).
Compiled, never run on a GPU yet: not in the auto order."""

from __future__ import annotations

import torch

from diffcore._ext import dtype_name, extension
from diffcore.ops._launch import cuda_launch_args, multiprocessor_count

QUERY_GROUP = 16  # queries per block (kQueries in empirical_denoise.cu)
BLOCKS_PER_MULTIPROCESSOR = 2


def cuda_splits(batch: int, rows: int, target_blocks: int, query_group: int = QUERY_GROUP) -> int:
    """How many contiguous training ranges the CUDA kernel splits the set into (flash-decoding
    style): enough (query group, range) blocks to fill the GPU when B is small (``target_blocks``:
    twice the device's multiprocessor count)."""
    groups = -(-batch // query_group)
    return int(max(1, min(rows, -(-target_blocks // groups), 64)))


def run(xr: torch.Tensor, y: torch.Tensor, sigma64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xr [B, D] (float32/float16/bfloat16), y [N, D] (float32/float16/bfloat16/uint8), both
    contiguous, sigma64 [B] on one CUDA device -> (out [B, D] in xr's dtype, logz [B] float32)."""
    batch, dim = xr.shape
    rows = y.shape[0]
    launch = cuda_launch_args(xr)
    splits = cuda_splits(batch, rows, BLOCKS_PER_MULTIPROCESSOR * multiprocessor_count(launch["device"]))
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    device = xr.device
    work_acc = torch.empty(splits, batch, dim, dtype=torch.float32, device=device)
    work_m = torch.empty(splits, batch, dtype=torch.float64, device=device)
    work_s = torch.empty(splits, batch, dtype=torch.float64, device=device)
    out = torch.empty(batch, dim, dtype=xr.dtype, device=device)
    logz = torch.empty(batch, dtype=torch.float32, device=device)
    extension().empirical_denoise_cuda_forward(
        x_ptr=xr.data_ptr(),
        x_dtype=dtype_name(xr.dtype),
        y_ptr=y.data_ptr(),
        y_dtype=dtype_name(y.dtype),
        inv2s2_ptr=inv2s2.data_ptr(),
        batch=batch,
        rows=rows,
        dim=dim,
        splits=splits,
        work_acc_ptr=work_acc.data_ptr(),
        work_m_ptr=work_m.data_ptr(),
        work_s_ptr=work_s.data_ptr(),
        out_ptr=out.data_ptr(),
        logz_ptr=logz.data_ptr(),
        **launch,
    )
    return out, logz
