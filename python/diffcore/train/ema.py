"""Exponential moving average of a model's weights with a half-life in images."""

from __future__ import annotations

import copy

import torch

from diffcore.ops._torch_compat import foreach_lerp_
from diffcore.train.loss import ema_beta


class EMA:
    """Keeps ``ema_model``, an eval-mode copy of ``model`` updated after every optimizer step by
    ``p_ema <- beta p_ema + (1 - beta) p`` with ``beta = 0.5 ** (batch / halflife_images)``
    (EDM, Karras et al. 2022, training loop's ema_halflife_kimg / ema_rampup_ratio). Buffers are copied."""

    def __init__(self, model: torch.nn.Module, halflife_images: float, rampup_ratio: float | None = None):
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_images = float(halflife_images)
        self.rampup_ratio = rampup_ratio

    @torch.no_grad()
    def update(self, model: torch.nn.Module, batch_images: int, images_seen: int) -> float:
        """Fold ``model``'s current weights in; ``images_seen`` counts this step's batch. Returns beta."""
        beta = ema_beta(batch_images, images_seen, self.halflife_images, self.rampup_ratio)
        ema_params = list(self.ema_model.parameters())
        params = [p.detach() for p in model.parameters()]
        if ema_params:
            foreach_lerp_(ema_params, params, 1.0 - beta)  # p_ema += (1 - beta) (p - p_ema)
        for b_ema, b in zip(self.ema_model.buffers(), model.buffers()):
            b_ema.copy_(b)
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema_model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema_model.load_state_dict(state)
