"""Local denoisers (ELS, LS, PSPC): diffcore against the plain-torch way of the public codes.

The peer (bench/local_peer.py): unfold the patches, squared distances by the GEMM expansion,
softmax, weighted sum, in fp32, chunked over queries and training images (log-sum-exp merge) so
that it fits memory; PSPC as a Python loop over square positions. diffcore and the peer run in the
SAME test, interleaved round by round (the peer in pytest-benchmark's untimed setup, timed with
perf_counter), so that both see the same machine load; ``speedup_vs_peer`` compares the minima.

Shapes of issue 30: the digits (N = 1797, 1 x 8 x 8, B = 64, P = 3..7) and CIFAR-like (3 x 32 x 32,
N = 5000, B = 16, P = 3..9). ELS at the CIFAR-like shape is 84 G (query, key) pairs per call (hours
for the peer on 2 cores): it runs on a subset (B = 2, N = 100) labelled as such. sigma = 1 (every
key within the band: the exp-bound case). Recorded per case: ``speedup_vs_peer``,
``memory_ratio_vs_peer`` (peer peak extra memory / diffcore's, VmHWM growth of one call),
``pairs_per_s`` (query-key pairs, one exp each), ``gflops`` (3 D flops per pair: subtract, multiply-add),
the 1-minute load average, and the max error against the float64 reference on a few images.
DIFFCORE_BENCH_QUICK=1 shrinks the shapes.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch
from benchutil import QUICK, peak_extra_mb
from local_peer import plain_torch_els, plain_torch_ls, plain_torch_pspc

from diffcore.ops import local_denoise
from diffcore.ref.local_denoise import local_denoise_ref

GROUP = "local_denoise"
SIGMA = 1.0
if QUICK:
    CASES = [
        ("digits", "els", 3, 8, None),
        ("digits", "ls", 5, 16, None),
        ("digits", "pspc", 5, 16, None),
        ("cifar", "ls", 3, 4, 500),
        ("cifar", "els", 3, 1, 20),
    ]
    ROUNDS = 2
else:
    CASES = [("digits", "els", p, 64, None) for p in (3, 5, 7)]
    CASES += [("digits", "ls", 5, 64, None), ("digits", "pspc", 5, 64, None)]
    CASES += [("cifar", "ls", p, 16, 5000) for p in (3, 9)]
    CASES += [("cifar", "pspc", p, 16, 5000) for p in (3, 9)]
    CASES += [("cifar", "els", p, 2, 100) for p in (3, 9)]
    ROUNDS = 2  # the peer takes about a minute per call at the digits shapes on 2 shared cores
CASE_IDS = [f"{data}-{kind}-P{p}-B{b}-N{n or 1797}" for data, kind, p, b, n in CASES]


@functools.lru_cache(maxsize=2)
def _train(data: str, rows) -> torch.Tensor:
    if data == "digits":
        from diffcore.data.digits import load_digits

        return load_digits()[0].reshape(-1, 1, 8, 8).float().contiguous()
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(rows, 3, 8, 8, generator=gen) * 2 - 1  # smooth images: 8 x 8 upsampled to 32 x 32
    return torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False).contiguous()


def _inputs(case):
    data, _kind, _patch, batch, rows = case
    train = _train(data, rows)
    gen = torch.Generator().manual_seed(1)
    source = torch.randint(0, train.shape[0], (batch,), generator=gen)
    x = train[source] + SIGMA * torch.randn(batch, *train.shape[1:], generator=gen)
    return x, train, torch.full((batch,), SIGMA, dtype=torch.float64)


def _pairs(case, x, train) -> float:
    """(query, key) pairs of one call: one exp and D = C P^2 distance terms each."""
    _, kind, patch, batch, _ = case
    _, _c, h, w = x.shape
    rows = train.shape[0]
    if kind == "els":
        r = patch // 2
        interior = max(0, h - 2 * r) * max(0, w - 2 * r)
        border = h * w - interior
        return float(batch * rows * (interior * interior + border))  # zeros padding: boundary-broken
    if kind == "ls":
        return float(batch * rows * h * w)
    return float(batch * rows * (h - patch + 1) * (w - patch + 1))


def _peer(case, x, train, sigma):
    _, kind, patch, _, _ = case
    if kind == "els":
        return plain_torch_els(x, train, sigma, patch)
    if kind == "ls":
        return plain_torch_ls(x, train, sigma, patch)
    return plain_torch_pspc(x, train, sigma, patch)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_local_denoise_vs_peer(benchmark, case):
    _, kind, patch, _, _ = case
    x, train, sigma = _inputs(case)
    peer_seconds = []

    def time_peer():  # pytest-benchmark's untimed setup: the peer runs between diffcore's rounds
        start = time.perf_counter()
        _peer(case, x, train, sigma)
        peer_seconds.append(time.perf_counter() - start)

    def run():
        return local_denoise(x, train, sigma, kind=kind, patch_size=patch, backend="cpu")

    benchmark.group = GROUP
    out = benchmark.pedantic(run, setup=time_peer, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    seconds = benchmark.stats.stats.min
    info = benchmark.extra_info
    pairs = _pairs(case, x, train)
    dim = x.shape[1] * patch * patch
    info.update(
        case=CASE_IDS[CASES.index(case)],
        load_average_1min=os.getloadavg()[0],
        peer_seconds_min=min(peer_seconds),
        speedup_vs_peer=min(peer_seconds) / seconds,
        pairs_per_s=pairs / seconds,
        gflops=3.0 * dim * pairs / seconds / 1e9,
        threads=torch.get_num_threads(),
    )
    peer_mb = peak_extra_mb(lambda: _peer(case, x, train, sigma))
    ours_mb = peak_extra_mb(run)
    info.update(peer_peak_extra_mb=peer_mb, peak_extra_mb=ours_mb)
    if peer_mb is not None and ours_mb:
        info["memory_ratio_vs_peer"] = peer_mb / ours_mb
    # the benchmark checks what it times: the float64 reference on the first image
    ref = local_denoise_ref(x[:1], train, sigma[:1], kind=kind, patch_size=patch)
    err = float((out[:1].double() - ref).abs().max())
    info["max_abs_error_vs_float64"] = err
    assert err <= 2e-5
