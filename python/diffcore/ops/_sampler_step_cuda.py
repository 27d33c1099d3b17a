"""CUDA launcher of the fused sampler step (csrc/sampler_step/sampler_step.cu). Compiled, never run
on a GPU yet: not in the auto order."""

from __future__ import annotations

from diffcore._ext import dtype_name, extension
from diffcore.ops._launch import cuda_launch_args, ptr


def run(x, denoised, extra, noise, out, row, step, flag):
    """As ``_sampler_step_cpu.run`` on contiguous CUDA tensors; the flag is lowered on the device."""
    extension().sampler_step_cuda(
        dtype=dtype_name(x.dtype),
        x=x.data_ptr(),
        denoised=denoised.data_ptr(),
        extra=ptr(extra),
        noise=ptr(noise),
        out=out.data_ptr(),
        numel=x.numel(),
        c_x=row[0],
        c_denoised=row[1],
        c_extra=row[2],
        c_noise=row[3],
        step=step,
        flag=ptr(flag),
        **cuda_launch_args(x),
    )
    return out
