"""The plain-torch local denoisers the public codes compute (the benchmark's peer): unfold the
training patches, squared distances by the |q|^2 + |k|^2 - 2 q.k expansion, softmax, weighted sum
of the key centres, in fp32. Chunked to fit memory: over queries, and over training images with a
log-sum-exp merge of the chunks (the keys [N, H*W, C*P*P] of CIFAR-size sets do not fit at once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 256 << 20  # the [queries, keys] logit block of one chunk


def _pad(t: torch.Tensor, r: int, padding: str) -> torch.Tensor:
    return F.pad(t, (r, r, r, r), mode="circular" if padding == "circular" else "constant")


def _unfold(t: torch.Tensor, patch: int, padding: str) -> torch.Tensor:
    """[M, C, H, W] -> patches [M, H*W, C*P*P] (the patch centred at each pixel)."""
    return F.unfold(_pad(t, patch // 2, padding), patch).transpose(1, 2)


def _pattern_classes(size: int, patch: int, padding: str) -> torch.Tensor:
    """Per coordinate, its boundary class (zeros padding: border coordinates alone, interior ones together)."""
    r = patch // 2
    idx = torch.arange(size)
    if padding == "circular":
        return torch.zeros(size, dtype=torch.long)
    return torch.where((idx >= r) & (idx < size - r), torch.full_like(idx, -1), idx)


def plain_torch_els(
    x: torch.Tensor, train: torch.Tensor, sigma: torch.Tensor, patch: int, padding: str = "zeros"
) -> torch.Tensor:
    """ELS the plain way: x [B, C, H, W] fp32, train [N, C, H, W] fp32, sigma [B] -> [B, C, H, W]."""
    b, c, h, w = x.shape
    n = train.shape[0]
    pixels = h * w
    queries = _unfold(x, patch, padding).reshape(b * pixels, -1)
    rows, cols = _pattern_classes(h, patch, padding), _pattern_classes(w, patch, padding)
    klass = (rows[:, None] * (w + 1) + cols[None, :]).reshape(-1)  # [H*W]
    inv2s2 = (0.5 / sigma.float().square()).repeat_interleave(pixels)
    dim = queries.shape[1]  # the unfolded keys of a chunk ([images * H*W, D]) fit CHUNK_BYTES too
    images_per_chunk = max(1, min(n, CHUNK_BYTES // (4 * pixels * max(b * pixels, dim))))
    query_chunk = max(1, CHUNK_BYTES // (4 * images_per_chunk * pixels))
    out = torch.empty(b * pixels, c)
    for q0 in range(0, b * pixels, query_chunk):
        q = queries[q0 : q0 + query_chunk]
        qclass = klass[torch.arange(q0, q0 + q.shape[0]) % pixels]
        run_lse = torch.full((q.shape[0],), -float("inf"))
        acc = torch.zeros(q.shape[0], c)
        for n0 in range(0, n, images_per_chunk):
            imgs = train[n0 : n0 + images_per_chunk]
            keys = _unfold(imgs, patch, padding).reshape(-1, queries.shape[1])
            centres = imgs.permute(0, 2, 3, 1).reshape(-1, c)
            logits = q.square().sum(1, keepdim=True) + keys.square().sum(1)[None, :] - 2 * q @ keys.T
            logits.mul_(-inv2s2[q0 : q0 + q.shape[0], None])
            if padding == "zeros":
                match = qclass[:, None] == klass.repeat(imgs.shape[0])[None, :]
                logits.masked_fill_(~match, -float("inf"))
            lse = torch.logsumexp(logits, dim=1)
            new_lse = torch.logaddexp(run_lse, lse)
            part = torch.softmax(logits, dim=1) @ centres
            acc = acc * torch.exp(run_lse - new_lse)[:, None] + part * torch.exp(lse - new_lse)[:, None]
            run_lse = new_lse
        out[q0 : q0 + q.shape[0]] = acc
    return out.reshape(b, h, w, c).permute(0, 3, 1, 2)


def plain_torch_ls(
    x: torch.Tensor, train: torch.Tensor, sigma: torch.Tensor, patch: int, padding: str = "zeros"
) -> torch.Tensor:
    """LS the plain way: per location a batched [B, N] logit block (bmm over locations), chunked
    over training images with a log-sum-exp merge."""
    b, c, h, w = x.shape
    n = train.shape[0]
    pixels = h * w
    queries = _unfold(x, patch, padding).transpose(0, 1)  # [L, B, D]
    inv2s2 = (0.5 / sigma.float().square())[None, :, None]
    images_per_chunk = max(1, min(n, CHUNK_BYTES // (4 * pixels * max(b, queries.shape[2]))))
    run_lse = torch.full((pixels, b), -float("inf"))
    acc = torch.zeros(pixels, b, c)
    for n0 in range(0, n, images_per_chunk):
        imgs = train[n0 : n0 + images_per_chunk]
        keys = _unfold(imgs, patch, padding).transpose(0, 1)  # [L, n, D]
        centres = imgs.reshape(imgs.shape[0], c, pixels).permute(2, 0, 1)  # [L, n, C]
        logits = (
            queries.square().sum(2, keepdim=True)
            + keys.square().sum(2)[:, None, :]
            - 2 * torch.bmm(queries, keys.transpose(1, 2))
        ).mul_(-inv2s2)
        lse = torch.logsumexp(logits, dim=2)
        new_lse = torch.logaddexp(run_lse, lse)
        part = torch.bmm(torch.softmax(logits, dim=2), centres)
        acc = acc * torch.exp(run_lse - new_lse)[..., None] + part * torch.exp(lse - new_lse)[..., None]
        run_lse = new_lse
    return acc.permute(1, 2, 0).reshape(b, c, h, w)


def plain_torch_pspc(x: torch.Tensor, train: torch.Tensor, sigma: torch.Tensor, patch: int) -> torch.Tensor:
    """PSPC the plain way (a Python loop over square positions, as the public code): per square the
    [B, N] distances, softmax and the posterior-mean crop, averaged over the covering squares."""
    b, c, h, w = x.shape
    inv2s2 = (0.5 / sigma.float().square())[:, None]
    out = torch.zeros_like(x)
    count = torch.zeros(h, w)
    flat_train = train.reshape(train.shape[0], c, h, w)
    for i in range(h - patch + 1):
        for j in range(w - patch + 1):
            crops = flat_train[:, :, i : i + patch, j : j + patch].reshape(train.shape[0], -1)
            q = x[:, :, i : i + patch, j : j + patch].reshape(b, -1)
            logits = torch.cdist(q, crops).square_().mul_(-inv2s2)
            out[:, :, i : i + patch, j : j + patch] += (torch.softmax(logits, dim=1) @ crops).reshape(
                b, c, patch, patch
            )
            count[i : i + patch, j : j + patch] += 1
    return out / count
