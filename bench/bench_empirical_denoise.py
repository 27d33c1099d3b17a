"""Empirical denoiser: diffcore against the plain torch way (cdist, softmax, matmul).

Shapes (B, N, D) of issues 2 and 20: the digits (256, 1797, 64), (256, 10000, 3072), (64, 50000,
3072); sigma in {0.01, 1, 80}. Peers: plain fp32 torch (the fast one, inaccurate at small sigma)
and plain float64 torch (the accurate one). Each peer case runs before the diffcore case of the
same name, so ``speedup_vs_peer`` (against fp32) and ``speedup_vs_float64`` land in diffcore's
extra_info (bench/benchutil.py), with the CPU kind and the screening precision chosen
(diffcore._cpu_caps). Throughput counts the two products of the plain way, 4 B N D flops.

Peak extra memory: the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) during one call, over the resident set just before it, with glibc's mmap
threshold fixed at 128 KiB and malloc_trim before the call, so that memory freed earlier and reused
by the call is counted. The kernel updates the resident counters in steps of 64 pages per thread,
so the figure is good to about 0.5 MB. Torch's CPU tensors live in malloc'ed memory, so this sees
every tensor the call makes (tracemalloc does not). Recorded as ``peak_extra_mb`` (and
``memory_ratio_vs_peer`` for diffcore).
DIFFCORE_BENCH_QUICK=1 shrinks the shapes.
"""

from __future__ import annotations

import functools

import pytest
import torch
from benchutil import QUICK, peak_extra_mb, record_cpu_screen, record_interleaved, record_ratio, run_timed

from diffcore.ops import empirical_denoise

GROUP = "empirical_denoise"
if QUICK:
    CASES = [("digits", 64, None, 64, 1.0), ("small", 32, 2000, 256, 0.01), ("small", 32, 2000, 256, 80.0)]
else:
    CASES = [("digits", 256, None, 64, s) for s in (0.01, 1.0, 80.0)]
    CASES += [("cifar10k", 256, 10000, 3072, s) for s in (0.01, 1.0, 80.0)]
    CASES += [("cifar12k", 200, 12000, 3072, s) for s in (0.01, 1.0, 80.0)]
    CASES += [("cifar50k", 64, 50000, 3072, s) for s in (0.01, 1.0, 80.0)]
CASE_IDS = [f"{name}-B{b}-N{n or 1797}-D{d}-sigma{s:g}" for name, b, n, d, s in CASES]
_PEER_PEAK: dict[str, float] = {}
_FLOAT64_SECONDS: dict[str, float] = {}


@functools.lru_cache(maxsize=2)
def _train(name: str, rows, dim: int) -> torch.Tensor:
    if name == "digits":
        from diffcore.data.digits import load_digits

        return load_digits()[0].reshape(-1, 64).contiguous()
    gen = torch.Generator().manual_seed(0)
    return torch.rand(rows, dim, generator=gen) * 2 - 1


def _inputs(case):
    name, batch, rows, dim, sigma = case
    train = _train(name, rows, dim)
    gen = torch.Generator().manual_seed(1)
    source = torch.randint(0, train.shape[0], (batch,), generator=gen)
    x = train[source] + sigma * torch.randn(batch, train.shape[1], generator=gen)
    return x, train, sigma


def plain_torch_denoise(x, train, sigma):
    """The plain way: [B, N] squared distances, softmax, weighted sum (in the dtype of x)."""
    train = train.to(x.dtype)
    logits = torch.cdist(x, train).square_().mul_(-0.5 / sigma**2)
    return torch.softmax(logits, dim=1) @ train


def _flops(x, train) -> float:
    return 4.0 * x.shape[0] * train.shape[0] * x.shape[1]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peer_plain_torch(benchmark, case):
    x, train, sigma = _inputs(case)
    benchmark.group = GROUP
    run_timed(benchmark, lambda: plain_torch_denoise(x, train, sigma))
    record_ratio(benchmark, GROUP, CASE_IDS[CASES.index(case)], "peer", flops=_flops(x, train))
    record_cpu_screen(benchmark)
    mb = peak_extra_mb(lambda: plain_torch_denoise(x, train, sigma))
    benchmark.extra_info["peak_extra_mb"] = mb
    _PEER_PEAK[CASE_IDS[CASES.index(case)]] = mb


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peer_plain_torch_float64(benchmark, case):
    """The accurate peer: the plain way in float64 (one round: seconds at the large shapes)."""
    x, train, sigma = _inputs(case)
    x64, train64 = x.double(), train.double()
    benchmark.group = GROUP + "-float64"
    run_timed(benchmark, lambda: plain_torch_denoise(x64, train64, sigma), rounds=1, warmup_rounds=0)
    record_ratio(benchmark, GROUP + "-float64", CASE_IDS[CASES.index(case)], "peer", flops=_flops(x, train))
    record_cpu_screen(benchmark)
    _FLOAT64_SECONDS[CASE_IDS[CASES.index(case)]] = benchmark.stats.stats.min


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_diffcore_cpu(benchmark, case):
    x, train, sigma = _inputs(case)
    benchmark.group = GROUP
    out = run_timed(benchmark, lambda: empirical_denoise(x, train, sigma, backend="cpu"))
    case_id = CASE_IDS[CASES.index(case)]
    record_ratio(
        benchmark, GROUP, case_id, "diffcore", flops=_flops(x, train), peer=lambda: plain_torch_denoise(x, train, sigma)
    )
    record_cpu_screen(benchmark, _flops(x, train))
    if case_id in _FLOAT64_SECONDS:
        benchmark.extra_info["speedup_vs_float64"] = _FLOAT64_SECONDS[case_id] / benchmark.stats.stats.min
    mb = peak_extra_mb(lambda: empirical_denoise(x, train, sigma, backend="cpu"))
    benchmark.extra_info["peak_extra_mb"] = mb
    if mb is not None and _PEER_PEAK.get(case_id):
        benchmark.extra_info["memory_ratio_vs_peer"] = mb / _PEER_PEAK[case_id]
    # the benchmark checks what it times: agreement with the plain way in float64 on a few rows
    ref = plain_torch_denoise(x[:4].double(), train.double(), sigma)
    err = ((out[:4].double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    benchmark.extra_info["max_rel_error_vs_float64"] = err
    assert err <= 1e-5


# The embedded default (issue 34): the digits with B = 256 and 1797 queries, peer timed in the same
# test, interleaved round by round (benchutil.record_interleaved), with 2 threads and with 1.
DIGITS_CASES = [(batch, s) for batch in ((64,) if QUICK else (256, 1797)) for s in (0.01, 1.0, 80.0)]


@pytest.mark.parametrize(
    "batch,sigma", DIGITS_CASES, ids=[f"digits-B{b}-N1797-D64-sigma{s:g}" for b, s in DIGITS_CASES]
)
def test_digits_interleaved(benchmark, batch, sigma):
    x, train, _ = _inputs(("digits", batch, None, 64, sigma))
    benchmark.group = GROUP + "-digits-interleaved"
    record_interleaved(
        benchmark,
        lambda: plain_torch_denoise(x, train, sigma),
        lambda: empirical_denoise(x, train, sigma, backend="cpu"),
        rounds=5 if QUICK else 25,
    )
    record_cpu_screen(benchmark)
    ref = plain_torch_denoise(x.double(), train.double(), sigma)
    out = empirical_denoise(x, train, sigma, backend="cpu")
    err = ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    benchmark.extra_info["max_rel_error_vs_float64"] = err
    assert err <= 1e-5


GPU_CASE = (1000, 50000, 3072)


GPU_RUNS = [(impl, sigma) for sigma in (0.01, 1.0, 80.0) for impl in ("peer", "triton", "cuda")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl,sigma", GPU_RUNS, ids=[f"{i}-sigma{s:g}" for i, s in GPU_RUNS])
def test_gpu_empirical_denoise(benchmark, impl, sigma):
    if impl == "cuda":
        from diffcore._ext import has_cuda_kernels

        if not has_cuda_kernels():
            pytest.skip("diffcore._C built without CUDA kernels")
    batch, rows, dim = (64, 5000, 3072) if QUICK else GPU_CASE
    gen = torch.Generator().manual_seed(0)
    train = (torch.rand(rows, dim, generator=gen) * 2 - 1).cuda()
    x = train[torch.randint(0, rows, (batch,), generator=gen).cuda()] + sigma * torch.randn(batch, dim, device="cuda")
    if impl == "peer":
        fn = functools.partial(plain_torch_denoise, x, train, sigma)
    else:
        fn = functools.partial(empirical_denoise, x, train, sigma, backend=impl)
    benchmark.group = GROUP + "-gpu"
    run_timed(benchmark, fn, device="cuda", rounds=5)
    role = "peer" if impl == "peer" else "diffcore"
    record_ratio(
        benchmark,
        GROUP + "-gpu",
        f"B{batch}-N{rows}-D{dim}-sigma{sigma:g}",
        role,
        flops=4.0 * batch * rows * dim,
        peer=functools.partial(plain_torch_denoise, x, train, sigma),
        device="cuda",
        peer_rounds=5,
    )
    benchmark.extra_info["impl"] = impl
