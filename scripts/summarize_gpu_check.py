"""Summarize a GPU check run (scripts/gpu_check.sh) into OUT/summary.json."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _tests(xml_path: Path) -> dict:
    if not xml_path.exists():
        return {"error": "no junit xml"}
    cases = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = node.get("message", "")[:300]
                break
        else:
            message = ""
        cases.append(
            {
                "name": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time", 0)),
                "message": message,
            }
        )
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def _bench(json_path: Path) -> list[dict]:
    text = json_path.read_text() if json_path.exists() else ""
    if not text.strip():  # pytest-benchmark leaves an empty file when no benchmark ran
        return []
    data = json.loads(text)
    return [
        {
            "name": b["fullname"],
            "min_s": b["stats"]["min"],
            "median_s": b["stats"]["median"],
            "extra_info": b.get("extra_info", {}),
        }
        for b in data.get("benchmarks", [])
    ]


def main() -> None:
    out = Path(sys.argv[1])
    install_rc, tests_rc, bench_rc, build_s = (int(a) for a in sys.argv[2:6])
    summary = {
        "nvidia_smi": (out / "nvidia-smi.txt").read_text()[:2000] if (out / "nvidia-smi.txt").exists() else "",
        "install_rc": install_rc,
        "build_seconds": build_s,
        "tests_rc": tests_rc,
        "bench_rc": bench_rc,
        "tests": _tests(out / "tests.xml"),
        "benchmarks": _bench(out / "bench.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("install_rc", "build_seconds", "tests_rc", "bench_rc")}))
    print(json.dumps(summary["tests"].get("counts", summary["tests"])))


if __name__ == "__main__":
    main()
