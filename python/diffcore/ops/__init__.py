"""Public ops: input checks, backend dispatch and autograd.

Each op lives in ``diffcore/ops/<op>.py`` beside its reference ``diffcore/ref/<op>.py``, its
Triton kernel ``diffcore/kernels/<op>.py``, its C++/CUDA code ``csrc/<op>/``, its tests
``tests/ops/test_<op>.py`` and its benchmark ``bench/bench_<op>.py``. Every op takes
``backend="auto"`` or one of ``reference``, ``cpu``, ``cuda``, ``triton``.

The functions are imported eagerly: a submodule and its op share a name, and importing the
submodule would otherwise replace the package attribute with the module. Importing here touches
neither CUDA nor triton.
"""
from __future__ import annotations

from diffcore.ops.attention import attention, attention_and_jvp
from diffcore.ops.empirical_denoise import empirical_denoise, empirical_denoise_with_logz
from diffcore.ops.knn import knn
from diffcore.ops.sampler_step import sampler_step

__all__ = ["attention", "attention_and_jvp", "empirical_denoise", "empirical_denoise_with_logz", "knn", "sampler_step"]
