"""Triton kernels of exact k-NN (l2): fp32 ``tl.dot`` screening with a rigorous bound, then an
exact float64 re-scoring pass over the candidate list.

Three steps, all streaming over training tiles (memory O(B * candidates), never [B, N]):

1. ``_knn_upper_kernel``: per query, the k-th smallest *upper* bound of the squared distance over
   the whole training set, with a running top-k held in registers (k <= 16). Some k rows have an
   exact squared distance <= that value, so it bounds the k-th best exact distance from above.
2. ``_knn_collect_kernel``: per query, the indices of every row whose *lower* bound is <= that
   value (in increasing index order). No other row can be among the k nearest.
3. ``_knn_exact_kernel``: exact squared distances of the candidates, difference first, in float64
   (uint8 rows as ``u / 127.5 - 1`` in float64, as the reference). A stable sort of the candidates
   by distance (they are listed in index order) gives the top-k with ties to the lower index.

Bound (u = 2^-24; fp32 ``tl.dot`` with ``input_precision="ieee"``, fp32 norms, the fp32
evaluation of ``|q|^2 + |y|^2 - 2 q.y`` and of the bounds, the rounding of float64 queries to fp32):
``| approx - d^2 | <= (2 gamma_D + 16 u) (|q|^2 + |y|^2)`` with gamma_D = D u / (1 - D u), using
``2 |q| |y| <= |q|^2 + |y|^2``. uint8 rows are mapped to fp32 with an absolute error of at most
3u per element (relative to ``|y_i|`` it is unbounded near 0), which adds at most
``6u (|q|^2 + |y|^2) + 3u D``. The kernels use twice the sum (``SAFETY``):
``slack = SAFETY ((2 gamma_D + 22 u) (|q|^2 + |y|^2) + [uint8] 3u D)``.

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
BLOCK_B = 16
BLOCK_N = 32
BLOCK_D = 32
BLOCK_C = 16


def screen_slack(dim: int, is_uint8: bool) -> tuple[float, float]:
    """(C, A) with |approx - d^2| <= C (|q|^2 + |y|^2) + A for the fp32 screening (module docstring)."""
    unit = 2.0 ** -24
    gamma = dim * unit / (1.0 - dim * unit)
    return SAFETY * (2.0 * gamma + 22.0 * unit), SAFETY * 3.0 * unit * dim if is_uint8 else 0.0


@triton.jit
def _load_train(y_ptr, rows, cols, mask, dim, IS_UINT8: tl.constexpr):
    v = tl.load(y_ptr + rows[:, None] * dim + cols[None, :], mask=mask, other=0)
    if IS_UINT8:
        return v.to(tl.float32) * (1.0 / 127.5) - 1.0
    return v.to(tl.float32)


@triton.jit
def _approx_tile(q_ptr, y_ptr, q_rows, y_rows, batch, n_train, dim: tl.constexpr, coef, abs_slack,
                 IS_UINT8: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """approx squared distances [BLOCK_B, BLOCK_N] = |q|^2 + |y|^2 - 2 q.y (fp32) and the slack."""
    dot = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    qn = tl.zeros((BLOCK_B,), dtype=tl.float32)
    yn = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + q_rows[:, None] * dim + cols[None, :],
                    mask=(q_rows[:, None] < batch) & (cols[None, :] < dim), other=0.0)
        y = _load_train(y_ptr, y_rows, cols, (y_rows[:, None] < n_train) & (cols[None, :] < dim), dim, IS_UINT8)
        dot += tl.dot(q, tl.trans(y), input_precision="ieee")
        qn += tl.sum(q * q, axis=1)
        yn += tl.sum(y * y, axis=1)
    approx = qn[:, None] + yn[None, :] - 2.0 * dot
    slack = coef * (qn[:, None] + yn[None, :]) + abs_slack
    return approx, slack


@triton.jit
def _knn_upper_kernel(q_ptr, y_ptr, upper_ptr, batch, n_train: tl.constexpr, dim: tl.constexpr, coef,
                      abs_slack, K: tl.constexpr, KP: tl.constexpr, IS_UINT8: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    q_rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    slots = tl.arange(0, KP)
    # running k smallest upper bounds; padding slots hold -inf so they are never the max
    best = tl.where(slots[None, :] < K, float("inf"), float("-inf")) + tl.zeros((BLOCK_B, KP), dtype=tl.float32)
    for n0 in range(0, n_train, BLOCK_N):
        y_rows = n0 + tl.arange(0, BLOCK_N)
        approx, slack = _approx_tile(q_ptr, y_ptr, q_rows, y_rows, batch, n_train, dim, coef, abs_slack,
                                     IS_UINT8, BLOCK_B, BLOCK_N, BLOCK_D)
        upper = tl.where(y_rows[None, :] < n_train, approx + slack, float("inf"))
        cols = tl.arange(0, BLOCK_N)
        for _ in range(K):  # merge the tile's K smallest into the running top-k
            smallest = tl.min(upper, axis=1)
            where_smallest = tl.argmin(upper, axis=1)
            largest = tl.max(best, axis=1)
            where_largest = tl.argmax(best, axis=1)
            replace = (slots[None, :] == where_largest[:, None]) & (smallest < largest)[:, None]
            best = tl.where(replace, smallest[:, None], best)
            upper = tl.where(cols[None, :] == where_smallest[:, None], float("inf"), upper)
    tl.store(upper_ptr + q_rows, tl.max(best, axis=1), mask=q_rows < batch)


@triton.jit
def _knn_collect_kernel(q_ptr, y_ptr, upper_ptr, cand_ptr, count_ptr, batch, n_train: tl.constexpr,
                        dim: tl.constexpr, coef, abs_slack, capacity,
                        IS_UINT8: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    q_rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cut = tl.load(upper_ptr + q_rows, mask=q_rows < batch, other=float("-inf"))
    count = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for n0 in range(0, n_train, BLOCK_N):
        y_rows = n0 + tl.arange(0, BLOCK_N)
        approx, slack = _approx_tile(q_ptr, y_ptr, q_rows, y_rows, batch, n_train, dim, coef, abs_slack,
                                     IS_UINT8, BLOCK_B, BLOCK_N, BLOCK_D)
        keep = (approx - slack <= cut[:, None]) & (y_rows[None, :] < n_train) & (q_rows[:, None] < batch)
        keep_i = keep.to(tl.int32)
        slot = count[:, None] + tl.cumsum(keep_i, axis=1) - 1
        tl.store(cand_ptr + q_rows[:, None].to(tl.int64) * capacity + slot,
                 y_rows[None, :].to(tl.int64) + tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.int64),
                 mask=keep & (slot < capacity))
        count += tl.sum(keep_i, axis=1)
    tl.store(count_ptr + q_rows, count, mask=q_rows < batch)


@triton.jit
def _knn_exact_kernel(q_ptr, y_ptr, cand_ptr, count_ptr, out_ptr, dim: tl.constexpr, capacity, IS_UINT8: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
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


def knn_triton(q: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN with Triton. q [B, D] float, y [N, D] float or uint8, contiguous, same device.

    Returns (squared distances float64 [B, k], indices int64 [B, k]), ordered by (distance, index).
    """
    if k > MAX_K:
        raise ValueError(f"k: the triton backend keeps a register top-k of at most {MAX_K}, got k={k}; "
                         f"use backend='cpu' or 'reference' for larger k")
    batch, dim = q.shape
    n_train = y.shape[0]
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()  # lossless
    is_uint8 = y.dtype == torch.uint8
    q_exact = q if q.dtype == torch.float64 else q.float()
    q32 = q.float().contiguous()
    y_screen = y if is_uint8 or y.dtype == torch.float32 else y.float()
    coef, abs_slack = screen_slack(dim, is_uint8)
    grid = (triton.cdiv(batch, BLOCK_B),)
    upper = torch.empty(batch, dtype=torch.float32, device=q.device)
    _knn_upper_kernel[grid](q32, y_screen, upper, batch, n_train, dim, coef, abs_slack, K=k,
                            KP=triton.next_power_of_2(k), IS_UINT8=is_uint8, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N,
                            BLOCK_D=BLOCK_D)
    capacity = max(4 * k, 32)
    while True:
        cand = torch.empty(batch, capacity, dtype=torch.int64, device=q.device)
        count = torch.empty(batch, dtype=torch.int32, device=q.device)
        _knn_collect_kernel[grid](q32, y_screen, upper, cand, count, batch, n_train, dim, coef, abs_slack,
                                  capacity, IS_UINT8=is_uint8, BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
        needed = int(count.max())
        if needed <= capacity:
            break
        capacity = needed  # rerun with room for every candidate (rare: many near-ties)
    if int(count.min()) < k:  # impossible unless the bound is broken: fail loudly, never silently
        raise RuntimeError("knn triton: fewer than k candidates survived the screening (bound violated)")
    exact = torch.empty(batch, capacity, dtype=torch.float64, device=q.device)
    _knn_exact_kernel[(batch, triton.cdiv(capacity, BLOCK_C))](
        q_exact.contiguous(), y, cand, count, exact, dim, capacity, IS_UINT8=is_uint8,
        BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D)
    order = torch.sort(exact, dim=1, stable=True).indices[:, :k]
    return exact.gather(1, order), cand.gather(1, order)
