"""What every op's host code passes across the C++ boundary besides its own arguments: data
pointers (0 for an absent optional operand) and, for CUDA launches, the device and stream."""

from __future__ import annotations

import functools

import torch

from diffcore._ext import extension


def ptr(t: torch.Tensor | None) -> int:
    """The data pointer of ``t``, or 0 (null) for None."""
    return 0 if t is None else t.data_ptr()


def cuda_launch_args(t: torch.Tensor) -> dict:
    """``device`` and ``stream`` keyword arguments of every CUDA entry point of ``_C``: the device of
    ``t`` (the C++ side makes it current for the launch and restores the previous one) and torch's
    current stream on it."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return {"device": index, "stream": torch.cuda.current_stream(index).cuda_stream}


@functools.cache
def multiprocessor_count(device: int) -> int:
    """Number of streaming multiprocessors of CUDA device ``device`` (asked of the driver once)."""
    return int(extension().cuda_multiprocessor_count(device=device))
