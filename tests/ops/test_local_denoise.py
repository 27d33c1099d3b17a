"""diffcore.ops.local_denoise: every backend against the float64 reference, and the reference
against the two identities of issue 30 (P = 1 is a per-pixel empirical denoiser; a patch covering
the image with circular padding is the empirical denoiser of the translated training set).

Accuracy target: max |out - ref| <= 2e-5 * max(1, |ref|) in fp32 (fp32 weights: ~2e-7 relative
each; the float64 distances keep the logits exact to ~1e-9 even at sigma = 1e-3).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from diffcore.ops import _local_denoise as op_module, _local_denoise_cpu as ld_cpu, local_denoise, wiener_masks
from diffcore.ref.empirical_denoise import empirical_denoise_ref
from diffcore.ref.local_denoise import local_denoise_ref
from tests.helpers import cpu_backends

FAST_BACKENDS = cpu_backends(("cpu", "triton"))
TRITON = [b for b in FAST_BACKENDS if b == "triton"]  # the interpreter is slow: fewer, smaller cases
ABS_TOL = 2e-5
SIGMAS = [0.001, 0.05, 1.0, 80.0]
CASES = [
    ("els", "zeros", 3),
    ("els", "circular", 3),
    ("els", "zeros", 5),
    ("els", "circular", 5),
    ("ls", "zeros", 3),
    ("ls", "circular", 5),
    ("pspc", "zeros", 3),
]


def _params(backends):
    return [pytest.param(b, marks=[pytest.mark.triton] if b == "triton" else [], id=b) for b in backends]


def make_case(batch=3, rows=7, channels=2, height=5, width=6, sigma=0.5, train_dtype=torch.float32, seed=0):
    """Training images in [-1, 1] and x = y_j + sigma * noise (per-sample sigma allowed)."""
    gen = torch.Generator().manual_seed(seed)
    if train_dtype == torch.uint8:
        train = torch.randint(0, 256, (rows, channels, height, width), generator=gen, dtype=torch.uint8)
        values = train.double() / 127.5 - 1.0
    else:
        train = (torch.rand(rows, channels, height, width, generator=gen) * 2 - 1).to(train_dtype)
        values = train.double()
    source = torch.randint(0, rows, (batch,), generator=gen)
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x = values[source] + sig * torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    return x.float(), train


def check(x, train, sigma, backend, **kw):
    ref = local_denoise_ref(x, train, sigma, **kw)
    out = local_denoise(x, train, sigma, backend=backend, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    err = float(((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max())
    assert err <= ABS_TOL, f"max error {err:g}"


@pytest.mark.parametrize("kind,padding,patch", CASES, ids=[f"{k}-{p}-P{s}" for k, p, s in CASES])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_cpu_matches_reference_odd_shape(kind, padding, patch, sigma):
    x, train = make_case(sigma=sigma)
    check(x, train, sigma, "cpu", kind=kind, patch_size=patch, padding=padding)


@pytest.mark.parametrize("kind,padding,patch", CASES, ids=[f"{k}-{p}-P{s}" for k, p, s in CASES])
def test_cpu_uint8_training_set_and_per_sample_sigma(kind, padding, patch):
    sigma = torch.tensor([0.001, 0.3, 2.0, 50.0], dtype=torch.float64)
    x, train = make_case(batch=4, rows=9, channels=3, height=7, width=5, sigma=sigma, train_dtype=torch.uint8)
    check(x, train, sigma, "cpu", kind=kind, patch_size=patch, padding=padding)


@pytest.mark.parametrize("backend", _params(TRITON))
@pytest.mark.parametrize("kind,padding,patch", CASES, ids=[f"{k}-{p}-P{s}" for k, p, s in CASES])
def test_triton_matches_reference_uint8_per_sample_sigma(backend, kind, padding, patch):
    sigma = torch.tensor([0.001, 1.0, 80.0], dtype=torch.float64)
    x, train = make_case(batch=3, rows=5, channels=2, height=5, width=4, sigma=sigma, train_dtype=torch.uint8)
    check(x, train, sigma, backend, kind=kind, patch_size=patch, padding=padding)


@pytest.mark.parametrize("sigma", [0.001, 0.5, 20.0])
def test_cpu_far_queries_many_near_ties(sigma):
    """Pure-noise queries at tiny sigma: many keys lie close to the best one."""
    gen = torch.Generator().manual_seed(3)
    train = torch.rand(11, 1, 7, 7, generator=gen) * 2 - 1
    x = torch.randn(2, 1, 7, 7, generator=gen) * 2
    check(x, train, sigma, "cpu", kind="els", patch_size=3, padding="circular")


@pytest.mark.parametrize("backend", _params(FAST_BACKENDS))
@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_mask_kind_matches_reference(backend, soft):
    x, train = make_case(batch=2, rows=8, channels=2, height=4, width=5, sigma=0.4)
    gen = torch.Generator().manual_seed(4)
    mask = (torch.rand(20, 20, generator=gen) < 0.3).float()
    if soft:
        mask = mask * torch.rand(20, 20, generator=gen) * 3
    mask[3] = 0.0  # an empty row: uniform weights (the mean of the training pixels)
    check(x, train, torch.tensor([0.05, 1.0]), backend, kind="mask", mask=mask)


@pytest.mark.parametrize("backend", _params(FAST_BACKENDS))
def test_mask_of_patch_indicators_is_ls(backend):
    """A binary mask holding each pixel's in-image 3 x 3 neighbourhood gives the LS machine."""
    x, train = make_case(batch=2, rows=6, channels=1, height=5, width=5, sigma=0.3)
    mask = torch.zeros(25, 25)
    for i, j, a, b in itertools.product(range(5), range(5), range(-1, 2), range(-1, 2)):
        if 0 <= i + a < 5 and 0 <= j + b < 5:
            mask[i * 5 + j, (i + a) * 5 + j + b] = 1
    ls = local_denoise(x, train, 0.3, kind="ls", patch_size=3, backend=backend)
    masked = local_denoise(x, train, 0.3, kind="mask", mask=mask, backend=backend)
    assert float((ls - masked).abs().max()) <= ABS_TOL


def _pixels(t):
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("kind", ["els", "ls"])
def test_reference_patch_one_is_a_per_pixel_empirical_denoiser(kind, padding):
    """P = 1: els is the empirical denoiser over every pixel of every training image, ls over the
    pixels of the same location."""
    x, train = make_case(batch=3, rows=5, channels=2, height=4, width=3, sigma=0.7)
    sigma = torch.tensor([0.2, 0.7, 3.0], dtype=torch.float64)
    out = local_denoise_ref(x, train, sigma, kind=kind, patch_size=1, padding=padding)
    pixels = 12
    if kind == "els":
        expected, _ = empirical_denoise_ref(_pixels(x), _pixels(train), sigma.repeat_interleave(pixels))
        assert float((_pixels(out) - expected).abs().max()) <= 1e-12
    else:
        for q in range(pixels):
            i, j = divmod(q, 3)
            expected, _ = empirical_denoise_ref(x[:, :, i, j], train[:, :, i, j], sigma)
            assert float((out[:, :, i, j] - expected).abs().max()) <= 1e-12


def test_reference_full_circular_patch_is_the_translated_empirical_denoiser():
    """P = H = W with circular padding: the patch at q is the image rolled so that q is its centre,
    so els is the empirical denoiser of all H*W translations of every training image."""
    x, train = make_case(batch=3, rows=4, channels=2, height=5, width=5, sigma=1.0)
    sigma = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    out = local_denoise_ref(x, train, sigma, kind="els", patch_size=5, padding="circular")
    translated = torch.cat([torch.roll(train, (a, b), (2, 3)) for a in range(5) for b in range(5)])
    expected, _ = empirical_denoise_ref(x, translated, sigma)
    assert float((out - expected).abs().max()) <= 1e-12


@pytest.mark.parametrize("backend", _params(FAST_BACKENDS))
def test_identities_hold_for_fast_backends(backend):
    """The two identities, checked on the fast backends directly (against the empirical reference)."""
    x, train = make_case(batch=2, rows=4, channels=1, height=5, width=5, sigma=0.5)
    sigma = torch.tensor([0.1, 2.0], dtype=torch.float64)
    out = local_denoise(x, train, sigma, kind="els", patch_size=1, padding="circular", backend=backend)
    expected, _ = empirical_denoise_ref(_pixels(x), _pixels(train), sigma.repeat_interleave(25))
    assert float((_pixels(out).double() - expected).abs().max()) <= ABS_TOL
    out = local_denoise(x, train, sigma, kind="els", patch_size=5, padding="circular", backend=backend)
    translated = torch.cat([torch.roll(train, (a, b), (2, 3)) for a in range(5) for b in range(5)])
    expected, _ = empirical_denoise_ref(x, translated, sigma)
    assert float((out.double() - expected).abs().max()) <= ABS_TOL


def test_zero_padding_dictionaries_are_boundary_broken():
    """With zero padding a corner pixel only sees the same corner of each training image: its
    output is the posterior mean over N corner patches, unaffected by the interior."""
    x, train = make_case(batch=1, rows=6, channels=1, height=6, width=6, sigma=0.5)
    out = local_denoise(x, train, 0.5, kind="els", patch_size=3, backend="cpu")
    altered = train.clone()
    altered[:, :, 2:4, 2:4] = 0.9  # pixels outside every corner patch
    again = local_denoise(x, altered, 0.5, kind="els", patch_size=3, backend="cpu")
    assert float((out[..., 0, 0] - again[..., 0, 0]).abs().max()) == 0.0
    assert float((out[..., 2, 2] - again[..., 2, 2]).abs().max()) > 0.0


@pytest.mark.parametrize("backend", _params(FAST_BACKENDS))
def test_tiny_sigma_returns_the_nearest_key_centre(backend):
    x, train = make_case(batch=2, rows=5, channels=1, height=5, width=5, sigma=1e-4)
    out = local_denoise(x, train, 1e-4, kind="ls", patch_size=3, backend=backend)
    ref = local_denoise_ref(x, train, 1e-4, kind="ls", patch_size=3)
    assert float((out.double() - ref).abs().max()) <= ABS_TOL


def test_per_sample_patch_size_splits_the_batch():
    x, train = make_case(batch=3, rows=6, channels=1, height=6, width=5, sigma=0.5)
    out = local_denoise(x, train, 0.5, kind="els", patch_size=[3, 5, 3], backend="cpu")
    for row, size in enumerate([3, 5, 3]):
        alone = local_denoise(x[row : row + 1], train, 0.5, kind="els", patch_size=size, backend="cpu")
        assert torch.equal(out[row : row + 1], alone)


@pytest.mark.parametrize("tile", [1, 4, 7])
@pytest.mark.parametrize("kind", ["els", "ls", "pspc"])
def test_cpu_tiles_with_remainders(tile, kind, monkeypatch):
    """Any tiling of the training set gives the same posterior (the streamed log-sum-exp)."""
    x, train = make_case(batch=2, rows=10, channels=2, height=5, width=5, sigma=0.2)
    ref = local_denoise_ref(x, train, 0.2, kind=kind, patch_size=3)
    if kind == "els":
        out = ld_cpu.run_els(x, train, torch.full((2,), 0.2, dtype=torch.float64), 3, "zeros", tile_rows=tile)
    else:
        monkeypatch.setattr(ld_cpu, "SAME_LOCATION_TILE_BYTES", 1)
        monkeypatch.setattr(ld_cpu, "tile_images", lambda *a: tile)
        out = local_denoise(x, train, 0.2, kind=kind, patch_size=3, backend="cpu")
    assert float((out.double() - ref).abs().max()) <= ABS_TOL


def test_cpu_memory_never_holds_the_key_tensor():
    """The CPU tiles stay near TILE_BYTES: far below the [N, H, W, C P^2] keys (N = 4000 here)."""
    assert ld_cpu.tile_images(4 * 3 * 40 * 40, 5000, ld_cpu.TILE_BYTES, 8) * 4 * 3 * 40 * 40 <= 2 * ld_cpu.TILE_BYTES
    assert ld_cpu.tile_images(4 * 3 * 1024, 5000, ld_cpu.SAME_LOCATION_TILE_BYTES, 64) <= 86


def test_auto_backend_on_cpu_is_cpu():
    assert op_module.BACKENDS.resolve("auto", torch.device("cpu")) == "cpu"


def test_same_input_same_output_any_thread_count():
    x, train = make_case(batch=3, rows=9, channels=1, height=6, width=6, sigma=0.5)
    threads = torch.get_num_threads()
    first = local_denoise(x, train, 0.5, kind="els", patch_size=3, backend="cpu")
    try:
        torch.set_num_threads(1)
        single = local_denoise(x, train, 0.5, kind="els", patch_size=3, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    assert torch.equal(first[1:2], local_denoise(x[1:2], train, 0.5, kind="els", patch_size=3, backend="cpu"))


def test_half_precision_x_computed_in_fp32():
    x, train = make_case(sigma=0.5)
    out = local_denoise(x.half(), train, 0.5, kind="ls", patch_size=3, backend="cpu")
    assert out.dtype == torch.float16
    ref = local_denoise_ref(x.half().float(), train, 0.5, kind="ls", patch_size=3)
    assert float((out.double() - ref).abs().max()) <= 2e-3


def test_wiener_masks_threshold_rule():
    """Row q keeps the pixels whose |W| reaches threshold * the row's largest |W|; at tiny sigma W ~ I
    on the data's span (the diagonal dominates); at large sigma W ~ S / sigma^2 (the covariance's
    pattern). A threshold of 1 keeps only each row's largest entries."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(400, 1, 4, 4, generator=gen)
    train = base + 0.8 * torch.roll(base, 1, 3)  # neighbours along a row are correlated
    mask = wiener_masks(train, 1.0, 0.3)
    assert mask.shape == (16, 16) and mask.dtype == torch.float32
    assert bool((mask.diagonal() == 1).all())
    assert bool((mask.sum(1) >= 1).all())
    assert float(mask[5, 4]) == 1.0 and float(mask[5, 6]) == 1.0  # row neighbours kept
    assert float(mask[5, 13]) == 0.0  # two rows away: uncorrelated, dropped
    assert float(wiener_masks(train, 1.0, 1.0).sum()) < float(mask.sum())
    constant = train.clone()
    constant[:, :, 0, 0] = 0.5  # no variance: W's row 0 is zero, the mask keeps pixel 0 alone
    row = wiener_masks(constant, 1.0, 0.3)[0]
    assert float(row[0]) == 1.0 and float(row.sum()) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "bad"}, "kind"),
        ({"kind": "els", "padding": "reflect"}, "padding"),
        ({"kind": "els", "patch_size": 4}, "patch_size"),
        ({"kind": "els", "patch_size": [3, 3]}, "patch_size"),
        ({"kind": "pspc", "patch_size": 7}, "patch_size"),
        ({"kind": "mask"}, "mask"),
        ({"kind": "mask", "mask": torch.ones(3, 3)}, "mask"),
        ({"kind": "mask", "mask": -torch.ones(30, 30)}, "mask"),
        ({"kind": "els", "mask": torch.ones(30, 30)}, "mask"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    x, train = make_case(sigma=0.5)
    with pytest.raises((ValueError, TypeError), match=match):
        local_denoise(x, train, 0.5, **kwargs)


def test_errors_shapes_and_sigma():
    x, train = make_case(sigma=0.5)
    with pytest.raises(ValueError, match="train"):
        local_denoise(x, train[:, :1], 0.5)
    with pytest.raises(ValueError, match="x"):
        local_denoise(x[0], train, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        local_denoise(x, train, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        local_denoise(x, train, torch.ones(2))
    with pytest.raises(TypeError, match="float64"):
        local_denoise(x.double(), train, 0.5, backend="cpu")
    with pytest.raises(ValueError, match="threshold"):
        wiener_masks(train, 0.5, 0.0)


def test_error_cuda_backend_on_cpu_tensors():
    x, train = make_case(sigma=0.5)
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"):
        local_denoise(x, train, 0.5, backend="cuda")


# ------------------------------------------------------------------------------------- GPU only
GPU_CASES = [*CASES, ("mask", "zeros", 1)]


def _gpu_check(backend, kind, padding, patch, train_dtype):
    sigma = torch.tensor([0.001, 1.0, 80.0], dtype=torch.float64)
    x, train = make_case(batch=3, rows=40, channels=3, height=9, width=7, sigma=sigma, train_dtype=train_dtype)
    mask = (torch.rand(63, 63, generator=torch.Generator().manual_seed(6)) < 0.2).float() if kind == "mask" else None
    kw = dict(kind=kind, patch_size=patch, padding=padding, mask=mask)
    ref = local_denoise_ref(x, train, sigma, **kw)
    out = local_denoise(x.cuda(), train.cuda(), sigma.cuda(), backend=backend, **kw).cpu()
    assert float(((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max()) <= ABS_TOL


@pytest.mark.cuda_ext
@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8], ids=["f32", "u8"])
@pytest.mark.parametrize("kind,padding,patch", GPU_CASES, ids=[f"{k}-{p}-P{s}" for k, p, s in GPU_CASES])
def test_cuda_kernel_matches_reference(kind, padding, patch, train_dtype):
    _gpu_check("cuda", kind, padding, patch, train_dtype)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8], ids=["f32", "u8"])
@pytest.mark.parametrize("kind,padding,patch", GPU_CASES, ids=[f"{k}-{p}-P{s}" for k, p, s in GPU_CASES])
def test_triton_on_gpu_matches_reference(kind, padding, patch, train_dtype):
    _gpu_check("triton", kind, padding, patch, train_dtype)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_cpu_large_tile_sums_stay_accurate(padding):
    """The digits at sigma = 1: one query against up to 115008 keys, 320-image tiles whose
    background patches all weigh alike (fp32 sums of a tile's weights lost 2.3e-5; they are float64)."""
    from diffcore.data.digits import load_digits

    train = load_digits()[0]
    x = train[:1] + torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    check(x, train, 1.0, "cpu", kind="els", patch_size=3, padding=padding)


# ------------------------------------------------------------------ ELS: direct and shifted box sums
ELS_PATHS = ["direct", "box"]


def run_els_path(path, x, train, sigma, patch, padding, tile_rows=None):
    """ELS on one CPU path, whatever the dispatch rule would pick."""
    sigma64 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]).contiguous()
    if path == "box":
        return ld_cpu.run_box(x, train, sigma64, "els", patch, padding, tile_rows=tile_rows)
    return ld_cpu.run_els(x, train, sigma64, patch, padding, tile_rows=tile_rows)


def check_els_path(path, x, train, sigma, patch, padding, **kw):
    ref = local_denoise_ref(x, train, sigma, kind="els", patch_size=patch, padding=padding)
    out = run_els_path(path, x, train, sigma, patch, padding, **kw)
    assert out.shape == x.shape and out.dtype == torch.float32
    err = float(((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max())
    assert err <= ABS_TOL, f"max error {err:g}"


@pytest.mark.parametrize("path", ELS_PATHS)
@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("patch", [1, 3, 5, 7])
@pytest.mark.parametrize("sigma", [0.001, 0.5, 80.0])
def test_cpu_els_paths_match_reference_odd_shape(path, padding, patch, sigma):
    """Both ELS paths on a 7 x 6 image with two channels (P = 7: wider than the image, every
    coordinate a border one with zero padding; wrapped more than once with circular padding)."""
    x, train = make_case(batch=3, rows=7, channels=2, height=7, width=6, sigma=sigma)
    check_els_path(path, x, train, sigma, patch, padding)


@pytest.mark.parametrize("path", ELS_PATHS)
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_cpu_els_paths_uint8_training_set_and_per_sample_sigma(path, padding):
    sigma = torch.tensor([0.001, 0.3, 2.0, 50.0], dtype=torch.float64)
    x, train = make_case(batch=4, rows=9, channels=3, height=7, width=5, sigma=sigma, train_dtype=torch.uint8)
    check_els_path(path, x, train, sigma, 3, padding)


@pytest.mark.parametrize("path", ELS_PATHS)
@pytest.mark.parametrize("sigma", [0.001, 0.5, 20.0])
def test_cpu_els_paths_far_queries_many_near_ties(path, sigma):
    """Pure-noise queries: many keys lie close to the best one; the box path meets new best
    distances shift by shift and rescales its state each time."""
    gen = torch.Generator().manual_seed(3)
    train = torch.rand(11, 1, 7, 7, generator=gen) * 2 - 1
    x = torch.randn(2, 1, 7, 7, generator=gen) * 2
    check_els_path(path, x, train, sigma, 3, "circular")
    check_els_path(path, x, train, sigma, 3, "zeros")


def test_cpu_els_box_path_identities():
    """P = 1: the empirical denoiser of all training pixels; P = H = W, circular: the empirical
    denoiser of every translation of the training set."""
    x, train = make_case(batch=2, rows=4, channels=2, height=5, width=5, sigma=0.5)
    sigma = torch.tensor([0.1, 2.0], dtype=torch.float64)
    for padding in ("zeros", "circular"):
        out = run_els_path("box", x, train, sigma, 1, padding)
        expected, _ = empirical_denoise_ref(_pixels(x), _pixels(train), sigma.repeat_interleave(25))
        assert float((_pixels(out).double() - expected).abs().max()) <= ABS_TOL
    out = run_els_path("box", x, train, sigma, 5, "circular")
    translated = torch.cat([torch.roll(train, (a, b), (2, 3)) for a in range(5) for b in range(5)])
    expected, _ = empirical_denoise_ref(x, translated, sigma)
    assert float((out.double() - expected).abs().max()) <= ABS_TOL


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_cpu_els_box_path_same_bits_any_threads_batch_and_partial_chunks(padding):
    """21 images in tiles of 5 (every 16-image chunk partial): the same bits with 1 or 2 threads
    and for one image alone, and within the tolerance of the reference."""
    x, train = make_case(batch=3, rows=21, channels=2, height=6, width=7, sigma=0.4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run_els_path("box", x, train, 0.4, 3, padding, tile_rows=5)
        torch.set_num_threads(1)
        one = run_els_path("box", x, train, 0.4, 3, padding, tile_rows=5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(one[2:], run_els_path("box", x[2:], train, 0.4, 3, padding, tile_rows=5))
    check_els_path("box", x, train, 0.4, 3, padding, tile_rows=5)


def test_els_dispatch_rule():
    """The cost model counts the keys of the dictionaries (key_ranges) and the direct path's
    3 C P^2 operations per pair; the op returns the bits of the path it picks."""
    for height, width, patch, padding in [(8, 8, 3, "zeros"), (7, 6, 5, "zeros"), (5, 9, 3, "circular")]:
        counts = ld_cpu.els_operation_counts(height, width, 2, patch, padding)
        row_lo, row_hi = ld_cpu.key_ranges(height, patch, padding)
        col_lo, col_hi = ld_cpu.key_ranges(width, patch, padding)
        keys = int((row_hi - row_lo).sum()) * int((col_hi - col_lo).sum())
        assert counts["pairs"] == keys and counts["direct"] == 3 * 2 * patch * patch * keys
    x, train = make_case(batch=2, rows=6, channels=1, height=6, width=6, sigma=0.5)
    for patch in (1, 3):
        path = "box" if ld_cpu.els_uses_box(6, 6, 1, patch, "zeros") else "direct"
        out = local_denoise(x, train, 0.5, kind="els", patch_size=patch, backend="cpu")
        assert torch.equal(out, run_els_path(path, x, train, 0.5, patch, "zeros"))


@pytest.mark.parametrize(
    ("sigma", "train_dtype", "patch"),
    [(0.3, torch.float32, 3), (1e-3, torch.float32, 3), (30.0, torch.uint8, 5), (0.5, torch.uint8, 3)],
)
def test_pspc_several_tiles_streamed_totals(sigma, train_dtype, patch, monkeypatch):
    """PSPC over several multi-chunk tiles (stage "totals" streams (dmin, total) chunk by chunk, with
    a rescale at each new best; stage "means" weighs each chunk's distances as they are summed) matches
    the float64 reference, for a tiny and a large sigma and uint8 images, and 1 vs 2 threads and a
    query alone give the same bits."""
    x, train = make_case(batch=3, rows=71, channels=2, height=7, width=6, sigma=sigma, train_dtype=train_dtype)
    monkeypatch.setattr(ld_cpu, "tile_images", lambda *a: 32)  # 2 chunks per tile, 3 tiles, the last partial
    ref = local_denoise_ref(x, train, sigma, kind="pspc", patch_size=patch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = local_denoise(x, train, sigma, kind="pspc", patch_size=patch, backend="cpu")
        torch.set_num_threads(1)
        one = local_denoise(x, train, sigma, kind="pspc", patch_size=patch, backend="cpu")
        alone = local_denoise(x[1:2], train, sigma, kind="pspc", patch_size=patch, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert float((two.double() - ref).abs().max()) <= ABS_TOL
    assert torch.equal(one, two)
    assert torch.equal(alone, one[1:2])
