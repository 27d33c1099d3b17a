"""Arguments shared by the CPU and CUDA entry points of the fused sampler step
(``sampler_step_cpu`` / ``sampler_step_cuda`` of ``diffcore._C``): data pointers, size, the four
coefficients, the step index and the optional non-finite flag."""

from __future__ import annotations

from diffcore._ext import dtype_name
from diffcore.ops._launch import ptr


def kernel_arguments(x, denoised, extra, noise, out, row, step, flag) -> dict:
    """Keyword arguments of either entry point for ``out = row . (x, denoised, extra, noise)`` on
    contiguous tensors of one shape, dtype and device (``extra``, ``noise``, ``flag`` may be None)."""
    return {
        "dtype": dtype_name(x.dtype),
        "x": x.data_ptr(),
        "denoised": denoised.data_ptr(),
        "extra": ptr(extra),
        "noise": ptr(noise),
        "out": out.data_ptr(),
        "numel": x.numel(),
        "c_x": row[0],
        "c_denoised": row[1],
        "c_extra": row[2],
        "c_noise": row[3],
        "step": step,
        "flag": ptr(flag),
    }
