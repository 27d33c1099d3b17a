"""Benchmark setup (pytest hooks only): the Triton interpreter without a GPU, machine info (with the
CPU kind: ``bench/compare.py`` compares saved runs of the same kind only), and
skips for GPU benchmarks. The helpers the benchmarks import are in ``benchutil.py``."""

from __future__ import annotations

import os
import platform

import pytest
import torch
from benchutil import cpu_screen_info, fp32_gemm_gflops

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    import diffcore

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["diffcore_build"] = diffcore.build_info()
    machine_info["cpu_model"] = platform.processor() or platform.machine()
    machine_info.update(cpu_screen_info())
    machine_info["fp32_gemm_gflops"] = fp32_gemm_gflops()
    machine_info["load_average"] = os.getloadavg()
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()


def pytest_collection_modifyitems(config, items):
    """Skip GPU benchmarks on machines without a CUDA GPU (with the reason)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords or "cuda_ext" in item.keywords:
            item.add_marker(skip)
