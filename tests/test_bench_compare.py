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


def _run(tmp_path: Path, name: str, speedups: dict[str, float], kind: str | None = "bf16") -> Path:
    path = tmp_path / name
    machine_info = {} if kind is None else {"cpu_kind": kind}
    path.write_text(
        json.dumps(
            {
                "machine_info": machine_info,
                "benchmarks": [{"fullname": k, "extra_info": {"speedup_vs_peer": v}} for k, v in speedups.items()],
            }
        )
    )
    return path


def test_compare_detects_regression_and_accepts_noise(tmp_path):
    compare = _load_compare()
    base = _run(tmp_path, "base.json", {"a": 3.0, "b": 2.0})
    same = _run(tmp_path, "same.json", {"a": 2.8, "b": 2.1})
    worse = _run(tmp_path, "worse.json", {"a": 1.5, "b": 2.0})
    assert compare.main([str(base), str(same)]) == 0
    assert compare.main([str(base), str(worse)]) == 1
    assert compare.compare({"a": 3.0}, {"a": 1.5}, 0.2) == ["a: speedup 1.50x, baseline 3.00x"]


def test_compare_refuses_across_cpu_kinds(tmp_path, capsys):
    compare = _load_compare()
    bf16 = _run(tmp_path, "bf16.json", {"a": 3.0}, kind="bf16")
    avx2 = _run(tmp_path, "avx2.json", {"a": 3.0}, kind="avx2")
    unknown = _run(tmp_path, "old.json", {"a": 3.0}, kind=None)
    assert compare.main([str(bf16), str(avx2)]) == 2
    assert "CPU kinds differ" in capsys.readouterr().err
    assert compare.main([str(unknown), str(avx2)]) == 2
    assert "not recorded" in capsys.readouterr().err
    assert compare.main([str(avx2), str(avx2)]) == 0


def test_saved_baselines_record_their_cpu_kind():
    for path in (ROOT / "bench" / "baselines").glob("*.json"):
        kind = json.loads(path.read_text())["machine_info"].get("cpu_kind")
        assert kind is not None, path.name
        if path.name.startswith("cpu-"):
            assert kind in path.name, f"{path.name}: the file name should say the CPU kind ({kind})"


def test_compare_fails_closed_on_missing_benchmarks_and_ratios(tmp_path, capsys):
    compare = _load_compare()
    base = _run(tmp_path, "base.json", {"a": 3.0, "b": 2.0})
    without_b = _run(tmp_path, "without_b.json", {"a": 3.0})
    assert compare.main([str(base), str(without_b)]) == 1
    assert "b: missing from the new run" in capsys.readouterr().err
    no_ratio = tmp_path / "no_ratio.json"
    no_ratio.write_text(
        json.dumps(
            {
                "machine_info": {"cpu_kind": "bf16"},
                "benchmarks": [
                    {"fullname": "a", "extra_info": {"speedup_vs_peer": 3.0}},
                    {"fullname": "b", "extra_info": {}},
                ],
            }
        )
    )
    assert compare.main([str(base), str(no_ratio)]) == 1
    assert "b: no speedup_vs_peer in the new run" in capsys.readouterr().err
    assert compare.main([str(base), str(without_b), "--select", "a"]) == 0
    assert compare.main([str(base), str(without_b), "--select", "zzz"]) == 1


class _FakeBenchmark:
    """What record_ratio reads of pytest-benchmark's fixture: stats.stats.min and extra_info."""

    def __init__(self, seconds: float):
        self.stats = type("S", (), {"stats": type("T", (), {"min": seconds})()})()
        self.extra_info: dict = {}


def _load_benchutil():
    spec = importlib.util.spec_from_file_location("benchutil_under_test", ROOT / "bench" / "benchutil.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_record_ratio_times_the_peer_in_the_same_test():
    import time

    import pytest

    benchutil = _load_benchutil()
    bench = _FakeBenchmark(0.001)
    benchutil.record_ratio(bench, "g", "c", "diffcore", peer=lambda: time.sleep(0.02), peer_rounds=2)
    assert bench.extra_info["peer_seconds"] >= 0.02
    assert bench.extra_info["speedup_vs_peer"] == bench.extra_info["peer_seconds"] / 0.001
    with pytest.raises(ValueError, match="must time its peer"):
        benchutil.record_ratio(_FakeBenchmark(0.001), "g", "c", "diffcore")
    no_peer = _FakeBenchmark(0.001)
    benchutil.record_ratio(no_peer, "g", "c", "diffcore", no_peer_reason="too large")
    assert "speedup_vs_peer" not in no_peer.extra_info and no_peer.extra_info["no_peer"] == "too large"
