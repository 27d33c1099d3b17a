"""The empirical optimal denoiser of a training set, as a D(x, sigma) object.

``D*(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i`` (docs/papers.md, Common substrate): the
denoiser that reproduces the training set; a model equal to it has memorized. The work is done by
the op ``diffcore.ops.empirical_denoise`` (backend dispatch, fused kernels); this class only holds
the training set and the backend choice.
"""

from __future__ import annotations

import torch

from diffcore._checks import check_tensor


class EmpiricalDenoiser:
    """``D*(x; sigma)`` of ``train`` [N, ...] (float, or uint8 images read as ``u8 / 127.5 - 1``).

    The training set stays on its device; inputs must be on the same device. ``backend`` is passed
    to the op (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``).
    """

    def __init__(self, train: torch.Tensor, *, backend: str = "auto"):
        check_tensor("train", train, min_ndim=2)
        self.train = train
        self.backend = backend

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train.device

    def to(self, device) -> EmpiricalDenoiser:
        return EmpiricalDenoiser(self.train.to(device), backend=self.backend)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x0_hat [B, ...] with x's shape and dtype; sigma a float or a tensor [B]."""
        from diffcore.ops import empirical_denoise

        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x: expected shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        return empirical_denoise(x, self.train, sigma, backend=self.backend)
