"""CPU host code of the local denoisers (``diffcore.ops.local_denoise``): training tiles decoded
and padded here, the fused work in C++ (csrc/local_denoise/local_denoise.cpp).

Memory: the noisy images (padded), one training tile (padded or pixel-major, float32, about
``TILE_BYTES``) and the running state (``dmin``, ``total`` [Q], ``acc`` [Q, V] float64): O(B C H W +
tile). The key tensor [N, H, W, C P P] is never formed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from diffcore._ext import extension

# A key whose logit lies BAND below the running best weighs less than exp(-60) ~ 1e-26 of it.
BAND = 60.0
# Training images per tile: about this many bytes of padded (els) or pixel-major (same-location)
# float32 images, so that a tile stays in the L2 cache while every query streams over it.
TILE_BYTES = 256 << 10
SAME_LOCATION_TILE_BYTES = 1 << 20
LANES = 16  # the ELS tile holds a multiple of this many images (the C++ kernel's vector chunk)


def tile_images(image_bytes: int, rows: int, budget: int, minimum: int) -> int:
    """Training images per tile: ``budget`` bytes' worth, at least ``minimum``, at most ``rows``."""
    return int(max(1, min(rows, max(minimum, budget // max(1, image_bytes)))))


def pad_images(t: torch.Tensor, r: int, padding: str) -> torch.Tensor:
    """[M, C, H, W] -> [M, C, H + 2r, W + 2r] contiguous, zero-padded or wrapped around (any r)."""
    if padding == "zeros":
        return torch.nn.functional.pad(t, (r, r, r, r)).contiguous()
    rows = torch.arange(-r, t.shape[2] + r, device=t.device) % t.shape[2]
    cols = torch.arange(-r, t.shape[3] + r, device=t.device) % t.shape[3]
    return t.index_select(2, rows).index_select(3, cols).contiguous()


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """Images as float32 (uint8 as u8 / 127.5 - 1)."""
    return t.to(torch.float32).div_(127.5).sub_(1.0) if t.dtype == torch.uint8 else t.to(torch.float32)


def key_ranges(size: int, patch: int, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate of an axis, the key coordinates [lo, hi) of the els dictionary: all of them
    (circular), the same one for border coordinates (within r of an edge: a unique padding
    pattern) and the interior ones [r, size - r) for the others (zeros)."""
    r = patch // 2
    lo = torch.zeros(size, dtype=torch.int32)
    hi = torch.full((size,), size, dtype=torch.int32)
    if padding == "zeros":
        for i in range(size):
            if r <= i < size - r:
                lo[i], hi[i] = r, size - r
            else:
                lo[i], hi[i] = i, i + 1
    return lo, hi


@dataclass
class _State:
    """Running log-sum-exp state of Q queries (float64): the smallest distance, the weight sum, and
    the weighted sums of the values (``acc``, laid out as the kernel expects)."""

    dmin: torch.Tensor
    total: torch.Tensor
    acc: torch.Tensor

    @classmethod
    def create(cls, queries: int, acc_shape: tuple[int, ...], device: torch.device | str = "cpu"):
        return cls(
            torch.full((queries,), float("inf"), dtype=torch.float64, device=device),
            torch.zeros(queries, dtype=torch.float64, device=device),
            torch.zeros(acc_shape, dtype=torch.float64, device=device),
        )

    def pointers(self) -> dict:
        return {"dmin_ptr": self.dmin.data_ptr(), "total_ptr": self.total.data_ptr(), "acc_ptr": self.acc.data_ptr()}


def run_els(
    x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, patch: int, padding: str, tile_rows: int | None = None
) -> torch.Tensor:
    """ELS: x [B, C, H, W] float32, train [N, C, H, W] -> x0_hat [B, C, H, W] float32."""
    batch, channels, height, width = x.shape
    r = patch // 2
    threads = torch.get_num_threads()
    xq = pad_images(x, r, padding)
    row_lo, row_hi = key_ranges(height, patch, padding)
    col_lo, col_hi = key_ranges(width, patch, padding)
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    state = _State.create(batch * height * width, (batch * height * width, channels))
    tile = tile_rows or max(LANES, tile_images(4 * xq[0].numel(), train.shape[0], TILE_BYTES, LANES) // LANES * LANES)
    lanes = -(-tile // LANES) * LANES
    buffer = torch.zeros(channels, height + 2 * r, width + 2 * r, lanes, dtype=torch.float32)
    for start in range(0, train.shape[0], tile):
        images = pad_images(as_float32(train[start : start + tile]), r, padding)
        valid = images.shape[0]
        buffer[..., :valid] = images.permute(1, 2, 3, 0)  # image-innermost: full vectors for any dictionary
        extension().local_denoise_translated_tile(
            **translated_arguments(xq, buffer, patch, [row_lo, row_hi, col_lo, col_hi], inv2s2, state),
            tile=lanes,
            valid=valid,
            threads=threads,
        )
    return translated_means(state, x.shape)


@dataclass
class Supports:
    """Same-location queries in CSR form: per location a weighted list of pixels (the query
    precision's row) and the pixels whose posterior means it outputs."""

    offsets: torch.Tensor  # [L + 1] int64
    index: torch.Tensor  # [nnz] int32
    weight: torch.Tensor  # [nnz] float32
    out_offsets: torch.Tensor  # [L + 1] int64
    out_index: torch.Tensor  # [outputs] int32

    FIELDS = ("offsets", "index", "weight", "out_offsets", "out_index")

    @classmethod
    def from_lists(cls, supports: list[tuple[list[int], list[float]]], outputs: list[list[int]]):
        def offsets(lengths):
            return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)

        return cls(
            offsets([len(s[0]) for s in supports]),
            torch.tensor([p for s in supports for p in s[0]], dtype=torch.int32),
            torch.tensor([w for s in supports for w in s[1]], dtype=torch.float32),
            offsets([len(o) for o in outputs]),
            torch.tensor([p for o in outputs for p in o], dtype=torch.int32),
        )


def patch_pixels(i: int, j: int, height: int, width: int, patch: int, padding: str) -> list[int]:
    """Pixel indices of the P x P patch centred at (i, j): wrapped (circular; repeats counted) or
    those inside the image (zeros: the padded entries are 0 for queries and keys alike)."""
    r = patch // 2
    pixels = []
    for a in range(i - r, i + r + 1):
        for b in range(j - r, j + r + 1):
            if padding == "circular":
                pixels.append((a % height) * width + b % width)
            elif 0 <= a < height and 0 <= b < width:
                pixels.append(a * width + b)
    return pixels


def ls_supports(height: int, width: int, patch: int, padding: str) -> Supports:
    """LS: the patch around each pixel, output that pixel."""
    supports, outputs = [], []
    for i in range(height):
        for j in range(width):
            pixels = patch_pixels(i, j, height, width, patch, padding)
            supports.append((pixels, [1.0] * len(pixels)))
            outputs.append([i * width + j])
    return Supports.from_lists(supports, outputs)


def pspc_supports(height: int, width: int, patch: int) -> Supports:
    """PSPC: every valid P x P square (top-left (i, j), row-major), output all of its pixels."""
    supports, outputs = [], []
    for i in range(height - patch + 1):
        for j in range(width - patch + 1):
            pixels = [(i + a) * width + j + b for a in range(patch) for b in range(patch)]
            supports.append((pixels, [1.0] * len(pixels)))
            outputs.append(pixels)
    return Supports.from_lists(supports, outputs)


def mask_supports(mask: torch.Tensor) -> Supports:
    """A query-precision matrix [H*W, H*W]: the nonzero entries of each row, output that pixel."""
    supports, outputs = [], []
    for q in range(mask.shape[0]):
        pixels = torch.nonzero(mask[q] > 0).flatten()
        supports.append((pixels.tolist(), mask[q, pixels].to(torch.float32).tolist()))
        outputs.append([q])
    return Supports.from_lists(supports, outputs)


def run_same_location(
    x: torch.Tensor, train: torch.Tensor, sigma64: torch.Tensor, supports: Supports, tile_rows: int | None = None
) -> torch.Tensor:
    """Same-location keys: x [B, C, H, W] float32 -> posterior means [B, outputs, C] float32 (per
    location, the values of its output pixels in CSR order)."""
    batch, channels, height, width = x.shape
    pixels = height * width
    threads = torch.get_num_threads()
    xf = x.reshape(batch, channels, pixels).contiguous()
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    state = _State.create(batch * (supports.offsets.shape[0] - 1), (batch, int(supports.out_offsets[-1]), channels))
    tile = tile_rows or tile_images(4 * channels * pixels, train.shape[0], SAME_LOCATION_TILE_BYTES, 64)
    for start in range(0, train.shape[0], tile):
        y = pixel_major(train[start : start + tile])
        extension().local_denoise_same_location_tile(
            **same_location_arguments(xf, y, supports, inv2s2, state), threads=threads
        )
    return same_location_means(state, supports)


BOX_LANES = 16  # the box-sum kernels take a tile of a multiple of this many images (their vector chunk)


def run_box(
    x: torch.Tensor,
    train: torch.Tensor,
    sigma64: torch.Tensor,
    kind: str,
    patch: int,
    padding: str,
    tile_rows: int | None = None,
) -> torch.Tensor:
    """LS and ELS (zero or circular padding) and PSPC by separable box sums of the per-pixel squared
    differences (csrc/local_denoise/local_denoise.cpp, "Box-sum path" and "ELS by shifted box sums"):
    x [B, C, H, W] float32, train [N, C, H, W] float32 or uint8 -> x0_hat [B, C, H, W] float32.

    LS and ELS stream their log-sum-exp state over the tiles (ELS: the squared differences to the
    training image shifted by each allowed key offset, box-summed). PSPC needs each square's total over the whole
    set before its normalized weights can be summed per pixel: with one tile one pass does both
    (stage "single"); otherwise a first pass over the tiles gets every square's (dmin, total) and a
    second adds each tile's normalized, per-pixel aggregated weighted sums (stages "totals", "means").
    Memory: x, one padded chunk-major tile, per thread the distances of one query to the tile
    (float64, [windows, T]; PSPC's multi-tile stages only those to one 16-image chunk, [windows, 16]),
    and the state (dmin, total per window; acc [B, H*W, C])."""
    batch, channels, height, width = x.shape
    pixels = height * width
    xf = x.reshape(batch, channels, pixels).contiguous()
    inv2s2 = (0.5 / sigma64.square()).contiguous()
    rows = train.shape[0]
    tile = tile_rows or tile_images(4 * channels * pixels, rows, SAME_LOCATION_TILE_BYTES, 64)
    if not tile_rows and BOX_LANES <= tile < rows:  # several tiles: whole 16-image chunks but in the last
        tile = tile // BOX_LANES * BOX_LANES
    starts = list(range(0, rows, tile))
    windows = (height - patch + 1) * (width - patch + 1) if kind == "pspc" else pixels
    state = _State.create(batch * windows, (batch, pixels, channels))
    common = {
        "x_ptr": xf.data_ptr(),
        "batch": batch,
        "channels": channels,
        "height": height,
        "width": width,
        "patch": patch,
        "inv2s2_ptr": inv2s2.data_ptr(),
        "band": BAND,
        "threads": torch.get_num_threads(),
        **state.pointers(),
    }

    def run_tile(start: int, **extra) -> None:
        y = chunk_major(train[start : start + tile])
        ext = extension()
        kernel = {
            "ls": ext.local_denoise_box_ls_tile,
            "els": ext.local_denoise_box_els_tile,
            "pspc": ext.local_denoise_box_pspc_tile,
        }[kind]
        sizes = {"y_ptr": y.data_ptr(), "tile": y.shape[0] * BOX_LANES, "valid": min(tile, rows - start)}
        kernel(**sizes, **common, **extra)  # type: ignore[operator]  # the three share these keywords

    if kind in ("ls", "els"):
        for start in starts:
            run_tile(start, circular=padding == "circular")
        return (state.acc / state.total.reshape(batch, pixels, 1)).permute(0, 2, 1).reshape(x.shape).float()
    for stage in ("single",) if len(starts) == 1 else ("totals", "means"):  # a pass over the tiles each
        for start in starts:
            run_tile(start, stage=stage)
    means = state.acc / pspc_counts(height, width, patch).reshape(1, pixels, 1)
    return means.permute(0, 2, 1).reshape(x.shape).float()


# The dispatch rule's cost model of ELS on the CPU, ns per (query pixel, key) pair and per counted
# float64 operation (els_operation_counts), fitted to one-thread CPU times of both paths at 8 x 8
# (C = 1, P = 1..9) and 3 x 32 x 32 (P = 1, 3, 9) on 2026-12-06 (docs/local_denoise.md, "CPU
# algorithm"): the direct path's per-pair work (a distance buffer, block_weights' two passes) costs
# more than the box path's, whose counted operations (grids in memory) cost more each.
ELS_DIRECT_NS = (3.6, 0.054)  # (per pair, per operation)
ELS_BOX_NS = (1.7, 0.10)


def window_adds(size: int, left: int, count: int, patch: int) -> int:
    """Additions of one axis's window sums (the C++ window_axis: direct sums, or van Herk /
    Gil-Werman's 2 size + count where fewer): windows [j - left, j - left + patch) n [0, size)."""
    direct = sum(max(0, min(size, j - left + patch) - max(0, j - left) - 1) for j in range(count))
    return min(direct, 2 * size + count)


def els_shift_ranges(size: int, patch: int, padding: str) -> list[tuple[int, int, int]]:
    """Per key shift along an axis (the C++ shift_ranges): (output coordinates, e_s coordinates,
    window-sum additions per line). Circular: every shift, every coordinate; zeros: shift 0 for
    every coordinate, s != 0 for the interior coordinates i with i + s interior."""
    r = patch // 2
    if padding == "circular":
        return [(size, size, window_adds(size + 2 * r, 0, size, patch))] * size
    interior = size - 2 * r
    ranges = [(size, size, window_adds(size, r, size, patch))]
    for s in range(1, max(0, interior - 1) + 1):
        count = interior - s
        ranges += [(count, count + 2 * r, window_adds(count + 2 * r, 0, count, patch))] * 2
    return ranges


def els_operation_counts(height: int, width: int, channels: int, patch: int, padding: str) -> dict[str, float]:
    """Float64 operations of the distances of ELS per (query image, training image) on the two CPU
    paths: ``pairs`` (query pixel, key) pairs; ``direct`` = pairs x 3 C P^2 (per distance term: widen,
    subtract, multiply-add); ``box`` = per shift 3 C per pixel of e_s plus the window sums' additions.
    ``direct_ns``, ``box_ns``: the predicted times (ELS_DIRECT_NS, ELS_BOX_NS)."""
    rows, cols = els_shift_ranges(height, patch, padding), els_shift_ranges(width, patch, padding)
    pairs = sum(r[0] for r in rows) * sum(c[0] for c in cols)
    box = 0.0
    for _out_rows, in_rows, row_adds in rows:
        for out_cols, in_cols, col_adds in cols:
            box += 3 * channels * in_rows * in_cols + in_rows * col_adds + out_cols * row_adds
    direct = 3.0 * channels * patch * patch * pairs
    return {
        "pairs": float(pairs),
        "direct": direct,
        "box": box,
        "direct_ns": ELS_DIRECT_NS[0] * pairs + ELS_DIRECT_NS[1] * direct,
        "box_ns": ELS_BOX_NS[0] * pairs + ELS_BOX_NS[1] * box,
    }


@functools.lru_cache(maxsize=256)
def els_uses_box(height: int, width: int, channels: int, patch: int, padding: str) -> bool:
    """The dispatch rule of ELS on the CPU: shifted box sums where the cost model predicts less time."""
    counts = els_operation_counts(height, width, channels, patch, padding)
    return counts["box_ns"] < counts["direct_ns"]


def pspc_counts(height: int, width: int, patch: int) -> torch.Tensor:
    """How many valid P x P squares cover each pixel: [H, W] float64."""

    def axis(size: int) -> torch.Tensor:
        i = torch.arange(size)
        return (i.clamp(max=size - patch) - (i - patch + 1).clamp(min=0) + 1).to(torch.float64)

    return axis(height)[:, None] * axis(width)[None, :]


def chunk_major(images: torch.Tensor) -> torch.Tensor:
    """[M, C, H, W] (float32 or uint8) -> float32 [T / BOX_LANES, H*W, C, BOX_LANES] with T = M rounded
    up to a multiple of BOX_LANES, the images past M zero (the box-sum tile: each chunk of BOX_LANES
    images contiguous, pixel-major inside)."""
    m, channels = images.shape[:2]
    pixels = images.shape[2] * images.shape[3]
    full = m // BOX_LANES  # whole chunks, transposed straight into place (no zero-padded copy)
    chunks = -(-m // BOX_LANES)
    source = as_float32(images).reshape(m, channels, pixels)
    out = torch.empty(chunks, pixels, channels, BOX_LANES, dtype=torch.float32)
    if full:
        whole = source[: full * BOX_LANES].reshape(full, BOX_LANES, channels, pixels)
        out[:full].copy_(whole.permute(0, 3, 2, 1))
    if chunks > full:  # the last, partial chunk: the images past M zero
        last = torch.zeros(BOX_LANES, channels, pixels, dtype=torch.float32)
        last[: m - full * BOX_LANES] = source[full * BOX_LANES :]
        out[full:].copy_(last.reshape(1, BOX_LANES, channels, pixels).permute(0, 3, 2, 1))
    return out


def translated_arguments(
    xq: torch.Tensor, y: torch.Tensor, patch: int, ranges: list[torch.Tensor], inv2s2: torch.Tensor, state: _State
) -> dict:
    """The keyword arguments that the CPU and CUDA ELS kernels share: padded queries ``xq``
    [B, C, H+P-1, W+P-1], one padded training tile ``y`` (layout per backend), the key ranges
    ``[row_lo, row_hi, col_lo, col_hi]`` (int32 [H], [W]) and the running state."""
    batch, channels, padded_h, padded_w = xq.shape
    names = ("row_lo_ptr", "row_hi_ptr", "col_lo_ptr", "col_hi_ptr")
    return {
        "xq_ptr": xq.data_ptr(),
        "y_ptr": y.data_ptr(),
        "batch": batch,
        "channels": channels,
        "height": padded_h - patch + 1,
        "width": padded_w - patch + 1,
        "patch": patch,
        **{name: t.data_ptr() for name, t in zip(names, ranges)},
        "inv2s2_ptr": inv2s2.data_ptr(),
        "band": BAND,
        **state.pointers(),
    }


def translated_means(state: _State, x_shape: torch.Size) -> torch.Tensor:
    """ELS posterior means from the final state: -> [B, C, H, W] float32."""
    batch, channels, height, width = x_shape
    out = state.acc / state.total[:, None]
    return out.reshape(batch, height, width, channels).permute(0, 3, 1, 2).to(torch.float32).contiguous()


def same_location_arguments(
    xf: torch.Tensor, y: torch.Tensor, supports: Supports, inv2s2: torch.Tensor, state: _State
) -> dict:
    """The keyword arguments that the CPU and CUDA same-location kernels share: queries ``xf``
    [B, C, H*W], one pixel-major training tile ``y`` [H*W, C, T], the supports (on the kernel's
    device) and the running state."""
    batch, channels, pixels = xf.shape
    return {
        "x_ptr": xf.data_ptr(),
        "y_ptr": y.data_ptr(),
        "batch": batch,
        "tile": y.shape[2],
        "channels": channels,
        "pixels": pixels,
        "locations": supports.offsets.shape[0] - 1,
        "support_offsets_ptr": supports.offsets.data_ptr(),
        "support_index_ptr": supports.index.data_ptr(),
        "support_weight_ptr": supports.weight.data_ptr(),
        "out_offsets_ptr": supports.out_offsets.data_ptr(),
        "out_index_ptr": supports.out_index.data_ptr(),
        "inv2s2_ptr": inv2s2.data_ptr(),
        "band": BAND,
        **state.pointers(),
    }


def same_location_means(state: _State, supports: Supports) -> torch.Tensor:
    """Same-location posterior means from the final state: -> [B, outputs, C] float32."""
    counts = (supports.out_offsets[1:] - supports.out_offsets[:-1]).to(state.total.device)
    total = state.total.reshape(-1, counts.shape[0]).repeat_interleave(counts, dim=1)
    return (state.acc / total[:, :, None]).to(torch.float32)


def pixel_major(images: torch.Tensor) -> torch.Tensor:
    """[M, C, H, W] (float32 or uint8) -> float32 [H*W, C, M] contiguous (the same-location tile)."""
    m, channels = images.shape[:2]
    return as_float32(images).reshape(m, channels, -1).permute(2, 1, 0).contiguous()
