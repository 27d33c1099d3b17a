"""CPU host code of the exact k-NN (``diffcore.ops.knn``): GEMM screening with torch in tiles
(int8 where torch's int8 GEMM is exact, else bf16 where the CPU has native bf16 matmul, else fp32:
diffcore._cpu_caps), exact re-scoring and the top-k merge in C++ (csrc/knn/knn.cpp)."""

from __future__ import annotations

import contextlib
import logging

import torch

from diffcore._cpu_caps import (
    bf16_matmul_accumulates_in_fp32,
    fp32_matmul_at_full_precision,
    int8_gemm_levels,
    screen_choice,
)
from diffcore._ext import dtype_name, extension
from diffcore.ops import _torch_compat as compat

log = logging.getLogger(__name__)

# Safety factor on the GEMM's own error terms in the bf16 screening bound of the CPU path (fp32
# accumulation and bf16 output rounding: what torch's BLAS is assumed to do; csrc/knn/knn.cpp).
# The fp32 screening bound is proven for any summation order, the int8 one has no GEMM error
# term (exact integer sums): no factor.
CPU_SCREEN_SAFETY = {"int8": 1.0, "bf16": 4.0, "fp32": 1.0}
SCREEN_DTYPES = {"int8": torch.int8, "bf16": torch.bfloat16, "fp32": torch.float32}
GRAM_DTYPES = {"int8": torch.int32, "bf16": torch.bfloat16, "fp32": torch.float32}
QUERY_INT8_LEVELS = 127  # queries are the first GEMM operand: 8 bits on every machine (the probe checks it)
INT8_MAX_DIM = 133143  # dim * 127^2 < 2^31: exact int32 sums (csrc/knn/knn.cpp, kInt8MaxDim)
# Shorter rows screen in floating point: their GEMM is cheap, and torch._int_mm returned zeros for
# dim = 1 (B^T a [1, N] view; torch 2.13 CPU, measured; dims 2..3073 were exact).
INT8_MIN_DIM = 16
# Training rows per tile (CPU): about 8 M elements (32 MB in fp32), enough for an efficient GEMM
# while the extra memory (bf16 tile copy, Gram tile [query block, tile]) stays bounded.
CPU_TILE_ELEMENTS = 1 << 23
CPU_GRAM_ELEMENTS = 1 << 24

# A training set of at most CPU_SMALL_TRAIN_ELEMENTS values (one tile; the digits: 1797 x 64) is
# screened in query blocks whose Gram block is at most CPU_GRAM_CACHE_BYTES, so that it is still
# in cache when the C++ pass reads it (1797 x 1797 x 64, one thread, load 10: 8.5 ms with blocks of
# 128 queries against 11-12 ms with one [1797, 1797] int32 Gram of 13 MB; 64 and 256 slower).
# One thread only: with two, the 13 GEMM + parallel-pass pairs per call cost more than the cache
# saves (1.18x torch against 1.70x with one block, load 9; bench/baselines/MEASUREMENTS.md).
CPU_SMALL_TRAIN_ELEMENTS = 1 << 20
CPU_GRAM_CACHE_BYTES = 1 << 20


# A problem of at most CPU_SINGLE_THREAD_WORK multiply-adds (B N D) on a training set of one cached
# tile runs on one thread whatever torch's thread count (torch's int8 GEMM included). Chosen on a
# quiet machine (the 2-core Xeon, load below 2; bench/baselines/MEASUREMENTS.md, 2026-12-06
# 13:15 UTC): against N = 1797 digits with 2 threads available, one thread / two took 0.75 / 0.67 ms
# at B = 64, 1.32 / 1.05 ms at B = 256, 1.93 / 1.44 at 512, 3.14 / 2.30 at 1024 and 5.51 / 3.72 at
# 1797 (torch cdist + topk: 0.42 / 1.02 / 1.75 / 3.30 / 6.10 ms). Two threads gain at every size
# there, but little below about 2^25 (B = 256: 1.26x), while under heavy load (6-10 on 2 cores)
# every parallel region's hand-off cost far more than the second core gave (B = 256: 4.3 ms on
# one thread against 81 ms on two, wall). So the threshold keeps B <= 291 at the digits on one
# thread and lets the digits' all-pairs case (2.1e8) use torch's count.
CPU_SINGLE_THREAD_WORK = 1 << 25

# Below this many elementary steps a parallel region costs more than it saves (its barrier is what
# hurts most when the cores are oversubscribed).
CPU_MIN_PARALLEL_WORK = 1 << 20


def _threads_for(work: int, threads: int) -> int:
    return threads if work >= CPU_MIN_PARALLEL_WORK else 1


def run(q, y, k, *, stats: dict | None = None, precision: str | None = None):
    """GEMM screening (torch, in tiles; int8, bf16 or fp32: ``precision``, default the process's
    choice, diffcore._cpu_caps) + exact C++ re-scoring and top-k merge: q [B, D], y [N, D]
    (contiguous) -> (squared distances float64 [B, k], indices int64 [B, k]).

    ``stats``, if given, receives ``rescored`` (rows re-scored exactly, all queries together) and
    ``precision`` (the screen used).
    """
    with one_thread_if_small(q.shape[0], y.shape[0], q.shape[1]):
        return _run(q, y, k, stats, precision, torch.get_num_threads())


@contextlib.contextmanager
def one_thread_if_small(batch: int, n_train: int, dim: int):
    """Context in which torch runs on one thread when the problem (``batch`` queries, ``n_train``
    rows of ``dim`` values) is small (CPU_SINGLE_THREAD_WORK; torch's count is restored after).
    ``knn`` enters it before its own checks: every torch op of a small call (the magnitude check
    too) is a few microseconds of work that a parallel region's hand-off would dominate."""
    threads = torch.get_num_threads()
    if threads > 1 and n_train * dim <= CPU_SMALL_TRAIN_ELEMENTS and batch * n_train * dim <= CPU_SINGLE_THREAD_WORK:
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
    else:
        yield


def _run(q, y, k, stats, precision, threads):
    """``run`` with ``threads`` threads for the C++ passes (torch's GEMM: torch's count)."""
    ext = extension()
    batch, dim = q.shape
    precision, train_levels = _precision_for(precision, dim)
    if q.dtype in (torch.float16, torch.bfloat16):
        q = q.float()  # lossless
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()  # lossless (a copy of the training set: documented)
    n_train = y.shape[0]
    screen_dtype, gram_dtype = SCREEN_DTYPES[precision], GRAM_DTYPES[precision]
    q_screen, q_norms = _screen_rows(q, screen_dtype, None, "queries", threads, QUERY_INT8_LEVELS)
    best_d2 = torch.full((batch, k), float("inf"), dtype=torch.float64)
    best_idx = torch.full((batch, k), torch.iinfo(torch.int64).max, dtype=torch.int64)

    # a multiple of 64 rows: MKL's fp32 GEMM took 25-30% longer on 2730-row tiles than on 2688 (measured)
    tile = min(n_train, max(256, min(16384, CPU_TILE_ELEMENTS // dim) // 64 * 64))
    query_block = min(batch, max(1, CPU_GRAM_ELEMENTS // tile))
    if threads == 1 and tile == n_train and n_train * dim <= CPU_SMALL_TRAIN_ELEMENTS:  # Gram blocks in cache
        query_block = min(query_block, max(1, CPU_GRAM_CACHE_BYTES // (tile * gram_dtype.itemsize)))
    y_buffer = None if screen_dtype == y.dtype else torch.empty(tile, dim, dtype=screen_dtype)
    gram_storage = torch.empty(query_block * tile, dtype=gram_dtype)
    rescored = 0
    for start in range(0, n_train, tile):
        rows = min(tile, n_train - start)
        y_tile = y[start : start + rows]
        try:
            if _same_rows(q, y_tile) and (precision != "int8" or train_levels == QUERY_INT8_LEVELS):
                y_screen, y_norms = q_screen, q_norms  # all pairs (knn(train, train)): rows prepared once
            else:
                y_screen, y_norms = _screen_rows(y_tile, screen_dtype, y_buffer, "train", threads, train_levels)
        except ValueError as exc:
            raise ValueError(f"train: rows {start}..{start + rows - 1}: {exc}") from None
        # per query block only the row offsets change (byte offsets: no tensor views in the loop,
        # which runs 13 times per call at the digits; every tensor here is contiguous)
        fixed = dict(
            queries_dtype=dtype_name(q.dtype),
            dim=dim,
            train_ptr=y_tile.data_ptr(),
            train_dtype=dtype_name(y.dtype),
            tile_start=start,
            tile=rows,
            y_norms_ptr=y_norms.data_ptr(),
            gram_ptr=gram_storage.data_ptr(),
            gram_dtype=dtype_name(gram_dtype),
            k=k,
            safety=CPU_SCREEN_SAFETY[precision],
        )
        q_ptr, q_row_bytes = q.data_ptr(), dim * q.element_size()
        q_norms_ptr, d2_ptr, idx_ptr = q_norms.data_ptr(), best_d2.data_ptr(), best_idx.data_ptr()
        for q_start in range(0, batch, query_block):
            q_rows = min(query_block, batch - q_start)
            gram = gram_storage[: q_rows * rows].view(q_rows, rows)
            _gram_tile(q_screen[q_start : q_start + q_rows], y_screen, gram)
            rescored += ext.knn_cpu_screen_tile(
                queries_ptr=q_ptr + q_start * q_row_bytes,
                batch=q_rows,
                q_norms_ptr=q_norms_ptr + q_start * 4 * 8,  # [B, 4] float64
                best_d2_ptr=d2_ptr + q_start * k * 8,  # [B, k] float64
                best_idx_ptr=idx_ptr + q_start * k * 8,  # [B, k] int64
                threads=_threads_for(q_rows * rows * 8, threads),
                **fixed,
            )
    if bool((best_idx == torch.iinfo(torch.int64).max).any()):  # impossible unless the bound is broken
        raise RuntimeError("knn cpu: fewer than k rows survived the screening (bound violated)")
    if stats is not None:
        stats.update(rescored=rescored, precision=precision)
    log.debug(
        "knn cpu: B=%d N=%d D=%d k=%d, %s screen, %d rows re-scored exactly (%.2f per query)",
        batch,
        n_train,
        dim,
        k,
        precision,
        rescored,
        rescored / batch,
    )
    return best_d2, best_idx


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same rows in memory (same start, shape, strides and dtype)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _precision_for(precision: str | None, dim: int) -> tuple[str, int]:
    """The screen for rows of ``dim`` (``precision`` or the process's choice) and the int8 levels of
    the training rows (0 unless int8). int8 needs INT8_MIN_DIM <= dim <= INT8_MAX_DIM, else the
    float choice is used."""
    choice = screen_choice()
    precision = precision or choice.knn_precision
    if precision == "int8":
        levels = int8_gemm_levels()
        if levels is None:
            raise RuntimeError(
                "knn: the int8 screen was asked for, but torch's int8 GEMM is not exact on this "
                "machine (probe failed); use DIFFCORE_CPU_SCREEN=auto, bf16 or fp32"
            )
        if INT8_MIN_DIM <= dim <= INT8_MAX_DIM:
            return "int8", levels
        precision = choice.precision
    if precision == "bf16" and not bf16_matmul_accumulates_in_fp32():
        raise RuntimeError(
            "knn: DIFFCORE_CPU_SCREEN=bf16, but torch's bf16 matmul does not accumulate in fp32 on "
            "this machine (probe failed), so the screening bound would not hold; use "
            "DIFFCORE_CPU_SCREEN=fp32 or auto"
        )
    return precision, 0


def _gram_tile(q_screen: torch.Tensor, y_screen: torch.Tensor, out: torch.Tensor) -> None:
    """out [Bq, R] = q_screen [Bq, D] @ y_screen [R, D]^T in the screening precision."""
    if q_screen.dtype == torch.int8:
        compat.int_mm(q_screen, y_screen.t(), out=out)  # exact int32 sums
        return
    with fp32_matmul_at_full_precision():
        torch.mm(q_screen, y_screen.t(), out=out)


def _screen_rows(
    rows: torch.Tensor,
    screen_dtype: torch.dtype,
    buffer: torch.Tensor | None,
    name: str,
    threads: int,
    int8_levels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` [R, D] in the screening dtype (``rows`` itself when it has that dtype already, else
    rounded into ``buffer``; int8: per-row scale, values in [-int8_levels, int8_levels]) and their
    norms [R, 4] float64: |x|^2, |x~|, |x - x~|, the int8 scale (1 otherwise)."""
    count, dim = rows.shape
    norms = torch.empty(count, 4, dtype=torch.float64)
    if rows.dtype == screen_dtype:
        out, dst = rows, 0
    else:
        out = (buffer if buffer is not None else torch.empty(count, dim, dtype=screen_dtype))[:count]
        dst = out.data_ptr()
    extension().knn_cpu_prepare_rows(
        src_ptr=rows.data_ptr(),
        dtype=dtype_name(rows.dtype),
        rows=count,
        dim=dim,
        row_stride=dim,
        dst_ptr=dst,
        dst_dtype=dtype_name(screen_dtype),
        int8_levels=int8_levels,
        norms_ptr=norms.data_ptr(),
        threads=_threads_for(count * dim, threads),
        arg_name=name,
    )
    return out, norms
