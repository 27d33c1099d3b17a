"""bench/compare.py flags speedup regressions and passes stable runs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_compare():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, name: str, speedups: dict[str, float]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"benchmarks": [
        {"fullname": k, "extra_info": {"speedup_vs_peer": v}} for k, v in speedups.items()]}))
    return path


def test_compare_detects_regression_and_accepts_noise(tmp_path):
    compare = _load_compare()
    base = _run(tmp_path, "base.json", {"a": 3.0, "b": 2.0})
    same = _run(tmp_path, "same.json", {"a": 2.8, "b": 2.1})
    worse = _run(tmp_path, "worse.json", {"a": 1.5, "b": 2.0})
    assert compare.main([str(base), str(same)]) == 0
    assert compare.main([str(base), str(worse)]) == 1
    assert compare.compare({"a": 3.0}, {"a": 1.5}, 0.2) == ["a: speedup 1.50x, baseline 3.00x"]
