"""The denoiser on a CUDA GPU: forward, backward, JVP and vmap, against the CPU float64 result.

Skipped without a GPU (tests/conftest.py). Not yet run: no GPU machine was lent to this task.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp, vmap

from diffcore.models import EDMPrecond

pytestmark = pytest.mark.gpu


FIELDS = dict(img_resolution=16, model_channels=32, channel_mult=(1, 2), attn_resolutions=(16,))


def _pair(tiny_unet):
    """The same tiny denoiser (same seed, same weights) on the CPU in float64 and on the GPU in float32."""
    return EDMPrecond(tiny_unet(**FIELDS)).double(), EDMPrecond(tiny_unet(**FIELDS)).cuda()


def _rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def test_forward_jvp_vmap_backward_on_gpu_match_cpu_float64(tiny_unet):
    cpu64, gpu32 = _pair(tiny_unet)
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    t = torch.randn(3, *x.shape, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    f64 = lambda x: cpu64(x, sigma)  # noqa: E731
    f32 = lambda x: gpu32(x, sigma.float().cuda())  # noqa: E731
    xg, tg = x.float().cuda(), t.float().cuda()
    # TF32 convolutions (cuDNN's default) keep about 1e-3 relative accuracy
    assert _rel(f32(xg), f64(x)) < 1e-2
    _, tangent64 = jvp(f64, (x,), (t[0],))
    _, tangent32 = jvp(f32, (xg,), (tg[0],))
    assert _rel(tangent32, tangent64) < 1e-2
    batched = vmap(lambda v: jvp(f32, (xg,), (v,))[1])(tg)
    assert _rel(batched[0], tangent32) < 1e-4
    xr = xg.clone().requires_grad_(True)
    f32(xr).square().sum().backward()
    assert torch.isfinite(xr.grad).all() and all(p.grad is not None for p in gpu32.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_jvp_on_gpu(tiny_unet, dtype):
    _, gpu32 = _pair(tiny_unet)
    x = torch.randn(2, 1, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, tangent = jvp(lambda x: gpu32(x, 0.7), (x,), (torch.randn_like(x),))
    reference = gpu32(x, 0.7)
    assert out.dtype == torch.float32 and torch.isfinite(tangent).all()
    assert _rel(out, reference) < 5e-2
