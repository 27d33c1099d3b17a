"""Compare a pytest-benchmark JSON run with a saved baseline; fail on a ratio regression.

Ratios (``extra_info.speedup_vs_peer``: peer time / diffcore time, measured in the same run) are
compared rather than raw times, so machines of one kind can be compared across days.

    python bench/compare.py bench/baselines/<machine>.json new_run.json [--tolerance 0.2]

Exit status 1 when any benchmark present in both files lost more than ``tolerance`` (a fraction)
of its baseline speedup.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def speedups(path: Path) -> dict[str, float]:
    """Benchmark full name -> speedup_vs_peer, for the benchmarks that record one."""
    data = json.loads(path.read_text())
    return {b["fullname"]: float(b["extra_info"]["speedup_vs_peer"])
            for b in data.get("benchmarks", []) if "speedup_vs_peer" in b.get("extra_info", {})}


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
    base, cur = speedups(args.baseline), speedups(args.current)
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
