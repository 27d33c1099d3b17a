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

This module holds the checks, the backend resolution and the table of runners; the CPU host code
is in ``_knn_cpu.py``, the CUDA launcher in ``_knn_cuda.py``.
"""

from __future__ import annotations

import contextlib

import torch

from diffcore import _checks
from diffcore._backend import OpBackends
from diffcore._ext import dtype_name
from diffcore.ops import _knn_cpu, _knn_cuda

__all__ = ["knn"]

# `auto` lists only backends verified against the reference on that device type. The CUDA kernel
# and Triton on a GPU have never run on a GPU: they can be asked for by name, auto never picks them.
BACKENDS = OpBackends(
    op="knn",
    implemented=("reference", "cpu", "cuda", "triton"),
    auto_order={"cpu": ("cpu", "reference"), "cuda": ("reference",)},
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def knn(
    queries: torch.Tensor, train: torch.Tensor, k: int = 2, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
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
    with _small_cpu_problem_on_one_thread(queries, train, backend):
        q, y, k = _validate(queries, train, k)
        out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        name = BACKENDS.resolve(backend, q.device)
        if name != "cpu":  # the CPU kernel checks the training rows while it converts them
            _checks.check_magnitude("train", y)
        with torch.no_grad():
            d2, idx = RUNNERS[name](q, y, k)
        return d2.sqrt().to(out_dtype), idx


def _small_cpu_problem_on_one_thread(queries, train, backend):
    """One torch thread for the whole call (checks included) when the ``cpu`` backend is asked for
    (or ``auto``) with CPU tensors and the problem is small (``_knn_cpu.one_thread_if_small``);
    otherwise a no-op context."""
    if (
        backend in ("auto", "cpu")
        and isinstance(queries, torch.Tensor)
        and isinstance(train, torch.Tensor)
        and queries.device.type == "cpu"
        and train.device.type == "cpu"
        and queries.ndim >= 1
        and train.ndim >= 1
        and queries.shape[0] > 0
    ):
        dim = queries.numel() // queries.shape[0]
        return _knn_cpu.one_thread_if_small(queries.shape[0], train.shape[0], dim)
    return contextlib.nullcontext()


def _validate(queries, train, k):
    """[B, D] queries, [N, D] train (contiguous), k; raises with the name of the bad argument."""
    _checks.check_tensor("queries", queries, min_ndim=2, dtypes=FLOAT_DTYPES)
    _checks.check_tensor("train", train, min_ndim=2, dtypes=FLOAT_DTYPES + (torch.uint8,), nonempty=False)
    _checks.check_training_set(train, queries, "queries")
    if train.dtype != torch.uint8 and train.dtype != queries.dtype:
        raise TypeError(
            f"train: expected dtype {dtype_name(queries.dtype)} (the dtype of queries) or uint8, "
            f"got {dtype_name(train.dtype)}"
        )
    _checks.check_same_device(queries=queries, train=train)
    _checks.check_positive_int("k", k)
    n_train = train.shape[0]
    if k > n_train:
        raise ValueError(f"k: expected k <= N = {n_train} (the number of training rows), got {k}")
    _checks.check_magnitude("queries", queries)
    q = queries.detach().reshape(queries.shape[0], -1).contiguous()
    y = train.detach().reshape(n_train, -1).contiguous()
    return q, y, k


# Every runner takes q [B, D], y [N, D] (contiguous) and k and returns (squared distances float64
# [B, k], indices int64 [B, k]).
def _run_reference(q, y, k):
    from diffcore.ref.knn import knn_ref

    d, idx = knn_ref(q, y, k)
    return d.square(), idx


def _run_triton(q, y, k):
    from diffcore.kernels.knn import knn_triton

    return knn_triton(q, y, k)


RUNNERS = {"reference": _run_reference, "cpu": _knn_cpu.run, "triton": _run_triton, "cuda": _knn_cuda.run}
