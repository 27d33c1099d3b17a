"""Exact k-nearest-neighbour search (l2) against a training set, streaming over training tiles.

``knn(queries, train, k)`` returns the ``k`` smallest l2 distances of each query to the rows of
``train`` and their indices, in increasing order, ties broken by the lower index: exactly the
answer of :func:`diffcore.ref.knn.knn_ref`.

Every fast backend works in two steps. A fast approximation of the squared distances (bf16 GEMM
on the CPU, ``tl.dot`` in fp32 or TF32 in Triton, fp32 difference-first tiles in CUDA) only
*screens*: its error is bounded rigorously (see csrc/knn/knn.cpp, kernels/knn.py and
csrc/knn/knn.cu), so a training row is discarded only when its lower bound exceeds a value that
the k-th best exact distance is certain not to exceed. The rows that survive are
re-scored exactly (difference first, then square, accumulated in double) and merged into a
per-query top-k ordered by (distance, index). Memory is O(B * tile), never [B, N].
"""
from __future__ import annotations

import functools
import logging

import torch

from diffcore import _checks
from diffcore._backend import OpBackends
from diffcore._ext import dtype_name, extension

log = logging.getLogger(__name__)

__all__ = ["knn"]

# `auto` lists only backends verified against the reference on that device type. The CUDA kernel
# and Triton on a GPU have never run on a GPU: they can be asked for by name, auto never picks them.
BACKENDS = OpBackends(
    op="knn",
    implemented=("reference", "cpu", "cuda", "triton"),
    auto_order={"cpu": ("cpu", "reference"), "cuda": ("reference",)},
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Safety factor on the GEMM's own error terms in the screening bound of the CPU path (fp32
# accumulation and bf16 output rounding: what torch's BLAS is assumed to do; csrc/knn/knn.cpp).
CPU_SCREEN_SAFETY = 4.0
# Training rows per tile (CPU): about 8 M elements (32 MB in fp32), enough for an efficient GEMM
# while the extra memory (bf16 tile copy, Gram tile [query block, tile]) stays bounded.
CPU_TILE_ELEMENTS = 1 << 23
CPU_GRAM_ELEMENTS = 1 << 24


def knn(queries: torch.Tensor, train: torch.Tensor, k: int = 2, *,
        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest training rows of each query, in l2.

    Args:
        queries: [B, ...] float16/bfloat16/float32/float64, finite.
        train: [N, ...] with the same trailing shape: the dtype of ``queries``, or uint8 images
            mapped to [-1, 1] as ``u8 / 127.5 - 1``.
        k: 1 <= k <= N.
        backend: "auto", "reference", "cpu", "triton" or "cuda".
    Returns:
        ``(distances [B, k], indices [B, k] int64)``: exact l2 distances (not squared) in
        increasing order, among equal distances the lower index first. Distances are float64 for
        float64 queries and float32 otherwise. Not differentiable (results are computed without
        autograd).

    Every backend rejects values of magnitude above 1e15 (``MAX_MAGNITUDE``: the ``cpu`` kernel's
    screening bound assumes no fp32 overflow, and one contract holds for all backends);
    ``triton`` takes k <= 16, ``cuda`` k <= 16 and no float64 queries.

    Example:
        >>> d, i = knn(torch.randn(4, 3, 8, 8), torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8), k=2)
    """
    q, y, k = _validate(queries, train, k)
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    name = BACKENDS.resolve(backend, q.device)
    if name != "cpu":  # the CPU kernel checks the training rows while it converts them
        _check_magnitude("train", y)
    with torch.no_grad():
        d2, idx = _IMPLS[name](q, y, k)
    return d2.sqrt().to(out_dtype), idx


MAX_MAGNITUDE = 1e15  # the largest |value| any backend accepts (the cpu kernel's kMaxMagnitude)


def _check_magnitude(name: str, values: torch.Tensor) -> None:
    """Finite values of magnitude <= MAX_MAGNITUDE (uint8 images always are)."""
    _checks.check_finite(name, values)
    if values.is_floating_point() and values.numel() and float(values.abs().max()) > MAX_MAGNITUDE:
        raise ValueError(f"{name}: expected values of magnitude <= {MAX_MAGNITUDE:g} (every backend), "
                         f"got {float(values.abs().max()):g}")


def _validate(queries, train, k):
    """[B, D] queries, [N, D] train (contiguous), k; raises with the name of the bad argument."""
    _checks.check_tensor("queries", queries, min_ndim=2, dtypes=FLOAT_DTYPES)
    _checks.check_tensor("train", train, min_ndim=2, dtypes=FLOAT_DTYPES + (torch.uint8,), nonempty=False)
    if train.shape[0] == 0 or train.numel() == 0:
        raise ValueError(f"train: expected a non-empty training set, got shape {tuple(train.shape)}")
    if tuple(train.shape[1:]) != tuple(queries.shape[1:]):
        raise ValueError(f"train: trailing shape {tuple(train.shape[1:])} does not match the trailing shape "
                         f"{tuple(queries.shape[1:])} of queries")
    if train.dtype != torch.uint8 and train.dtype != queries.dtype:
        raise TypeError(f"train: expected dtype {dtype_name(queries.dtype)} (the dtype of queries) or uint8, "
                        f"got {dtype_name(train.dtype)}")
    _checks.check_same_device(queries=queries, train=train)
    _checks.check_positive_int("k", k)
    n_train = train.shape[0]
    if k > n_train:
        raise ValueError(f"k: expected k <= N = {n_train} (the number of training rows), got {k}")
    _check_magnitude("queries", queries)
    q = queries.detach().reshape(queries.shape[0], -1).contiguous()
    y = train.detach().reshape(n_train, -1).contiguous()
    return q, y, k


# ----------------------------------------------------------------------------------------------
# Backends. Each takes q [B, D], y [N, D] (contiguous) and returns (squared distances float64
# [B, k], indices int64 [B, k]).

def _knn_reference(q, y, k):
    from diffcore.ref.knn import knn_ref

    d, idx = knn_ref(q, y, k)
    return d.square(), idx


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


def _knn_cpu(q, y, k, *, stats: dict | None = None):
    """bf16 GEMM screening (torch BLAS, in tiles) + exact C++ re-scoring and top-k merge.

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
    ext.knn_cpu_prepare_rows(q.data_ptr(), dtype_name(q.dtype), batch, dim, dim, q_bf16.data_ptr(),
                             q_norms.data_ptr(), _threads_for(batch * dim, threads), "queries")
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
            ext.knn_cpu_prepare_rows(y_tile.data_ptr(), dtype_name(y.dtype), rows, dim, dim, y_bf16.data_ptr(),
                                     y_norms.data_ptr(), _threads_for(rows * dim, threads), "train")
        except ValueError as exc:
            raise ValueError(f"train: rows {start}..{start + rows - 1}: {exc}") from None
        for q_start in range(0, batch, query_block):
            q_rows = min(query_block, batch - q_start)
            gram = gram_storage[:q_rows * rows].view(q_rows, rows)
            torch.mm(q_bf16[q_start:q_start + q_rows], y_bf16[:rows].t(), out=gram)
            rescored += ext.knn_cpu_screen_tile(
                q[q_start].data_ptr(), dtype_name(q.dtype), q_rows, dim, q_norms[q_start].data_ptr(),
                y_tile.data_ptr(), dtype_name(y.dtype), start, rows, y_norms.data_ptr(), gram.data_ptr(), k,
                best_d2[q_start].data_ptr(), best_idx[q_start].data_ptr(), CPU_SCREEN_SAFETY,
                _threads_for(q_rows * rows * 8, threads))
    if bool((best_idx == torch.iinfo(torch.int64).max).any()):  # impossible unless the bound is broken
        raise RuntimeError("knn cpu: fewer than k rows survived the screening (bound violated)")
    if stats is not None:
        stats["rescored"] = rescored
    log.debug("knn cpu: B=%d N=%d D=%d k=%d, %d rows re-scored exactly (%.2f per query)",
              batch, n_train, dim, k, rescored, rescored / batch)
    return best_d2, best_idx


def _knn_triton(q, y, k):
    from diffcore.kernels.knn import knn_triton

    return knn_triton(q, y, k)


CUDA_MAX_K = 16
CUDA_TILE = 4096


def _knn_cuda(q, y, k):
    """CUDA kernel (csrc/knn/knn.cu): fp32 difference-first screening tiles + exact double
    re-scoring per query block. Never run on a GPU yet: not in the auto order."""
    ext = extension()
    if k > CUDA_MAX_K:
        raise ValueError(f"k: the cuda backend supports k <= {CUDA_MAX_K}, got {k}; use backend='triton' or "
                         f"'reference'")
    if q.dtype == torch.float64:
        raise TypeError("queries: the cuda backend takes float16/bfloat16/float32 queries (float64 would be "
                        "rounded, breaking exactness); use backend='triton', 'cpu' or 'reference'")
    q = q.float()  # lossless for float16/bfloat16
    if y.dtype not in (torch.float32, torch.uint8):
        y = y.float()
    batch, dim = q.shape
    n_train = y.shape[0]
    tile = min(n_train, CUDA_TILE)
    workspace = torch.empty(batch * tile, dtype=torch.float32, device=q.device)
    best_d2 = torch.full((batch, k), float("inf"), dtype=torch.float64, device=q.device)
    best_idx = torch.full((batch, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=q.device)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    with torch.cuda.device(q.device):
        ext.knn_cuda(q.data_ptr(), y.data_ptr(), dtype_name(y.dtype), batch, n_train, dim, k, tile,
                     workspace.data_ptr(), best_d2.data_ptr(), best_idx.data_ptr(), stream)
    return best_d2, best_idx


_IMPLS = {"reference": _knn_reference, "cpu": _knn_cpu, "triton": _knn_triton, "cuda": _knn_cuda}
