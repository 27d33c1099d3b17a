"""CPU host code of the exact k-NN (``diffcore.ops.knn``): bf16 GEMM screening with torch's BLAS
in tiles, exact re-scoring and the top-k merge in C++ (csrc/knn/knn.cpp)."""
from __future__ import annotations

import functools
import logging

import torch

from diffcore._ext import dtype_name, extension

log = logging.getLogger(__name__)

# Safety factor on the GEMM's own error terms in the screening bound of the CPU path (fp32
# accumulation and bf16 output rounding: what torch's BLAS is assumed to do; csrc/knn/knn.cpp).
CPU_SCREEN_SAFETY = 4.0
# Training rows per tile (CPU): about 8 M elements (32 MB in fp32), enough for an efficient GEMM
# while the extra memory (bf16 tile copy, Gram tile [query block, tile]) stays bounded.
CPU_TILE_ELEMENTS = 1 << 23
CPU_GRAM_ELEMENTS = 1 << 24


# Below this many elementary steps a parallel region costs more than it saves (its barrier is what
# hurts most when the cores are oversubscribed).
CPU_MIN_PARALLEL_WORK = 1 << 20


def _threads_for(work: int, threads: int) -> int:
    return threads if work >= CPU_MIN_PARALLEL_WORK else 1


@functools.lru_cache(maxsize=1)
def bf16_matmul_accumulates_in_fp32() -> bool:
    """Whether torch's CPU bf16 matmul meets the contract the screening bound assumes: products of
    bf16 inputs accumulated in fp32, the output rounded to bf16 once.

    Probe: rows of +-1 (plus exact multiples of 1/64) whose partial sums climb to about D / 2 and
    cancel back to about 0. fp32 accumulation stays within gamma_D |q| |y| (about 1 here); any bf16
    rounding of a partial sum on the way is off by several units.
    """
    g = torch.Generator().manual_seed(0)
    dim = 4096
    signs = torch.ones(dim)
    signs[dim // 2:] = -1
    q = (signs + torch.randint(-8, 8, (16, dim), generator=g) / 64).bfloat16()  # exact in bf16
    y = (1 + torch.randint(-8, 8, (24, dim), generator=g) / 64).bfloat16()
    exact = q.double() @ y.double().t()
    got = (q @ y.t()).double()
    unit = 2.0 ** -24
    gamma = dim * unit / (1 - dim * unit)
    bound = gamma * q.double().norm(dim=1)[:, None] * y.double().norm(dim=1)[None, :] + 2.0 ** -8 * got.abs()
    return bool(((got - exact).abs() <= bound).all())


def run(q, y, k, *, stats: dict | None = None):
    """bf16 GEMM screening (torch BLAS, in tiles) + exact C++ re-scoring and top-k merge: q [B, D],
    y [N, D] (contiguous) -> (squared distances float64 [B, k], indices int64 [B, k]).

    ``stats``, if given, receives ``rescored`` (rows re-scored exactly, all queries together).
    """
    ext = extension()
    if not bf16_matmul_accumulates_in_fp32():
        raise RuntimeError("knn: backend 'cpu' screens with torch's bf16 matmul, which on this machine does not "
                           "accumulate in fp32 (probe failed), so its error bound would not hold; use "
                           "backend='reference' (or triton)")
    threads = torch.get_num_threads()
    if q.dtype in (torch.float16, torch.bfloat16):
        q = q.float()  # lossless
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()  # lossless (a copy of the training set: documented)
    batch, dim = q.shape
    n_train = y.shape[0]
    q_bf16 = torch.empty(batch, dim, dtype=torch.bfloat16)
    q_norms = torch.empty(batch, 3, dtype=torch.float64)
    ext.knn_cpu_prepare_rows(src_ptr=q.data_ptr(), dtype=dtype_name(q.dtype), rows=batch, dim=dim, row_stride=dim,
                             dst_ptr=q_bf16.data_ptr(), norms_ptr=q_norms.data_ptr(),
                             threads=_threads_for(batch * dim, threads), arg_name="queries")
    best_d2 = torch.full((batch, k), float("inf"), dtype=torch.float64)
    best_idx = torch.full((batch, k), torch.iinfo(torch.int64).max, dtype=torch.int64)

    tile = min(n_train, max(256, min(16384, CPU_TILE_ELEMENTS // dim)))
    query_block = min(batch, max(1, CPU_GRAM_ELEMENTS // tile))
    y_bf16 = torch.empty(tile, dim, dtype=torch.bfloat16)
    y_norms = torch.empty(tile, 3, dtype=torch.float64)
    gram_storage = torch.empty(query_block * tile, dtype=torch.bfloat16)
    rescored = 0
    for start in range(0, n_train, tile):
        rows = min(tile, n_train - start)
        y_tile = y[start:start + rows]
        try:
            ext.knn_cpu_prepare_rows(src_ptr=y_tile.data_ptr(), dtype=dtype_name(y.dtype), rows=rows, dim=dim,
                                     row_stride=dim, dst_ptr=y_bf16.data_ptr(), norms_ptr=y_norms.data_ptr(),
                                     threads=_threads_for(rows * dim, threads), arg_name="train")
        except ValueError as exc:
            raise ValueError(f"train: rows {start}..{start + rows - 1}: {exc}") from None
        for q_start in range(0, batch, query_block):
            q_rows = min(query_block, batch - q_start)
            gram = gram_storage[:q_rows * rows].view(q_rows, rows)
            torch.mm(q_bf16[q_start:q_start + q_rows], y_bf16[:rows].t(), out=gram)
            rescored += ext.knn_cpu_screen_tile(
                queries_ptr=q[q_start].data_ptr(), queries_dtype=dtype_name(q.dtype), batch=q_rows, dim=dim,
                q_norms_ptr=q_norms[q_start].data_ptr(), train_ptr=y_tile.data_ptr(), train_dtype=dtype_name(y.dtype),
                tile_start=start, tile=rows, y_norms_ptr=y_norms.data_ptr(), gram_ptr=gram.data_ptr(), k=k,
                best_d2_ptr=best_d2[q_start].data_ptr(), best_idx_ptr=best_idx[q_start].data_ptr(),
                safety=CPU_SCREEN_SAFETY, threads=_threads_for(q_rows * rows * 8, threads))
    if bool((best_idx == torch.iinfo(torch.int64).max).any()):  # impossible unless the bound is broken
        raise RuntimeError("knn cpu: fewer than k rows survived the screening (bound violated)")
    if stats is not None:
        stats["rescored"] = rescored
    log.debug("knn cpu: B=%d N=%d D=%d k=%d, %d rows re-scored exactly (%.2f per query)",
              batch, n_train, dim, k, rescored, rescored / batch)
    return best_d2, best_idx
