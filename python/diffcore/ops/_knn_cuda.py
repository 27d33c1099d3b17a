"""CUDA launcher of the exact k-NN (csrc/knn/knn.cu): fp32 difference-first screening tiles and
exact double re-scoring per query block. Never run on a GPU yet: not in the auto order."""

from __future__ import annotations

import torch

from diffcore._ext import dtype_name, extension
from diffcore.ops._launch import cuda_launch_args

CUDA_MAX_K = 16
CUDA_TILE = 4096


def run(q: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, D], y [N, D] on one CUDA device -> (squared distances float64 [B, k], indices int64 [B, k])."""
    if k > CUDA_MAX_K:
        raise ValueError(
            f"k: the cuda backend supports k <= {CUDA_MAX_K}, got {k}; use backend='triton' or 'reference'"
        )
    if q.dtype == torch.float64:
        raise TypeError(
            "queries: the cuda backend takes float16/bfloat16/float32 queries (float64 would be "
            "rounded, breaking exactness); use backend='triton', 'cpu' or 'reference'"
        )
    q = q.float()  # lossless for float16/bfloat16
    if y.dtype not in (torch.float32, torch.uint8):
        y = y.float()
    batch, dim = q.shape
    n_train = y.shape[0]
    tile = min(n_train, CUDA_TILE)
    workspace = torch.empty(batch * tile, dtype=torch.float32, device=q.device)
    best_d2 = torch.full((batch, k), float("inf"), dtype=torch.float64, device=q.device)
    best_idx = torch.full((batch, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=q.device)
    extension().knn_cuda(
        queries_ptr=q.data_ptr(),
        train_ptr=y.data_ptr(),
        train_dtype=dtype_name(y.dtype),
        batch=batch,
        n_train=n_train,
        dim=dim,
        k=k,
        tile=tile,
        workspace_ptr=workspace.data_ptr(),
        best_d2_ptr=best_d2.data_ptr(),
        best_idx_ptr=best_idx.data_ptr(),
        **cuda_launch_args(q),
    )
    return best_d2, best_idx
