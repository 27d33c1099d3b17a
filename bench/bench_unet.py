"""DDPM++ UNet denoiser: forward, forward+JVP and forward+backward through the whole network.

The peer is the same network with its attention computed by torch (``F.scaled_dot_product_attention``:
its best CPU/GPU backend for the forward and backward; the math backend for the JVP, the only one
with forward-mode AD); diffcore's run uses ``diffcore.ops.attention`` (the UNet's own path). The
rest of the network is identical, so the ratio isolates what the attention op changes end to end.

Full size: UNet-64 (``ddpmpp-cifar`` with model_channels=64, 13.9M parameters), batch 16, 32x32x3,
EDM preconditioning at sigma = 1. DIFFCORE_BENCH_QUICK=1: width 16, batch 2.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from benchutil import QUICK, record_ratio, run_timed
from torch.func import jvp

from diffcore.models import denoiser_preset, layers

WIDTH, BATCH = (16, 2) if QUICK else (64, 16)
CASE = f"ddpmpp-cifar-w{WIDTH}-b{BATCH}"


def torch_attention(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


@pytest.fixture(scope="module")
def setup():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    denoiser = denoiser_preset("ddpmpp-cifar", model_channels=WIDTH).to(device).eval()
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, device=device, generator=gen)
    tangent = torch.randn(x.shape, device=device, generator=gen)
    return denoiser, x, tangent, device


@contextlib.contextmanager
def attention_impl(role: str, mode: str):
    """Route the UNet's attention to torch (peer) or leave it on diffcore.ops.attention."""
    if role == "diffcore":
        yield
        return
    original = layers.attention
    layers.attention = torch_attention
    try:
        if mode == "jvp":  # only the math backend has forward-mode AD
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
    finally:
        layers.attention = original


ROUNDS = 1 if QUICK else 3


def _work(mode, denoiser, x, tangent):
    """The timed call: forward (no grad), forward+JVP (torch.func.jvp) or forward+backward."""
    if mode == "forward":

        def forward():
            with torch.no_grad():
                return denoiser(x, 1.0)

        return forward
    if mode == "jvp":
        return lambda: jvp(lambda x: denoiser(x, 1.0), (x,), (tangent,))
    x_grad = x.clone().requires_grad_(True)

    def forward_backward():
        denoiser.zero_grad(set_to_none=True)
        denoiser(x_grad, 1.0).square().mean().backward()

    return forward_backward


def _peer(mode, denoiser, x, tangent):
    """The same call with the UNet's attention on torch (the peer), for timing inside a test."""
    work = _work(mode, denoiser, x, tangent)

    def peer():
        with attention_impl("peer", mode):
            return work()

    return peer


@pytest.mark.parametrize("role", ["peer", "diffcore"])
@pytest.mark.parametrize("mode", ["forward", "jvp", "backward"])
def test_unet(benchmark, setup, mode, role):
    denoiser, x, tangent, device = setup
    benchmark.group = f"unet_{mode}"
    with attention_impl(role, mode):
        run_timed(benchmark, _work(mode, denoiser, x, tangent), device=device, rounds=ROUNDS)
    record_ratio(
        benchmark, f"unet_{mode}", CASE, role, peer=_peer(mode, denoiser, x, tangent), device=device, peer_rounds=ROUNDS
    )
    benchmark.extra_info["batch"], benchmark.extra_info["width"] = BATCH, WIDTH


GPU_WIDTH, GPU_BATCH = (32, 4) if QUICK else (128, 64)


@pytest.fixture(scope="module")
def gpu_setup():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    denoiser = denoiser_preset("ddpmpp-cifar", model_channels=GPU_WIDTH).cuda().eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(GPU_BATCH, 3, 32, 32, device="cuda", generator=gen)
    return denoiser, x, torch.randn(x.shape, device="cuda", generator=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("role", ["peer", "diffcore"])
@pytest.mark.parametrize("mode", ["forward", "jvp", "backward"])
def test_unet_gpu(benchmark, gpu_setup, mode, role):
    """UNet-128 (EDM's CIFAR-10 network, 55.7M parameters), batch 64, fp32, on the GPU."""
    denoiser, x, tangent = gpu_setup
    benchmark.group = f"unet_gpu_{mode}"
    with attention_impl(role, mode):
        run_timed(benchmark, _work(mode, denoiser, x, tangent), device="cuda", rounds=5, warmup_rounds=2)
    record_ratio(
        benchmark,
        f"unet_gpu_{mode}",
        f"ddpmpp-cifar-w{GPU_WIDTH}-b{GPU_BATCH}",
        role,
        peer=_peer(mode, denoiser, x, tangent),
        device="cuda",
        peer_rounds=5,
        peer_warmup_rounds=2,
    )
    benchmark.extra_info["batch"], benchmark.extra_info["width"] = GPU_BATCH, GPU_WIDTH
