"""Interleaved peer / diffcore ratio of local_denoise at the digits' shapes, in CPU time and wall.

The pytest-benchmark file (bench_local_denoise.py) measures wall time with 2 threads, which a
loaded machine distorts; this script times the plain-torch peer (bench/local_peer.py) and diffcore
alternately on the same inputs, best of ``--rounds``, with the process's CPU time (user + system)
beside the wall time, and prints the load average before and after. With ``--threads 1`` the CPU
time of each side is its work on one core, whatever else the machine runs. Run, e.g.:
    python bench/ratio_local_denoise.py --threads 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python bench/ratio_local_denoise.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import interleaved_best
from local_peer import plain_torch_els, plain_torch_ls, plain_torch_pspc

from diffcore.data.digits import load_digits
from diffcore.ops import local_denoise

PEERS = {"els": plain_torch_els, "ls": plain_torch_ls, "pspc": plain_torch_pspc}
CASES = [("ls", p, 64) for p in (3, 5, 7)] + [("pspc", p, 64) for p in (3, 5, 7)] + [("els", p, 16) for p in (3, 5, 7)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sigma", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = load_digits()[0].reshape(-1, 1, 8, 8).float().contiguous()
    print(f"torch {torch.__version__}, {args.threads} thread(s), sigma {args.sigma}, load {os.getloadavg()[0]:.1f}")
    print("case | peer CPU ms | diffcore CPU ms | CPU ratio | peer wall ms | diffcore wall ms | wall ratio")
    for kind, patch, batch in CASES:
        gen = torch.Generator().manual_seed(1)
        source = torch.randint(0, train.shape[0], (batch,), generator=gen)
        x = train[source] + args.sigma * torch.randn(batch, 1, 8, 8, generator=gen)
        sigma = torch.full((batch,), args.sigma, dtype=torch.float64)

        def peer(x=x, sigma=sigma, kind=kind, patch=patch):
            return PEERS[kind](x, train, sigma, patch)

        def ours(x=x, sigma=sigma, kind=kind, patch=patch):
            return local_denoise(x, train, sigma, kind=kind, patch_size=patch, backend="cpu")

        best = interleaved_best(peer, ours, args.rounds, warmup=False)
        peer_cpu, ours_cpu, peer_wall, ours_wall = best["peer_cpu"], best["cpu"], best["peer_wall"], best["wall"]
        case = f"digits-{kind}-P{patch}-B{batch}-N{train.shape[0]}"
        cpu = f"{peer_cpu * 1e3:.1f} | {ours_cpu * 1e3:.1f} | {peer_cpu / ours_cpu:.2f}x"
        wall = f"{peer_wall * 1e3:.1f} | {ours_wall * 1e3:.1f} | {peer_wall / ours_wall:.2f}x"
        print(f"{case} | {cpu} | {wall}", flush=True)
    print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
