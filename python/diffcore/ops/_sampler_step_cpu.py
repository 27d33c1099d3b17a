"""CPU host code of the fused sampler step (csrc/sampler_step/sampler_step.cpp): OpenMP, bitwise
deterministic, float32/float64."""

from __future__ import annotations

import torch

from diffcore._ext import dtype_name, extension
from diffcore.ops._launch import ptr
from diffcore.ops._sampler_step_args import kernel_arguments


def run(x, denoised, extra, noise, out, row, step, flag):
    """out = row . (x, denoised, extra, noise) on contiguous CPU tensors; flag (int32 [1] or None)
    is lowered to ``step`` when denoised or out holds NaN/Inf. Returns out."""
    extension().sampler_step_cpu(
        **kernel_arguments(x, denoised, extra, noise, out, row, step, flag), threads=torch.get_num_threads()
    )
    return out


def bound_runner(like: torch.Tensor, flag: torch.Tensor | None):
    """``run(x, denoised, extra, noise, out, row, step) -> bool`` for tensors shaped like ``like``
    with the per-call work hoisted out (the sampler's hot path); True when NaN/Inf was seen (the
    flag is lowered at once on the CPU)."""
    kernel = extension().sampler_step_cpu
    dtype, numel, flag_ptr, threads = dtype_name(like.dtype), like.numel(), ptr(flag), torch.get_num_threads()
    checking = flag is not None

    def run_cpu(x, denoised, extra, noise, out, row, step):
        bad = kernel(
            dtype=dtype,
            x=x.data_ptr(),
            denoised=denoised.data_ptr(),
            extra=ptr(extra),
            noise=ptr(noise),
            out=out.data_ptr(),
            numel=numel,
            c_x=row[0],
            c_denoised=row[1],
            c_extra=row[2],
            c_noise=row[3],
            step=step,
            flag=flag_ptr,
            threads=threads,
        )
        return checking and bad > 0

    return run_cpu
