"""Interleaved peer / diffcore ratio of empirical_denoise at the large shapes, in CPU time and wall.

On a shared, loaded machine the pytest-benchmark files (peer and diffcore as separate tests) give
ratios distorted by the load; this script times plain fp32 torch and diffcore alternately on the
same inputs, best of ``--rounds``, with CPU time (user + system of the process) beside the wall
time, and prints the load average before and after (bench/baselines/MEASUREMENTS.md). Run, e.g.:
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python bench/ratio_empirical_denoise.py --threads 1
``--digits`` times the embedded default instead (issue 34): empirical_denoise at (256 and 1797,
1797, 64) against the digits themselves, and knn top-2 of the 1797 digits among themselves
against torch ``cdist`` + ``topk`` (``--knn-only``: that line alone). ``--screen-sweep`` times the
small path with its screen forced on and off over a grid of sigma at (256, 1797, 64) (how
``SMALL_SCREEN_RATIO`` was chosen, docs/empirical_denoise.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_empirical_denoise import plain_torch_denoise
from benchutil import interleaved_best

from diffcore import _cpu_caps
from diffcore.ops import empirical_denoise, knn

SHAPES = ((256, 10000, 3072), (200, 12000, 3072))
SIGMAS = (0.01, 1.0, 80.0)


def report(name: str, best: dict) -> None:
    """One line: best CPU times of the peer and diffcore and their ratio, then the same for wall
    time. CPU time adds up every thread's, so with two busy threads it is about twice the wall
    time: compare wall times (not CPU times) with pytest-benchmark's figures."""
    peer_cpu, cpu, peer_wall, wall = best["peer_cpu"], best["cpu"], best["peer_wall"], best["wall"]
    print(
        f"{name}: CPU ms {peer_cpu * 1e3:.2f} / {cpu * 1e3:.2f} = {peer_cpu / cpu:.2f}x, "
        f"wall ms {peer_wall * 1e3:.2f} / {wall * 1e3:.2f} = {peer_wall / wall:.2f}x",
        flush=True,
    )


def digits(rounds: int, knn_only: bool = False) -> None:
    """The digits (N = 1797, D = 64): knn all pairs, then (unless ``knn_only``) empirical_denoise at
    B = 256 and 1797."""
    from diffcore.data.digits import load_digits

    train = load_digits()[0].reshape(-1, 64).float().contiguous()
    report(
        "knn top-2 (1797, 1797, 64)",
        interleaved_best(
            lambda: torch.cdist(train, train).topk(2, dim=1, largest=False),
            lambda: knn(train, train, 2, backend="cpu"),
            rounds,
        ),
    )
    if knn_only:
        return
    for batch in (256, 1797):
        source = torch.randint(0, train.shape[0], (batch,), generator=torch.Generator().manual_seed(1))
        for sigma in SIGMAS:
            noise = torch.randn(batch, 64, generator=torch.Generator().manual_seed(2))
            x = train[source] + sigma * noise
            report(
                f"empirical_denoise ({batch}, 1797, 64) sigma {sigma:g}",
                interleaved_best(
                    lambda x=x, sigma=sigma: plain_torch_denoise(x, train, sigma),
                    lambda x=x, sigma=sigma: empirical_denoise(x, train, sigma),
                    rounds,
                ),
            )


SWEEP_SIGMAS = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def screen_sweep(rounds: int) -> None:
    """The small path at (256, 1797, 64) with the screen always tried (the survivor cap still
    applies) and never tried, per sigma: best CPU ms of each, the screened queries and their
    survivors, and the sigma the ratio SMALL_SCREEN_RATIO admits on the digits."""
    from diffcore.data.digits import load_digits
    from diffcore.ops import _empirical_denoise_cpu as ed_cpu

    train = load_digits()[0].reshape(-1, 64).float().contiguous()
    spread = float((train.double() - train.double().mean(0)).square().sum(1).mean())
    limit = (ed_cpu.SMALL_SCREEN_RATIO * spread / (2 * ed_cpu.BAND)) ** 0.5
    print(
        f"digits spread (mean |y - mean y|^2) {spread:.3f}: "
        f"SMALL_SCREEN_RATIO {ed_cpu.SMALL_SCREEN_RATIO:g} screens sigma <= {limit:.4f}"
    )
    source = torch.randint(0, train.shape[0], (256,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    saved = ed_cpu.SMALL_SCREEN_RATIO
    try:
        for sigma in SWEEP_SIGMAS:
            x = (train[source] + sigma * noise).contiguous()
            inv2s2 = torch.full((256,), 0.5 / sigma**2, dtype=torch.float64)
            times, stats = {}, None
            for name, ratio in (("on", 1e9), ("off", 0.0)):
                ed_cpu.SMALL_SCREEN_RATIO = ratio
                call = lambda x=x, inv2s2=inv2s2: ed_cpu._run_small(x, train, inv2s2, 1)  # noqa: E731
                best = interleaved_best(lambda: None, call, rounds)
                times[name] = best["cpu"]
                if name == "on":
                    stats = ed_cpu._run_small(x, train, inv2s2, 1)[3]
            assert stats is not None
            print(
                f"sigma {sigma:g}: screen on {times['on'] * 1e3:.2f} ms ({stats.screened} screened, "
                f"{stats.kept / max(stats.screened, 1):.1f} survivors each), off {times['off'] * 1e3:.2f} ms",
                flush=True,
            )
    finally:
        ed_cpu.SMALL_SCREEN_RATIO = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--digits", action="store_true", help="the digits sizes (issue 34) instead")
    parser.add_argument("--knn-only", action="store_true", help="with --digits: only knn's all-pairs line")
    parser.add_argument("--screen-sweep", action="store_true", help="the small path's screen on / off over sigma")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    choice = _cpu_caps.screen_choice()
    print(f"load {os.getloadavg()} threads {args.threads} kind {choice.caps.kind} screen {choice.precision}")
    if args.screen_sweep:
        screen_sweep(args.rounds)
        print(f"load after {os.getloadavg()}")
        return
    if args.digits:
        digits(args.rounds, args.knn_only)
        print(f"load after {os.getloadavg()}")
        return
    for batch, rows, dim in SHAPES:
        train = torch.rand(rows, dim, generator=torch.Generator().manual_seed(0)) * 2 - 1
        source = torch.randint(0, rows, (batch,), generator=torch.Generator().manual_seed(1))
        for sigma in SIGMAS:
            x = train[source] + sigma * torch.randn(batch, dim, generator=torch.Generator().manual_seed(2))
            best = interleaved_best(
                lambda x=x, train=train, sigma=sigma: plain_torch_denoise(x, train, sigma),
                lambda x=x, train=train, sigma=sigma: empirical_denoise(x, train, sigma),
                args.rounds,
            )
            peer_cpu, cpu, peer_wall, wall = best["peer_cpu"], best["cpu"], best["peer_wall"], best["wall"]
            print(
                f"({batch}, {rows}, {dim}) sigma {sigma:g}: CPU s {peer_cpu:.3f} / {cpu:.3f} = "
                f"{peer_cpu / cpu:.2f}x, wall {peer_wall / wall:.2f}x",
                flush=True,
            )
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
