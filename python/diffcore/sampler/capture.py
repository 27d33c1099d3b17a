"""CUDA-graph trajectories: capture a whole deterministic sampling loop once, replay it per batch.

The sampler loop has no host synchronization (coefficients are host scalars, the NaN/Inf check is
a device flag), so for fixed shapes the whole trajectory -- every denoiser call and every fused
step -- can be captured into one ``torch.cuda.CUDAGraph``. Replays then cost one launch on the
host. The denoiser must be capturable too (no ``.item()``, no host-side data-dependent control
flow, no CPU-GPU copies).

Capturing costs one eager warm-up trajectory (on a side stream, so that lazy initialization,
cuBLAS handles and Triton compilation happen outside the graph) plus the capture itself; it pays
off from the second batch on (``diffcore.sampler.sample(..., capture=True)`` reuses it across
batches of the same shape).
"""

from __future__ import annotations

import torch

from diffcore.ops.steps import NO_BAD_STEP


class CapturedTrajectory:
    """A trajectory of ``body(state) -> final state`` captured as a CUDA graph for inputs shaped
    like ``x_example`` [B, ...]. ``run(x)`` copies x in, replays, and returns a fresh tensor."""

    def __init__(self, loop, body, x_example: torch.Tensor):
        if x_example.device.type != "cuda":
            raise ValueError(f"capture: CUDA graphs need CUDA tensors, got x on {x_example.device}")
        self.loop = loop
        self.shape = tuple(x_example.shape)
        loop.prepare_sigmas(loop.sigmas)
        self.static_in = loop.initial_state(x_example).clone()  # the graph's own input buffer
        device = x_example.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: lazy init and kernel compilation outside the graph
            body(self.static_in.clone())
        torch.cuda.current_stream(device).wait_stream(side)
        self._reset_flag()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            # the loops never write into their input state, so static_in survives replays
            self.static_out = body(self.static_in)

    def _reset_flag(self) -> None:
        if self.loop.flag is not None:
            self.loop.flag.fill_(NO_BAD_STEP)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The final state for initial state ``x`` (same shape as the captured one)."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"x: the graph was captured for shape {self.shape}, got {tuple(x.shape)}")
        self.static_in.copy_(x)
        self._reset_flag()
        self.graph.replay()
        return self.loop.finish(self.static_out.clone())
