"""Interleaved peer / diffcore ratio of local_denoise at the digits' (or CIFAR-like) shapes, in CPU time and wall.

The pytest-benchmark file (bench_local_denoise.py) measures wall time with 2 threads, which a
loaded machine distorts; this script times the plain-torch peer (bench/local_peer.py) and diffcore
alternately on the same inputs, best of ``--rounds``, with the process's CPU time (user + system)
beside the wall time, and prints the load average before and after. With ``--threads 1`` the CPU
time of each side is its work on one core, whatever else the machine runs. Run, e.g.:
    python bench/ratio_local_denoise.py --threads 1
    python bench/ratio_local_denoise.py --threads 1 --kinds ls,pspc --cifar --rounds 1
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
from diffcore.ops import _local_denoise_cpu, local_denoise

PEERS = {"els": plain_torch_els, "ls": plain_torch_ls, "pspc": plain_torch_pspc}
# (kind, P, batch, training images: None = all)
CASES = [("ls", p, 64, None) for p in (3, 5, 7)] + [("pspc", p, 64, None) for p in (3, 5, 7)]
CASES += [("els", p, 16, None) for p in (3, 5, 7)]
# the CIFAR-like shape of bench_local_denoise.py (3 x 32 x 32, N = 5000, B = 16); ELS on a subset
# (B = 2, N = 100, as bench_local_denoise.py: the full call is 27 G to 84 G (pixel, key) pairs,
# hours for the peer): both sides' work is proportional to B N, so the ratio is the full shape's
# but for the peer's chunking and diffcore's partial last 16-image chunk (100 = 6 x 16 + 4)
CIFAR_CASES = [("ls", p, 16, None) for p in (3, 9)] + [("pspc", p, 16, None) for p in (3, 9)]
CIFAR_CASES += [("els", p, 2, 100) for p in (3, 5, 7, 9)]


def cifar_like(rows: int = 5000) -> torch.Tensor:
    """Smooth images: 8 x 8 uniform noise upsampled to 32 x 32 (as bench_local_denoise.py)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(rows, 3, 8, 8, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--kinds", default="ls,pspc,els", help="comma-separated kinds to run")
    parser.add_argument("--cifar", action="store_true", help="the CIFAR-like shape instead of the digits")
    parser.add_argument(
        "--els-path",
        choices=("auto", "direct", "box"),
        default="auto",
        help="ELS CPU path: the dispatch rule's (auto), or forced (to compare the two on the same inputs)",
    )
    args = parser.parse_args()
    if args.els_path != "auto":
        forced = args.els_path == "box"
        _local_denoise_cpu.els_uses_box = lambda *shape: forced
    torch.set_num_threads(args.threads)
    if args.cifar:
        data, train, cases = "cifar", cifar_like(), CIFAR_CASES
    else:
        data, train, cases = "digits", load_digits()[0].reshape(-1, 1, 8, 8).float().contiguous(), CASES
    kinds = args.kinds.split(",")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), sigma {args.sigma}, ELS path {args.els_path}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print("case | peer CPU ms | diffcore CPU ms | CPU ratio | peer wall ms | diffcore wall ms | wall ratio")
    full_train = train
    for kind, patch, batch, rows in [case for case in cases if case[0] in kinds]:
        train = full_train[:rows] if rows else full_train
        gen = torch.Generator().manual_seed(1)
        source = torch.randint(0, train.shape[0], (batch,), generator=gen)
        x = train[source] + args.sigma * torch.randn(batch, *train.shape[1:], generator=gen)
        sigma = torch.full((batch,), args.sigma, dtype=torch.float64)

        def peer(x=x, train=train, sigma=sigma, kind=kind, patch=patch):
            return PEERS[kind](x, train, sigma, patch)

        def ours(x=x, train=train, sigma=sigma, kind=kind, patch=patch):
            return local_denoise(x, train, sigma, kind=kind, patch_size=patch, backend="cpu")

        best = interleaved_best(peer, ours, args.rounds, warmup=False)
        peer_cpu, ours_cpu, peer_wall, ours_wall = best["peer_cpu"], best["cpu"], best["peer_wall"], best["wall"]
        case = f"{data}-{kind}-P{patch}-B{batch}-N{train.shape[0]}"
        cpu = f"{peer_cpu * 1e3:.1f} | {ours_cpu * 1e3:.1f} | {peer_cpu / ours_cpu:.2f}x"
        wall = f"{peer_wall * 1e3:.1f} | {ours_wall * 1e3:.1f} | {peer_wall / ours_wall:.2f}x"
        print(f"{case} | {cpu} | {wall}", flush=True)
    print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
