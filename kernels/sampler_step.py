"""Triton fused sampler step: ``out = c_x x + c_d d + c_e e + c_z z`` in one pass.

The coefficients are host scalars of the schedule (no device-to-host traffic). Math in fp32
(float32, float16, bfloat16 tensors). With a flag
buffer, the first step at which ``d`` or ``out`` holds NaN/Inf is recorded on the device
(``atomic_min``), so the check never synchronizes.
Imported lazily by ``diffcore.ops.sampler_step``; runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _sampler_step_kernel(
    x_ptr,
    d_ptr,
    e_ptr,
    z_ptr,
    out_ptr,
    flag_ptr,
    n,
    c_x,
    c_d,
    c_e,
    c_z,
    step,
    HAS_E: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = c_d * d
    if HAS_E:
        acc = acc + c_e * tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        acc = acc + c_z * tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = acc + c_x * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, stored, mask=mask)
    if HAS_FLAG:
        back = stored.to(tl.float32)
        bad = ((d - d) != 0.0) | ((back - back) != 0.0)
        count = tl.sum(tl.where(mask & bad, 1, 0), axis=0)
        tl.atomic_min(flag_ptr, tl.where(count > 0, step, 2147483647))


def sampler_step_triton(
    x: torch.Tensor,
    denoised: torch.Tensor,
    extra: torch.Tensor | None,
    noise: torch.Tensor | None,
    out: torch.Tensor,
    coefficients: tuple[float, float, float, float],
    step: int = 0,
    flag: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch on contiguous tensors of one shape/dtype/device; returns ``out``."""
    n = x.numel()
    c_x, c_d, c_e, c_z = (float(c) for c in coefficients)
    grid = (triton.cdiv(n, BLOCK),)
    _sampler_step_kernel[grid](
        x,
        denoised,
        extra if extra is not None else x,
        noise if noise is not None else x,
        out,
        flag if flag is not None else out,
        n,
        c_x,
        c_d,
        c_e,
        c_z,
        int(step),
        HAS_E=extra is not None,
        HAS_Z=noise is not None,
        HAS_FLAG=flag is not None,
        BLOCK_SIZE=BLOCK,
    )
    return out
