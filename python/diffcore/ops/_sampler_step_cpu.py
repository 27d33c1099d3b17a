"""CPU host code of the fused sampler step (csrc/sampler_step/sampler_step.cpp): OpenMP, bitwise
deterministic, float32/float64."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffcore._ext import dtype_name, extension
from diffcore.ops._launch import ptr
from diffcore.ops._sampler_step_args import kernel_arguments

# kernel(x, denoised, extra, noise, out, c_x, c_denoised, c_extra, c_noise, step) -> int: data
# pointers (0 = absent extra/noise), the four coefficients and the step index, positionally.
BoundKernel = Callable[[int, int, int, int, int, float, float, float, float, int], int]


def run(x, denoised, extra, noise, out, row, step, flag):
    """out = row . (x, denoised, extra, noise) on contiguous CPU tensors; flag (int32 [1] or None)
    is lowered to ``step`` when denoised or out holds NaN/Inf. Returns out."""
    extension().sampler_step_cpu(
        **kernel_arguments(x, denoised, extra, noise, out, row, step, flag), threads=torch.get_num_threads()
    )
    return out


def bound_kernel(like: torch.Tensor, flag: torch.Tensor | None) -> BoundKernel:
    """The C++ step bound to tensors shaped like ``like`` [B, ...] (dtype, size), to ``flag`` and to
    torch's current thread count: ``kernel(x, denoised, extra, noise, out, c_x, c_denoised, c_extra,
    c_noise, step) -> int`` on data pointers (0 for an absent extra/noise), positional (pybind11's
    keyword dispatch costs about 1.4 us a call, a fifth of the step at 16x3x32x32). Returns > 0 when
    denoised or out held NaN/Inf (and then lowers ``flag`` to ``step``), as ``sampler_step_cpu``."""
    return extension().sampler_step_cpu_bind(
        dtype=dtype_name(like.dtype), numel=like.numel(), flag=ptr(flag), threads=torch.get_num_threads()
    )


def bound_runner(like: torch.Tensor, flag: torch.Tensor | None, kernel: BoundKernel | None = None):
    """``run(x, denoised, extra, noise, out, row, step) -> bool`` for tensors shaped like ``like``
    with the per-call work hoisted out (the sampler's hot path); True when NaN/Inf was seen (the
    flag is lowered at once on the CPU). ``kernel``: a ``bound_kernel(like, flag)`` to reuse."""
    step_kernel = bound_kernel(like, flag) if kernel is None else kernel
    checking = flag is not None

    def run_cpu(x, denoised, extra, noise, out, row, step):
        c_x, c_denoised, c_extra, c_noise = row
        bad = step_kernel(
            x.data_ptr(),
            denoised.data_ptr(),
            0 if extra is None else extra.data_ptr(),
            0 if noise is None else noise.data_ptr(),
            out.data_ptr(),
            c_x,
            c_denoised,
            c_extra,
            c_noise,
            step,
        )
        return checking and bad > 0

    return run_cpu
