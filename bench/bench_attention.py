"""Attention benchmarks: forward, forward+backward and forward+JVP of diffcore.ops.attention
against SDPA (torch's best backend for the device) and against torch.func.jvp over the math
formula (the only way to get a JVP from plain torch; SDPA's fused kernels have no forward AD).

CPU target (issue 4): forward + JVP at most 3x SDPA's forward time ("fwd_jvp_vs_sdpa_fwd":
speedup_vs_peer >= 1/3). GPU benchmarks (marked gpu) run fp16/bf16 and record TFLOP/s.
Run: python -m pytest bench/bench_attention.py --benchmark-only -p no:cacheprovider
(DIFFCORE_BENCH_QUICK=1: small shapes, seconds).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchutil import QUICK, record_ratio, run_timed

import diffcore
from diffcore.ref.attention import attention_math

CPU_SHAPES = [(2, 2, 64, 32)] if QUICK else [(64, 1, 256, 256), (64, 4, 256, 64), (8, 8, 1024, 64)]
GPU_SHAPES = (
    [(2, 2, 128, 64)]
    if QUICK
    else [(64, 1, 256, 256), (64, 4, 256, 64), (8, 8, 1024, 64), (4, 16, 4096, 64), (1, 16, 8192, 64)]
)


def _case(shape) -> str:
    return "B{}_H{}_L{}_d{}".format(*shape)


def _inputs(shape, device="cpu", dtype=torch.float32, grad=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    ts = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(6)]
    if grad:
        for t in ts[:3]:
            t.requires_grad_()
    return ts


def _flops(shape, kind: str) -> float:
    b, h, l, d = shape
    fwd = 4.0 * b * h * l * l * d  # q k^T and P v
    return {"fwd": fwd, "fwd_bwd": 3.5 * fwd, "fwd_jvp": 3.0 * fwd}[kind]


def _sdpa_fwd(q, k, v):
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v)


def _ours_fwd(q, k, v, backend="auto"):
    with torch.no_grad():
        return diffcore.ops.attention(q, k, v, backend=backend)


def _fwd_bwd(fn, q, k, v, d_o):
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v).backward(d_o)
    return q.grad


def _jvp(fn, q, k, v, tq, tk, tv):
    with torch.no_grad():
        return torch.func.jvp(fn, (q, k, v), (tq, tk, tv))[1]


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_case)
@pytest.mark.parametrize("role", ["peer", "diffcore"])
def test_cpu_forward(benchmark, shape, role):
    q, k, v, *_ = _inputs(shape)
    benchmark.group = f"attention_fwd_cpu_{_case(shape)}"
    fn = _sdpa_fwd if role == "peer" else _ours_fwd
    run_timed(benchmark, lambda: fn(q, k, v))
    record_ratio(benchmark, "fwd_cpu", _case(shape), role, flops=_flops(shape, "fwd"), peer=lambda: _sdpa_fwd(q, k, v))


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_case)
@pytest.mark.parametrize("role", ["peer", "diffcore"])
def test_cpu_forward_backward(benchmark, shape, role):
    q, k, v, d_o, *_ = _inputs(shape, grad=True)
    benchmark.group = f"attention_fwd_bwd_cpu_{_case(shape)}"
    fn = F.scaled_dot_product_attention if role == "peer" else diffcore.ops.attention
    run_timed(benchmark, lambda: _fwd_bwd(fn, q, k, v, d_o.detach()))
    record_ratio(
        benchmark,
        "fwd_bwd_cpu",
        _case(shape),
        role,
        flops=_flops(shape, "fwd_bwd"),
        peer=lambda: _fwd_bwd(F.scaled_dot_product_attention, q, k, v, d_o.detach()),
    )


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_case)
@pytest.mark.parametrize("role", ["peer", "diffcore"])
def test_cpu_forward_jvp_vs_math_jvp(benchmark, shape, role):
    """Peer: torch.func.jvp over the math formula (SDPA's CPU kernel has no forward AD)."""
    args = _inputs(shape)
    benchmark.group = f"attention_fwd_jvp_cpu_{_case(shape)}"
    fn = attention_math if role == "peer" else diffcore.ops.attention
    run_timed(benchmark, lambda: _jvp(fn, *args), rounds=2 if role == "peer" else 3)
    record_ratio(
        benchmark,
        "fwd_jvp_cpu",
        _case(shape),
        role,
        flops=_flops(shape, "fwd_jvp"),
        peer=lambda: _jvp(attention_math, *args),
        peer_rounds=2,
    )


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_case)
@pytest.mark.parametrize("role", ["peer", "diffcore"])
def test_cpu_forward_jvp_vs_sdpa_forward(benchmark, shape, role):
    """The issue's CPU target: diffcore forward + JVP within 3x of SDPA forward alone
    (speedup_vs_peer >= 0.333)."""
    args = _inputs(shape)
    benchmark.group = f"attention_fwd_jvp_vs_sdpa_fwd_cpu_{_case(shape)}"
    if role == "peer":
        run_timed(benchmark, lambda: _sdpa_fwd(*args[:3]))
    else:
        run_timed(benchmark, lambda: _jvp(diffcore.ops.attention, *args))
    record_ratio(benchmark, "fwd_jvp_vs_sdpa_fwd_cpu", _case(shape), role, peer=lambda: _sdpa_fwd(*args[:3]))


# ------------------------------------------------------------------------------------------ GPU
GPU_DTYPES = [torch.float16, torch.bfloat16]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_cases(test):
    """A GPU benchmark's marks: ``gpu``, skipped without a GPU, over GPU_DTYPES x GPU_SHAPES x
    (peer, diffcore); applied in the order of the decorators they replace, so the ids are unchanged."""
    for mark in (
        pytest.mark.parametrize("role", ["peer", "diffcore"]),
        pytest.mark.parametrize("shape", GPU_SHAPES, ids=_case),
        pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str),
        needs_gpu,
        pytest.mark.gpu,
    ):
        test = mark(test)
    return test


def _bench_gpu(benchmark, kind: str, shape, dtype, role: str, ours, peer, *, rounds: int, warmup_rounds: int, **record):
    """Time ``peer()`` (role peer) or ``ours()`` (role diffcore) on the GPU, ``rounds`` timed calls
    after ``warmup_rounds``, and record the ratio with the peer timed the same way in this test;
    ``kind``: fwd, fwd_bwd or fwd_jvp; ``record``: further ``record_ratio`` fields."""
    benchmark.group = f"attention_{kind}_gpu_{_case(shape)}_{dtype}"
    run_timed(benchmark, peer if role == "peer" else ours, device="cuda", rounds=rounds, warmup_rounds=warmup_rounds)
    record_ratio(
        benchmark,
        f"{kind}_gpu_{dtype}",
        _case(shape),
        role,
        flops=_flops(shape, kind),
        peer=peer,
        device="cuda",
        peer_rounds=rounds,
        peer_warmup_rounds=warmup_rounds,
        **record,
    )


@_gpu_cases
def test_gpu_forward(benchmark, shape, dtype, role):
    q, k, v, *_ = _inputs(shape, "cuda", dtype)
    ours, peer = lambda: _ours_fwd(q, k, v, backend="triton"), lambda: _sdpa_fwd(q, k, v)
    nbytes = 4 * q.numel() * q.element_size()
    _bench_gpu(benchmark, "fwd", shape, dtype, role, ours, peer, rounds=20, warmup_rounds=3, nbytes=nbytes)


@_gpu_cases
def test_gpu_forward_backward(benchmark, shape, dtype, role):
    q, k, v, d_o, *_ = _inputs(shape, "cuda", dtype, grad=True)
    d_o = d_o.detach()
    ours = lambda: _fwd_bwd(lambda *a: diffcore.ops.attention(*a, backend="triton"), q, k, v, d_o)  # noqa: E731
    peer = lambda: _fwd_bwd(F.scaled_dot_product_attention, q, k, v, d_o)  # noqa: E731
    _bench_gpu(benchmark, "fwd_bwd", shape, dtype, role, ours, peer, rounds=10, warmup_rounds=2)


@_gpu_cases
def test_gpu_forward_jvp(benchmark, shape, dtype, role):
    """Peer: torch.func.jvp over the math formula (skipped where its L^2 scores would not fit)."""
    b, h, l, _ = shape
    peer_too_large = "math-formula JVP would need > 40 GB of scores" if b * h * l * l * 4 * 6 > 40e9 else None
    if role == "peer" and peer_too_large:
        pytest.skip(peer_too_large)
    args = _inputs(shape, "cuda", dtype)
    ours = lambda: _jvp(lambda *a: diffcore.ops.attention(*a, backend="triton"), *args)  # noqa: E731
    peer = lambda: _jvp(attention_math, *args)  # noqa: E731
    _bench_gpu(
        benchmark, "fwd_jvp", shape, dtype, role, ours, peer, rounds=10, warmup_rounds=2, no_peer_reason=peer_too_large
    )
