"""CUDA launcher of the fused sampler step (csrc/sampler_step/sampler_step.cu). Compiled, never run
on a GPU yet: not in the auto order."""

from __future__ import annotations

from diffcore._ext import extension
from diffcore.ops._launch import cuda_launch_args
from diffcore.ops._sampler_step_args import kernel_arguments


def run(x, denoised, extra, noise, out, row, step, flag):
    """As ``_sampler_step_cpu.run`` on contiguous CUDA tensors; the flag is lowered on the device."""
    extension().sampler_step_cuda(
        **kernel_arguments(x, denoised, extra, noise, out, row, step, flag), **cuda_launch_args(x)
    )
    return out
