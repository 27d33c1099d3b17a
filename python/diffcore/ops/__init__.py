"""Public ops: input checks, backend dispatch and autograd.

Each op lives in ``diffcore/ops/_<op>.py`` beside its reference ``diffcore/ref/<op>.py``, its
Triton kernel ``kernels/<op>.py`` (shipped as ``diffcore.kernels``), its C++/CUDA code
``csrc/<op>/``, its tests ``tests/ops/test_<op>.py`` and its benchmark ``bench/bench_<op>.py``.
Every op takes ``backend="auto"`` or one of ``reference``, ``cpu``, ``cuda``, ``triton``.

Each op ``<op>`` is the function exported here; its module is private (``ops/_<op>.py``: checks,
backend resolution, autograd where there is one, and the table ``RUNNERS`` of backend name ->
runner), with CPU host code in ``ops/_<op>_cpu.py`` and CUDA launchers in ``ops/_<op>_cuda.py``.
Importing here touches neither CUDA nor triton.
"""

from __future__ import annotations

from diffcore.ops._attention import attention, attention_and_jvp
from diffcore.ops._empirical_denoise import empirical_denoise, empirical_denoise_with_logz
from diffcore.ops._knn import knn
from diffcore.ops._local_denoise import local_denoise, wiener_masks
from diffcore.ops._sampler_step import sampler_step

__all__ = [
    "attention",
    "attention_and_jvp",
    "empirical_denoise",
    "empirical_denoise_with_logz",
    "knn",
    "local_denoise",
    "sampler_step",
    "wiener_masks",
]
