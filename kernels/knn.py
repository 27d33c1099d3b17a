"""Triton kernels of exact k-NN (l2): ``tl.dot`` screening with a rigorous bound, then an exact
float64 re-scoring pass over the candidate list.

Two steps, streaming over training tiles (memory O(B * candidates), never [B, N]):

1. ``_knn_screen_kernel`` (one program per block of queries, training tiles in index order):
   a running top-k of the *upper* bounds of the squared distances, held in registers (k <= 16):
   after a tile is merged, some k rows have an exact squared distance <= its largest entry U, and
   U only decreases. Every row of the tile whose *lower* bound is <= U is appended to the query's
   candidate list (in index order). A row whose lower bound exceeds U when its tile is screened
   has d^2 > U >= the final k-th best, so it can never be among the k nearest: the list is a
   superset of the answer (rows listed early, while U was still loose, are harmless).
2. ``_knn_exact_kernel``: exact squared distances of the candidates, difference first, in float64
   (uint8 rows as ``u / 127.5 - 1`` in float64, as the reference). A stable sort of the candidates
   by distance (listed in index order) gives the top-k with ties to the lower index.

Bound (u = 2^-24): with fp32 ``tl.dot`` (``input_precision="ieee"``), fp32 norms, the fp32
evaluation of ``|q|^2 + |y|^2 - 2 q.y`` and of the bounds, and the rounding of float64 queries to
fp32: ``| approx - d^2 | <= (2 gamma_D + 16 u) (|q|^2 + |y|^2)`` with gamma_D = D u / (1 - D u),
using ``2 |q| |y| <= |q|^2 + |y|^2``. uint8 rows are mapped to fp32 with an absolute error of at
most 3u per element (unbounded relative to ``|y_i|`` near 0), which adds at most
``6u (|q|^2 + |y|^2) + 3u D``. On a GPU the dot runs in TF32 (``input_precision="tf32"``): each
input loses at most u_in = 2^-10 relative (covers round-to-nearest and truncation), adding
``(2 u_in + u_in^2) (|q|^2 + |y|^2)``. The kernels use twice the sum (``SAFETY``).

The training-set size and the dimension are ``tl.constexpr`` (loop trip counts): one compilation
per (N, D), and it keeps the loops runnable in the interpreter with NumPy >= 2.4, whose arrays no
longer convert to Python ints as the interpreter's runtime loop bounds need.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 16
SAFETY = 2.0


def block_sizes(on_gpu: bool) -> dict:
    """Tile sizes: small in the interpreter (each op is a NumPy call), larger on a GPU."""
    if on_gpu:
        return dict(BLOCK_B=64, BLOCK_N=64, BLOCK_D=32, BLOCK_C=16)
    return dict(BLOCK_B=16, BLOCK_N=32, BLOCK_D=128, BLOCK_C=16)


def screen_slack(dim: int, is_uint8: bool, tf32: bool) -> tuple[float, float]:
    """(C, A) with |approx - d^2| <= C (|q|^2 + |y|^2) + A for the screening (module docstring)."""
    unit = 2.0**-24
    gamma = dim * unit / (1.0 - dim * unit)
    relative = 2.0 * gamma + 22.0 * unit
    if tf32:
        u_in = 2.0**-10
        relative += 2.0 * u_in + u_in * u_in
    absolute = 3.0 * unit * dim if is_uint8 else 0.0
    return SAFETY * relative, SAFETY * absolute


@triton.jit
def _load_train(y_ptr, rows, cols, mask, dim, IS_UINT8: tl.constexpr):
    v = tl.load(y_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :], mask=mask, other=0)
    if IS_UINT8:
        return v.to(tl.float32) * (1.0 / 127.5) - 1.0
    return v.to(tl.float32)


@triton.jit
def _knn_screen_kernel(
    q_ptr,
    y_ptr,
    cand_ptr,
    count_ptr,
    batch,
    n_train: tl.constexpr,
    dim: tl.constexpr,
    coef,
    abs_slack,
    capacity,
    K: tl.constexpr,
    KP: tl.constexpr,
    IS_UINT8: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    q_rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    q_ok = q_rows < batch
    slots = tl.arange(0, KP)
    cols = tl.arange(0, BLOCK_N)
    # running k smallest upper bounds; padding slots hold -inf so they are never the largest
    best = tl.where(slots[None, :] < K, float("inf"), float("-inf")) + tl.zeros((BLOCK_B, KP), dtype=tl.float32)
    count = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for n0 in range(0, n_train, BLOCK_N):
        y_rows = n0 + cols
        y_ok = y_rows < n_train
        # approx squared distances |q|^2 + |y|^2 - 2 q.y of the tile, fp32
        dot = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        qn = tl.zeros((BLOCK_B,), dtype=tl.float32)
        yn = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            d_ok = dims < dim
            q = tl.load(
                q_ptr + q_rows[:, None].to(tl.int64) * dim + dims[None, :],
                mask=q_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            y = _load_train(y_ptr, y_rows, dims, y_ok[:, None] & d_ok[None, :], dim, IS_UINT8)
            if TF32:
                dot += tl.dot(q, tl.trans(y), input_precision="tf32")
            else:
                dot += tl.dot(q, tl.trans(y), input_precision="ieee")
            qn += tl.sum(q * q, axis=1)
            yn += tl.sum(y * y, axis=1)
        approx = qn[:, None] + yn[None, :] - 2.0 * dot
        slack = coef * (qn[:, None] + yn[None, :]) + abs_slack
        # merge the tile's K smallest upper bounds into the running top-k
        upper = tl.where(y_ok[None, :], approx + slack, float("inf"))
        for _ in range(K):
            smallest = tl.min(upper, axis=1)
            where_smallest = tl.argmin(upper, axis=1)
            largest = tl.max(best, axis=1)
            where_largest = tl.argmax(best, axis=1)
            replace = (slots[None, :] == where_largest[:, None]) & (smallest < largest)[:, None]
            best = tl.where(replace, smallest[:, None], best)
            upper = tl.where(cols[None, :] == where_smallest[:, None], float("inf"), upper)
        cut = tl.max(best, axis=1)
        # candidates of this tile: lower bound <= the current k-th upper bound
        keep = (approx - slack <= cut[:, None]) & y_ok[None, :] & q_ok[:, None]
        keep_i = keep.to(tl.int32)
        slot = count[:, None] + tl.cumsum(keep_i, axis=1) - 1
        tl.store(
            cand_ptr + q_rows[:, None].to(tl.int64) * capacity + slot,
            y_rows[None, :].to(tl.int64) + tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.int64),
            mask=keep & (slot < capacity),
        )
        count += tl.sum(keep_i, axis=1)
    tl.store(count_ptr + q_rows, count, mask=q_ok)


@triton.jit
def _knn_exact_kernel(
    q_ptr,
    y_ptr,
    cand_ptr,
    count_ptr,
    out_ptr,
    dim: tl.constexpr,
    capacity,
    IS_UINT8: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, c] = exact squared distance of query b to candidate c (float64), +inf past the count."""
    b = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    slots = c0 + tl.arange(0, BLOCK_C)
    count = tl.load(count_ptr + b)
    valid = slots < count
    rows = tl.load(cand_ptr + b.to(tl.int64) * capacity + slots, mask=valid, other=0)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_dim = cols < dim
        q = tl.load(q_ptr + b.to(tl.int64) * dim + cols, mask=in_dim, other=0).to(tl.float64)
        y = tl.load(y_ptr + rows[:, None] * dim + cols[None, :], mask=valid[:, None] & in_dim[None, :], other=0)
        if IS_UINT8:
            y = y.to(tl.float64) / 127.5 - 1.0
        else:
            y = y.to(tl.float64)
        diff = tl.where(in_dim[None, :], q[None, :] - y, 0.0)
        acc += tl.sum(diff * diff, axis=1)
    acc = tl.where(valid, acc, float("inf"))
    tl.store(out_ptr + b.to(tl.int64) * capacity + slots, acc, mask=slots < capacity)


def knn_triton(
    q: torch.Tensor, y: torch.Tensor, k: int, *, stats: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN with Triton. q [B, D] float, y [N, D] float or uint8, contiguous, same device.

    Returns (squared distances float64 [B, k], indices int64 [B, k]), ordered by (distance, index).
    ``stats``, if given, receives ``rescored`` (candidates re-scored exactly, all queries together).
    """
    if k > MAX_K:
        raise ValueError(
            f"k: the triton backend keeps a register top-k of at most {MAX_K}, got k={k}; "
            f"use backend='cpu' or 'reference' for larger k"
        )
    batch, dim = q.shape
    n_train = y.shape[0]
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()  # lossless
    is_uint8 = y.dtype == torch.uint8
    on_gpu = q.device.type == "cuda"
    blocks = block_sizes(on_gpu)
    q_exact = q.contiguous() if q.dtype == torch.float64 else q.float().contiguous()
    q32 = q.float().contiguous()
    y_screen = y if is_uint8 or y.dtype == torch.float32 else y.float()
    coef, abs_slack = screen_slack(dim, is_uint8, tf32=on_gpu)
    grid = (triton.cdiv(batch, blocks["BLOCK_B"]),)
    capacity = max(4 * k, 32)
    while True:
        cand = torch.empty(batch, capacity, dtype=torch.int64, device=q.device)
        count = torch.empty(batch, dtype=torch.int32, device=q.device)
        _knn_screen_kernel[grid](
            q32,
            y_screen,
            cand,
            count,
            batch,
            n_train,
            dim,
            coef,
            abs_slack,
            capacity,
            K=k,
            KP=triton.next_power_of_2(k),
            IS_UINT8=is_uint8,
            TF32=on_gpu,
            BLOCK_B=blocks["BLOCK_B"],
            BLOCK_N=blocks["BLOCK_N"],
            BLOCK_D=blocks["BLOCK_D"],
        )
        needed = int(count.max())
        if needed <= capacity:
            break
        capacity = needed  # rerun with room for every candidate (many near-ties)
    if int(count.min()) < k:  # impossible unless the bound is broken: fail loudly, never silently
        raise RuntimeError("knn triton: fewer than k candidates survived the screening (bound violated)")
    if stats is not None:
        stats["rescored"] = int(count.sum())
    exact = torch.empty(batch, capacity, dtype=torch.float64, device=q.device)
    _knn_exact_kernel[(batch, triton.cdiv(capacity, blocks["BLOCK_C"]))](
        q_exact,
        y,
        cand,
        count,
        exact,
        dim,
        capacity,
        IS_UINT8=is_uint8,
        BLOCK_C=blocks["BLOCK_C"],
        BLOCK_D=blocks["BLOCK_D"],
    )
    order = torch.sort(exact, dim=1, stable=True).indices[:, :k]
    return exact.gather(1, order), cand.gather(1, order)
