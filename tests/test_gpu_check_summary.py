"""scripts/summarize_gpu_check.py turns a GPU check's junit XML and benchmark JSON into summary.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.ops.test_knn" name="test_a" time="0.5"/>
<testcase classname="tests.ops.test_knn" name="test_b" time="0.1"><failure message="boom"/></testcase>
<testcase classname="tests.ops.test_knn" name="test_c" time="0"><skipped message="no gpu"/></testcase>
</testsuite></testsuites>"""


def _summarize(out: Path) -> dict:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize_gpu_check.py"), str(out), "0", "1", "0", "42"],
        check=True,
        capture_output=True,
    )
    return json.loads((out / "summary.json").read_text())


def test_summary_counts_tests_and_reads_benchmarks(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "bench.json").write_text(
        json.dumps(
            {
                "benchmarks": [
                    {
                        "fullname": "bench/x.py::t",
                        "stats": {"min": 0.5, "median": 0.6},
                        "extra_info": {"speedup_vs_peer": 2.0},
                    }
                ]
            }
        )
    )
    summary = _summarize(tmp_path)
    assert summary["tests"]["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert summary["tests_rc"] == 1 and summary["build_seconds"] == 42
    assert summary["benchmarks"][0]["extra_info"]["speedup_vs_peer"] == 2.0


def test_summary_with_no_benchmark_run(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "bench.json").write_text("")
    assert _summarize(tmp_path)["benchmarks"] == []
