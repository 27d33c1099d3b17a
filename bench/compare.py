"""Compare a pytest-benchmark JSON run with a saved baseline; fail on a ratio regression.

Ratios (``extra_info.speedup_vs_peer``: peer time / diffcore time, measured in the same run) are
compared rather than raw times, so machines of one kind can be compared across days. Only runs of
the same CPU kind are compared (``machine_info["cpu_kind"]``, bench/conftest.py: ``bf16`` where
bf16 matmul is native, else e.g. ``avx2``): the CPU ops take different paths on the two kinds.

    python bench/compare.py bench/baselines/<machine>.json new_run.json [--tolerance 0.2]

Exit status 1 when any benchmark present in both files lost more than ``tolerance`` (a fraction)
of its baseline speedup; 2 when the two runs are of different CPU kinds (or one does not say).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def speedups(data: dict) -> dict[str, float]:
    """Benchmark full name -> speedup_vs_peer, for the benchmarks that record one."""
    return {b["fullname"]: float(b["extra_info"]["speedup_vs_peer"])
            for b in data.get("benchmarks", []) if "speedup_vs_peer" in b.get("extra_info", {})}


def cpu_kind(data: dict) -> str | None:
    """The CPU kind a run was taken on (machine_info), None when the run does not record it."""
    return data.get("machine_info", {}).get("cpu_kind")


def kind_mismatch(baseline: dict, current: dict) -> str | None:
    """Why two runs must not be compared, or None when they are of one CPU kind."""
    kinds = cpu_kind(baseline), cpu_kind(current)
    if None in kinds:
        return (f"CPU kind not recorded (baseline: {kinds[0]}, current: {kinds[1]}); rerun with the current "
                f"bench/conftest.py")
    if kinds[0] != kinds[1]:
        return (f"CPU kinds differ (baseline: {kinds[0]}, current: {kinds[1]}): the CPU ops take different paths "
                f"on them; compare with a baseline of kind {kinds[1]}")
    return None


def compare(baseline: dict[str, float], current: dict[str, float], tolerance: float) -> list[str]:
    """Lines describing each regression beyond ``tolerance``."""
    regressions = []
    for name in sorted(baseline.keys() & current.keys()):
        if current[name] < baseline[name] * (1.0 - tolerance):
            regressions.append(f"{name}: speedup {current[name]:.2f}x, baseline {baseline[name]:.2f}x")
    return regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("current", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.2, help="allowed fractional loss of speedup")
    args = parser.parse_args(argv)
    base_run, cur_run = json.loads(args.baseline.read_text()), json.loads(args.current.read_text())
    mismatch = kind_mismatch(base_run, cur_run)
    if mismatch is not None:
        print(f"refusing to compare: {mismatch}", file=sys.stderr)
        return 2
    base, cur = speedups(base_run), speedups(cur_run)
    for name in sorted(base.keys() & cur.keys()):
        print(f"{cur[name]:7.2f}x (baseline {base[name]:7.2f}x)  {name}")
    regressions = compare(base, cur, args.tolerance)
    for line in regressions:
        print("REGRESSION", line, file=sys.stderr)
    if not base.keys() & cur.keys():
        print("no benchmark with a recorded speedup is common to both files", file=sys.stderr)
        return 1
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
