# TEMPORARY placeholder, replaced by the emp branch at merge.
# It only exists so that diffcore.denoisers.EmpiricalDenoiser can be written and tested on the
# analysis branch against the op's signature; it forwards to the float64 reference.
"""Placeholder of the empirical-denoiser op (reference only)."""
from __future__ import annotations

import torch

from diffcore.ref.empirical_denoise import empirical_denoise_ref


def empirical_denoise(x: torch.Tensor, train: torch.Tensor, sigma, *, backend: str = "auto") -> torch.Tensor:
    """x0_hat with x's shape and dtype (placeholder: the float64 reference, any backend name)."""
    return empirical_denoise_ref(x, train, sigma)[0].to(x.dtype)
