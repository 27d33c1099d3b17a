"""Reference of the analytic local denoisers (float64, direct; slow by design).

For a noisy image ``x [C, H, W]`` at noise level sigma (VE: ``x = x0 + sigma n``) every output pixel
``q`` is a posterior mean over a set of training *keys* (patches), each key weighted by
``softmax(-|query_q - key|^2 / (2 sigma^2))`` over ALL keys of that pixel (no truncation):

- ``els`` (Kamb & Ganguli 2025, the equivariant local score machine): keys are the P x P patches
  (all C channels) of every training image at every location; the output is the posterior mean of
  the key patches' centre pixels. ``padding="circular"``: patches wrap around, one dictionary for
  every pixel. ``padding="zeros"``: patches are zero-padded and a pixel only looks at the training
  patches with the same padding pattern (the "boundary-broken" dictionaries): a row within
  ``r = (P - 1) / 2`` of the top or bottom border takes keys from that same row only, any other row
  takes keys from all the rows at least r from both borders; columns likewise.
- ``ls`` (same paper, the local score machine): the key of pixel q is the patch at q of each training
  image (N keys); padding as for els.
- ``pspc`` (Niedoba et al. 2025, patch-set posterior composites): for every valid P x P square the
  full posterior mean of the same-location training crops; each pixel averages the means of the
  squares that cover it.
- ``mask``: a per-pixel query precision ``M [H*W, H*W]`` (binary or soft, >= 0; Lukoianov et al.
  2025 use binary masks from the data's Wiener filter): the logit of training image n at pixel q is
  ``-sum_p M[q, p] |x[:, p] - y_n[:, p]|^2 / (2 sigma^2)`` and the output is the posterior mean of
  ``y_n[:, q]``.

Accuracy: distances are computed difference first, in float64; logits are taken relative to each
pixel's best key, so the best key has logit 0 and weights do not underflow together at tiny sigma.
uint8 images map to [-1, 1] as ``u8 / 127.5 - 1``.
"""

from __future__ import annotations

import torch

from diffcore.ref._pixels import exact_sqdist

KINDS = ("els", "ls", "pspc", "mask")
PADDINGS = ("zeros", "circular")


def local_denoise_ref(
    x: torch.Tensor,
    train: torch.Tensor,
    sigma,
    *,
    kind: str,
    patch_size: int = 3,
    padding: str = "zeros",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local denoiser in float64.

    Args:
        x: noisy images [B, C, H, W].
        train: training images [N, C, H, W], float or uint8 (``u8 / 127.5 - 1``).
        sigma: a float or a tensor [B] (per-sample noise levels).
        kind: 'els', 'ls', 'pspc' or 'mask'.
        patch_size: odd P (els, ls, pspc).
        padding: 'zeros' or 'circular' (els, ls).
        mask: query precisions [H*W, H*W] (kind 'mask').
    Returns:
        x0_hat [B, C, H, W] float64.
    """
    xd = x.to(torch.float64)
    yd = _as_float(train).to(xd.device)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=xd.device).reshape(-1)
    inv2s2 = 0.5 / (s.expand(xd.shape[0]) if s.numel() == 1 else s).square()
    if kind == "mask":
        if mask is None:
            raise ValueError("mask: kind 'mask' needs a query-precision matrix [H*W, H*W]")
        return _mask_ref(xd, yd, inv2s2, mask.to(torch.float64))
    if kind == "pspc":
        return _pspc_ref(xd, yd, inv2s2, patch_size)
    return _patch_ref(xd, yd, inv2s2, patch_size, padding, same_location=(kind == "ls"))


def posterior_mean(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, inv2s2: torch.Tensor
) -> torch.Tensor:
    """``sum_k softmax_k(-|queries_b - keys_k|^2 inv2s2_b) values_k``: queries [B, D], keys [K, D],
    values [K, V], inv2s2 [B] -> [B, V] (logits relative to each query's best key)."""
    sqdist = exact_sqdist(queries, keys) if keys.shape[1] else queries.new_zeros(queries.shape[0], keys.shape[0])
    logits = -(sqdist - sqdist.min(dim=1, keepdim=True).values) * inv2s2[:, None]
    return torch.softmax(logits, dim=1) @ values


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) / 127.5 - 1.0 if t.dtype == torch.uint8 else t.to(torch.float64)


def pad_images(t: torch.Tensor, r: int, padding: str) -> torch.Tensor:
    """[M, C, H, W] -> [M, C, H + 2r, W + 2r], zero-padded or wrapped around (any r)."""
    if padding == "zeros":
        return torch.nn.functional.pad(t, (r, r, r, r))
    rows = torch.arange(-r, t.shape[2] + r, device=t.device) % t.shape[2]
    cols = torch.arange(-r, t.shape[3] + r, device=t.device) % t.shape[3]
    return t.index_select(2, rows).index_select(3, cols)


def patches(t: torch.Tensor, patch_size: int, padding: str) -> torch.Tensor:
    """The C x P x P patch centred at every pixel: [M, C, H, W] -> [M, H, W, C * P * P]."""
    m, c, h, w = t.shape
    padded = pad_images(t, patch_size // 2, padding)
    unfolded = padded.unfold(2, patch_size, 1).unfold(3, patch_size, 1)  # [M, C, H, W, P, P]
    return unfolded.permute(0, 2, 3, 1, 4, 5).reshape(m, h, w, c * patch_size * patch_size)


def dictionary_ranges(size: int, patch_size: int, padding: str) -> list[range]:
    """For each coordinate along an axis of ``size`` pixels, the coordinates its keys come from
    (els): all of them with circular padding; with zero padding the same coordinate for the
    border ones (within r of an edge: their padding pattern is unique) and the interior ones
    (r <= i < size - r) for the others."""
    r = patch_size // 2
    if padding == "circular":
        return [range(size)] * size
    interior = range(r, size - r)
    return [interior if (r <= i < size - r) else range(i, i + 1) for i in range(size)]


def _patch_ref(x, y, inv2s2, patch_size, padding, same_location):
    _b, c, h, w = x.shape
    xq = patches(x, patch_size, padding)  # [B, H, W, D]
    yk = patches(y, patch_size, padding)  # [N, H, W, D]
    out = torch.empty_like(x)
    row_sets = dictionary_ranges(h, patch_size, padding)
    col_sets = dictionary_ranges(w, patch_size, padding)
    for i in range(h):
        for j in range(w):
            rows = [i] if same_location else list(row_sets[i])
            cols = [j] if same_location else list(col_sets[j])
            keys = yk[:, rows][:, :, cols].reshape(-1, yk.shape[3])
            centres = y[:, :, rows][:, :, :, cols].permute(0, 2, 3, 1).reshape(-1, c)
            out[:, :, i, j] = posterior_mean(xq[:, i, j], keys, centres, inv2s2)
    return out


def _pspc_ref(x, y, inv2s2, patch_size):
    b, c, h, w = x.shape
    p = patch_size
    out = torch.zeros_like(x)
    count = torch.zeros(h, w, dtype=torch.float64, device=x.device)
    for i in range(h - p + 1):
        for j in range(w - p + 1):
            queries = x[:, :, i : i + p, j : j + p].reshape(b, -1)
            crops = y[:, :, i : i + p, j : j + p].reshape(y.shape[0], -1)
            out[:, :, i : i + p, j : j + p] += posterior_mean(queries, crops, crops, inv2s2).reshape(b, c, p, p)
            count[i : i + p, j : j + p] += 1
    return out / count


def _mask_ref(x, y, inv2s2, mask):
    b, c, h, w = x.shape
    xf, yf = x.reshape(b, c, h * w), y.reshape(y.shape[0], c, h * w)
    out = torch.empty(b, c, h * w, dtype=torch.float64, device=x.device)
    for q in range(h * w):
        support = torch.nonzero(mask[q] > 0).flatten()
        scale = mask[q, support].sqrt()
        queries = (xf[:, :, support] * scale).reshape(b, -1)
        keys = (yf[:, :, support] * scale).reshape(y.shape[0], -1)
        out[:, :, q] = posterior_mean(queries, keys, yf[:, :, q], inv2s2)
    return out.reshape(b, c, h, w)
