"""Compare a pytest-benchmark JSON run with a saved baseline; fail on a ratio regression.

Ratios (``extra_info.speedup_vs_peer``: peer time / diffcore time, measured in the same run) are
compared rather than raw times, so machines of one kind can be compared across days. Only runs of
the same CPU kind are compared (``machine_info["cpu_kind"]``, bench/conftest.py: ``bf16`` where
bf16 matmul is native, else e.g. ``avx2``): the CPU ops take different paths on the two kinds.

    python bench/compare.py bench/baselines/<machine>.json new_run.json [--tolerance 0.2] [--select TEXT]

Fails closed. Exit status 1 when a benchmark of the baseline is missing from the new run, when a
benchmark whose baseline records ``speedup_vs_peer`` has none in the new run, or when a speedup
lost more than ``tolerance`` (a fraction) of its baseline value; 2 when the two runs are of
different CPU kinds (or one does not say). ``--select TEXT`` limits the comparison to the baseline
benchmarks whose full name contains TEXT (say so deliberately, e.g. to compare a run of one file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def benchmark_names(data: dict) -> set[str]:
    """Full names of every benchmark of a run."""
    return {b["fullname"] for b in data.get("benchmarks", [])}


def missing(baseline_run: dict, current_run: dict) -> list[str]:
    """Lines naming each baseline benchmark absent from the current run, and each whose baseline
    speedup_vs_peer the current run does not record."""
    names, base, cur = benchmark_names(current_run), speedups(baseline_run), speedups(current_run)
    lines = [f"{name}: missing from the new run" for name in sorted(benchmark_names(baseline_run) - names)]
    lines += [
        f"{name}: no speedup_vs_peer in the new run (baseline {base[name]:.2f}x)"
        for name in sorted(base.keys() - cur.keys())
        if name in names
    ]
    return lines


def select(run: dict, text: str | None) -> dict:
    """The run with only the benchmarks whose full name contains ``text`` (all when None)."""
    if text is None:
        return run
    return {**run, "benchmarks": [b for b in run.get("benchmarks", []) if text in b["fullname"]]}


def speedups(data: dict) -> dict[str, float]:
    """Benchmark full name -> speedup_vs_peer, for the benchmarks that record one."""
    return {
        b["fullname"]: float(b["extra_info"]["speedup_vs_peer"])
        for b in data.get("benchmarks", [])
        if "speedup_vs_peer" in b.get("extra_info", {})
    }


def cpu_kind(data: dict) -> str | None:
    """The CPU kind a run was taken on (machine_info), None when the run does not record it."""
    return data.get("machine_info", {}).get("cpu_kind")


def kind_mismatch(baseline: dict, current: dict) -> str | None:
    """Why two runs must not be compared, or None when they are of one CPU kind."""
    kinds = cpu_kind(baseline), cpu_kind(current)
    if None in kinds:
        return (
            f"CPU kind not recorded (baseline: {kinds[0]}, current: {kinds[1]}); rerun with the current "
            f"bench/conftest.py"
        )
    if kinds[0] != kinds[1]:
        return (
            f"CPU kinds differ (baseline: {kinds[0]}, current: {kinds[1]}): the CPU ops take different paths "
            f"on them; compare with a baseline of kind {kinds[1]}"
        )
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
    parser.add_argument("--select", default=None, help="compare only baseline benchmarks whose name contains this")
    args = parser.parse_args(argv)
    base_run, cur_run = json.loads(args.baseline.read_text()), json.loads(args.current.read_text())
    mismatch = kind_mismatch(base_run, cur_run)
    if mismatch is not None:
        print(f"refusing to compare: {mismatch}", file=sys.stderr)
        return 2
    base_run = select(base_run, args.select)
    if not base_run["benchmarks"]:
        print(f"the baseline has no benchmark to compare (--select {args.select!r})", file=sys.stderr)
        return 1
    base, cur = speedups(base_run), speedups(cur_run)
    for name in sorted(base.keys() & cur.keys()):
        print(f"{cur[name]:7.2f}x (baseline {base[name]:7.2f}x)  {name}")
    gaps = missing(base_run, cur_run)
    for line in gaps:
        print("MISSING", line, file=sys.stderr)
    regressions = compare(base, cur, args.tolerance)
    for line in regressions:
        print("REGRESSION", line, file=sys.stderr)
    return 1 if regressions or gaps else 0


if __name__ == "__main__":
    sys.exit(main())
