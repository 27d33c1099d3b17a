"""Interleaved peer / diffcore ratio of empirical_denoise at the large shapes, in CPU time and wall.

On a shared, loaded machine the pytest-benchmark files (peer and diffcore as separate tests) give
ratios distorted by the load; this script times plain fp32 torch and diffcore alternately on the
same inputs, best of ``--rounds``, with CPU time (user + system of the process) beside the wall
time, and prints the load average before and after (bench/baselines/MEASUREMENTS.md). Run, e.g.:
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python bench/ratio_empirical_denoise.py --threads 1
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
from diffcore.ops import empirical_denoise

SHAPES = ((256, 10000, 3072), (200, 12000, 3072))
SIGMAS = (0.01, 1.0, 80.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    choice = _cpu_caps.screen_choice()
    print(f"load {os.getloadavg()} threads {args.threads} kind {choice.caps.kind} screen {choice.precision}")
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
