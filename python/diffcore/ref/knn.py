"""Reference of exact k-nearest-neighbour search in l2 (float64), ties broken by the lower index."""

from __future__ import annotations

import torch

from diffcore.ref._pixels import exact_sqdist, rows_as_float


def knn_ref(queries: torch.Tensor, train: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest training rows of each query.

    Args:
        queries: [B, ...]; train: [N, ...] with the same trailing shape, float or uint8
            (``u8 / 127.5 - 1``).
    Returns:
        ``(distances [B, k] float64, indices [B, k] int64)``: l2 distances in increasing order;
        among equal distances the lower training index comes first.
    """
    q = rows_as_float(queries)
    y = rows_as_float(train).to(q.device)
    d2 = exact_sqdist(q, y)
    order = torch.sort(d2, dim=1, stable=True).indices[:, :k]
    return d2.gather(1, order).sqrt(), order
