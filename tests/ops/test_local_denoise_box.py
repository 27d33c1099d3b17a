"""The CPU box-sum path of local_denoise (kind 'ls' with zero or circular padding, kind 'pspc'):
patch distances as separable box sums of per-pixel squared differences, PSPC's per-pixel average
as the adjoint box sum of the normalized weights (csrc/local_denoise/local_denoise.cpp).

Against the float64 reference at odd shapes: non-square images, C = 3, P = 1, P covering the image
(and, circular, wrapping it more than once), uint8 training sets, per-sample sigma, tiles forced
small (LS's streamed state; PSPC's two passes over the tiles). Shapes are chosen so that both
summation methods of an axis run: left-to-right sums (P <= 3, short lines) and the van Herk /
Gil-Werman block sums (P >= 5 on lines of 7 or more, the adjoint of P = 7 squares).
"""

from __future__ import annotations

import pytest
import torch

from diffcore._ext import extension
from diffcore.ops import _local_denoise_cpu as ld_cpu, local_denoise
from diffcore.ref.local_denoise import local_denoise_ref
from tests.ops.test_local_denoise import ABS_TOL, make_case

# kind, padding, patch, channels, height, width
SHAPES = [
    ("ls", "zeros", 1, 1, 4, 7),
    ("ls", "circular", 1, 3, 5, 3),
    ("ls", "zeros", 3, 3, 6, 5),
    ("ls", "zeros", 5, 3, 7, 9),  # block sums along both axes
    ("ls", "zeros", 7, 2, 5, 6),  # the patch covers the image
    ("ls", "circular", 3, 2, 7, 4),
    ("ls", "circular", 9, 1, 4, 5),  # wraps the image more than once (repeats counted)
    ("pspc", "zeros", 1, 2, 4, 6),
    ("pspc", "zeros", 3, 3, 5, 7),
    ("pspc", "zeros", 5, 1, 5, 8),  # one square row: P = H
    ("pspc", "zeros", 7, 2, 9, 11),  # block sums for the squares and for their adjoint
]
SHAPE_IDS = [f"{k}-{pad}-P{p}-C{c}-{h}x{w}" for k, pad, p, c, h, w in SHAPES]


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max())


@pytest.mark.parametrize("kind,padding,patch,channels,height,width", SHAPES, ids=SHAPE_IDS)
def test_box_path_matches_reference(kind, padding, patch, channels, height, width):
    """Per-sample sigma from 1e-3 to 80, one tile and small tiles; float training sets for every
    other shape, uint8 for the rest."""
    sigma = torch.tensor([0.001, 0.05, 1.0, 80.0], dtype=torch.float64)
    train_dtype = torch.uint8 if SHAPES.index((kind, padding, patch, channels, height, width)) % 2 else torch.float32
    x, train = make_case(
        batch=4, rows=37, channels=channels, height=height, width=width, sigma=sigma, train_dtype=train_dtype
    )
    ref = local_denoise_ref(x, train, sigma, kind=kind, patch_size=patch, padding=padding)
    out = local_denoise(x, train, sigma, kind=kind, patch_size=patch, padding=padding, backend="cpu")
    assert out.shape == x.shape and out.dtype == torch.float32
    assert _error(out, ref) <= ABS_TOL
    for tile in (5, 16):  # 8 and 3 tiles, the last one partly padding
        tiled = ld_cpu.run_box(x, train, sigma, kind, patch, padding, tile_rows=tile)
        assert _error(tiled, ref) <= ABS_TOL, f"tile {tile}"


@pytest.mark.parametrize("kind,padding", [("ls", "zeros"), ("ls", "circular"), ("pspc", "zeros")])
def test_box_path_same_bits_whatever_batch_and_threads(kind, padding):
    x, train = make_case(batch=6, rows=40, channels=2, height=6, width=7, sigma=0.4)
    threads = torch.get_num_threads()
    full = local_denoise(x, train, 0.4, kind=kind, patch_size=5, padding=padding, backend="cpu")
    try:
        torch.set_num_threads(1)
        single_thread = local_denoise(x, train, 0.4, kind=kind, patch_size=5, padding=padding, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(full, single_thread)
    for rows in (slice(0, 1), slice(2, 5), slice(5, 6)):
        part = local_denoise(x[rows], train, 0.4, kind=kind, patch_size=5, padding=padding, backend="cpu")
        assert torch.equal(full[rows], part)


def test_pspc_single_pass_equals_totals_then_means():
    """With one tile, stage 'single' gives the bits of the two-pass path ('totals' then 'means')."""
    x, train = make_case(batch=3, rows=21, channels=2, height=6, width=5, sigma=0.3)
    batch, channels, height, width = x.shape
    patch, squares = 3, (height - 2) * (width - 2)
    xf = x.reshape(batch, channels, -1).contiguous()
    y = ld_cpu.chunk_major(train)
    inv2s2 = torch.full((batch,), 0.5 / 0.3**2, dtype=torch.float64)
    results = []
    for stages in (["single"], ["totals", "means"]):
        state = ld_cpu._State.create(batch * squares, (batch, height * width, channels))
        for stage in stages:
            extension().local_denoise_box_pspc_tile(
                x_ptr=xf.data_ptr(), y_ptr=y.data_ptr(), batch=batch, tile=y.shape[0] * 16, valid=train.shape[0],
                channels=channels, height=height, width=width, patch=patch, stage=stage,
                inv2s2_ptr=inv2s2.data_ptr(), band=ld_cpu.BAND, threads=1, **state.pointers(),
            )  # fmt: skip
        results.append(state)
    assert torch.equal(results[0].dmin, results[1].dmin)
    assert torch.equal(results[0].total, results[1].total)
    assert torch.equal(results[0].acc, results[1].acc)


def test_box_path_on_the_digits():
    """The digits' shape (one 1797-image tile, every key inside the band at sigma = 1): PSPC against
    the reference; LS against the CSR kernel's mask kind with the patch indicators (the reference's
    LS takes 14 s here), both exact to the same tolerance."""
    from diffcore.data.digits import load_digits

    train = load_digits()[0]
    x = train[:2].float() + torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = local_denoise_ref(x[:1], train, 1.0, kind="pspc", patch_size=3)
    assert _error(local_denoise(x[:1], train, 1.0, kind="pspc", patch_size=3, backend="cpu"), ref) <= ABS_TOL
    indicators = torch.zeros(64, 64)
    for i in range(8):
        for j in range(8):
            for pixel in ld_cpu.patch_pixels(i, j, 8, 8, 5, "zeros"):
                indicators[i * 8 + j, pixel] = 1.0
    masked = local_denoise(x, train, 1.0, kind="mask", mask=indicators, backend="cpu")
    assert _error(local_denoise(x, train, 1.0, kind="ls", patch_size=5, backend="cpu"), masked.double()) <= ABS_TOL


def test_pspc_counts_are_the_covering_squares():
    counts = ld_cpu.pspc_counts(5, 7, 3)
    fold = torch.nn.functional.fold
    ones = torch.ones(1, 9, 3 * 5, dtype=torch.float64)
    assert torch.equal(counts, fold(ones, (5, 7), 3)[0, 0])


@pytest.mark.parametrize(
    "override,match",
    [({"stage": "both"}, "stage"), ({"tile": 20}, "tile"), ({"valid": 0}, "valid"), ({"patch": 4}, "patch")],
)
def test_box_kernel_errors_name_the_argument(override, match):
    x = torch.zeros(1, 1, 16)
    y = torch.zeros(1, 16, 1, 16)
    state = ld_cpu._State.create(4, (1, 16, 1))
    inv2s2 = torch.ones(1, dtype=torch.float64)
    args = dict(
        x_ptr=x.data_ptr(), y_ptr=y.data_ptr(), batch=1, tile=16, valid=16, channels=1, height=4, width=4,
        patch=3, stage="single", inv2s2_ptr=inv2s2.data_ptr(), band=ld_cpu.BAND, threads=1, **state.pointers(),
    )  # fmt: skip
    args.update(override)
    with pytest.raises(ValueError, match=match):
        extension().local_denoise_box_pspc_tile(**args)


@pytest.mark.parametrize("kind", ["ls", "pspc"])
def test_box_path_nan_in_train_is_an_error(kind):
    x, train = make_case(batch=2, rows=9, channels=1, height=5, width=5, sigma=0.5)
    train[4, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="sigma"):
        local_denoise(x, train, 0.5, kind=kind, patch_size=3, backend="cpu")
