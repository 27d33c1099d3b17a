"""diffcore.ops.empirical_denoise: every backend against the float64 reference.

Accuracy target (issue 2): relative error ||out - ref|| / ||ref|| per row at most 1e-5 in fp32 for
sigma from 0.002 to 80, near-ties included; logz to 5e-6 relative (absolute below |logz| = 1).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from diffcore.ops import (
    _empirical_denoise as op_module,
    _empirical_denoise_cpu as ed_cpu,
    empirical_denoise,
    empirical_denoise_with_logz,
)
from diffcore.ref.empirical_denoise import empirical_denoise_ref
from tests.helpers import cpu_backends

FAST_BACKENDS = [b for b in cpu_backends(("cpu", "triton"))]
ALL_BACKENDS = [b for b in cpu_backends(("reference", "cpu", "triton"))]
SIGMAS = [0.002, 0.05, 1.0, 80.0]
REL_TOL = 1e-5
LOGZ_TOL = 5e-6  # |logz error| / max(1, |logz|): logits carry errors up to RESCORE_TOL = 1e-5 by design


def _marks(backend):
    return [pytest.mark.triton] if backend == "triton" else []


def _params(backends):
    return [pytest.param(b, marks=_marks(b), id=b) for b in backends]


def small_path_on_one_and_two_threads(monkeypatch, x, train, sigma64):
    """``_empirical_denoise_cpu.run`` with torch on one thread, then on two with the small path's
    query split forced: the two (out, logz) pairs."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ed_cpu.run(x, train, sigma64)
        torch.set_num_threads(2)
        monkeypatch.setattr(ed_cpu, "SMALL_PARALLEL_MIN_WORK", 1)  # force the parallel split
        two = ed_cpu.run(x, train, sigma64)
    finally:
        torch.set_num_threads(threads)
    return one, two


def row_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref.double()).reshape(ref.shape[0], -1).norm(dim=1)
    return float((diff / ref.double().reshape(ref.shape[0], -1).norm(dim=1)).max())


def logz_rel_error(logz: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((logz.double() - ref).abs() / ref.abs().clamp_min(1.0)).max())


def make_case(batch, rows, dim, sigma, train_dtype=torch.float32, seed=0):
    """A training set in [-1, 1] and queries x = y_j + sigma * noise (the noisy-image setting)."""
    gen = torch.Generator().manual_seed(seed)
    if train_dtype == torch.uint8:
        train = torch.randint(0, 256, (rows, dim), generator=gen, dtype=torch.uint8)
        values = train.double() / 127.5 - 1.0
    else:
        values = torch.rand(rows, dim, generator=gen, dtype=torch.float64) * 2 - 1
        train = values.to(train_dtype)
        values = train.double()
    source = torch.randint(0, rows, (batch,), generator=gen)
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    x = (values[source] + sig * torch.randn(batch, dim, generator=gen, dtype=torch.float64)).float()
    return x, train


def check_against_reference(x, train, sigma, backend, rel_tol=REL_TOL, logz_tol=LOGZ_TOL):
    ref_out, ref_logz = empirical_denoise_ref(x, train, sigma)
    out, logz = empirical_denoise_with_logz(x, train, sigma, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert logz.shape == (x.shape[0],)
    assert row_rel_error(out, ref_out) <= rel_tol
    assert logz_rel_error(logz, ref_logz) <= logz_tol


@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8], ids=["f32", "u8"])
def test_matches_reference_odd_shape(backend, sigma, train_dtype):
    x, train = make_case(5, 123, 123, sigma, train_dtype)
    check_against_reference(x, train, sigma, backend)


@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_matches_reference_far_queries(backend, sigma):
    """Queries that are pure noise (far from every training point): many candidates per row."""
    gen = torch.Generator().manual_seed(1)
    train = torch.rand(77, 45, generator=gen) * 2 - 1
    x = torch.randn(6, 45, generator=gen) * 2
    check_against_reference(x, train, sigma, backend)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8], ids=["f32", "u8"])
def test_cpu_matches_reference_image_size(sigma, train_dtype):
    x, train = make_case(6, 300, 3072, sigma, train_dtype)
    check_against_reference(x, train, sigma, "cpu")


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.skipif("triton" not in ALL_BACKENDS, reason="triton backend not usable here")
@pytest.mark.parametrize("sigma", [0.002, 1.0, 80.0])
def test_triton_matches_reference_image_size(sigma):
    x, train = make_case(3, 70, 3072, sigma, torch.uint8)
    check_against_reference(x, train, sigma, "triton")


@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
def test_per_row_sigma(backend):
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 5.0, 80.0], dtype=torch.float32)
    x, train = make_case(6, 101, 67, sigma)
    check_against_reference(x, train, sigma, backend)


@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
@pytest.mark.parametrize("sigma", [0.002, 0.05])
def test_near_ties_mix_both_training_points(backend, sigma):
    """Two training points equidistant from x up to ~1e-6 (relative): both carry weight."""
    gen = torch.Generator().manual_seed(2)
    dim = 96
    train = torch.rand(40, dim, generator=gen, dtype=torch.float64) * 2 - 1
    a, b = train[3].clone(), train[17].clone()
    # x on the bisector of a and b, plus a small offset along (a - b): distances differ by ~1e-6 rel.
    mid = (a + b) / 2
    normal = torch.randn(dim, generator=gen, dtype=torch.float64)
    normal -= (normal @ (a - b)) / ((a - b) @ (a - b)) * (a - b)
    x = (mid + 0.01 * normal / normal.norm() + 1e-9 * (a - b)).float()[None].repeat(3, 1)
    train = train.float()
    da = float(((x[0].double() - train[3].double()) ** 2).sum())
    db = float(((x[0].double() - train[17].double()) ** 2).sum())
    assert abs(da - db) / da < 1e-5
    ref_out, _ = empirical_denoise_ref(x, train, sigma)
    # the reference itself mixes the two points: a real near-tie
    weight_a = float(
        ((ref_out[0] - train[17].double()) @ (train[3].double() - train[17].double()))
        / ((train[3].double() - train[17].double()).square().sum())
    )
    assert 0.01 < weight_a < 0.99
    check_against_reference(x, train, sigma, backend)


@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
def test_small_sigma_returns_nearest_training_image(backend):
    x, train = make_case(4, 50, 3 * 4 * 4, 0.002)
    train = train.reshape(50, 3, 4, 4)
    x = x.reshape(4, 3, 4, 4)
    out = empirical_denoise(x, train, 0.002, backend=backend)
    nearest = torch.cdist(x.reshape(4, -1).double(), train.reshape(50, -1).double()).argmin(1)
    torch.testing.assert_close(out, train[nearest], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", _params(FAST_BACKENDS))
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_x(backend, x_dtype):
    if backend == "triton" and x_dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    x, train = make_case(5, 60, 33, 0.5)
    x = x.to(x_dtype)
    ref_out, ref_logz = empirical_denoise_ref(x, train, 0.5)
    out, logz = empirical_denoise_with_logz(x, train, 0.5, backend=backend)
    assert out.dtype == x_dtype and logz.dtype == torch.float32
    eps = torch.finfo(x_dtype).eps
    # the only error left is the rounding of the output to x's dtype
    assert row_rel_error(out, ref_out) <= eps
    assert logz_rel_error(logz, ref_logz) <= LOGZ_TOL


def test_float16_and_float64_training_sets_on_cpu():
    """float16 rows are exact in fp32; float64 rows are computed as their fp32 rounding (documented)."""
    x, train = make_case(4, 80, 20, 0.3)
    check_against_reference(x, train.to(torch.float16), 0.3, "cpu")
    ref_out, ref_logz = empirical_denoise_ref(x, train, 0.3)  # train: the fp32 rounding
    out, logz = empirical_denoise_with_logz(x, train.double(), 0.3, backend="cpu")
    assert row_rel_error(out, ref_out) <= REL_TOL
    assert logz_rel_error(logz, ref_logz) <= LOGZ_TOL


@pytest.mark.parametrize("tile_rows", [1, 7, 64])
@pytest.mark.parametrize("sigma", [0.002, 1.0, 80.0])
def test_cpu_tiling_with_remainder_tiles(tile_rows, sigma):
    x, train = make_case(5, 123, 40, sigma, torch.uint8)
    ref_out, ref_logz = empirical_denoise_ref(x, train, sigma)
    sigma64 = torch.full((5,), sigma, dtype=torch.float64)
    out, logz = ed_cpu.run(x, train, sigma64, tile_rows=tile_rows)
    assert row_rel_error(out, ref_out) <= REL_TOL
    assert logz_rel_error(logz, ref_logz) <= LOGZ_TOL


@pytest.mark.parametrize("sigma", [3.0, 10.0, 30.0])
def test_cpu_mid_sigma_switches_to_float64_gram(monkeypatch, sigma):
    """At image sizes and mid sigma most pairs carry weight and the fp32 bound is too loose to keep
    their logits: the tile's Gram matrix is recomputed in float64 instead of re-scoring each pair."""
    created = _spy_on(monkeypatch, "_PreciseGram")
    x, train = make_case(8, 400, 3072, sigma, torch.uint8)
    check_against_reference(x, train, sigma, "cpu")
    if sigma == 10.0:
        assert created, "expected the float64 Gram path at sigma=10, D=3072"


def _spy_on(monkeypatch, name):
    created = []
    original = getattr(ed_cpu, name)

    def spy(*args, **kwargs):
        created.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ed_cpu, name, spy)
    return created


@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0])
def test_cpu_bf16_screening_at_small_sigma(monkeypatch, sigma):
    """At D >= 256 the CPU path screens with a bf16 GEMM and re-scores the candidates exactly."""
    screened = _spy_on(monkeypatch, "_ScreenGram")
    x, train = make_case(9, 500, 768, sigma, torch.uint8)
    check_against_reference(x, train, sigma, "cpu")
    assert screened


@pytest.mark.parametrize("cap", [1, 2, 5])
@pytest.mark.parametrize("sigma", [0.002, 0.5, 2.0])
def test_cpu_screening_candidate_overflow(monkeypatch, cap, sigma):
    """Tiny candidate lists force overflows: the rows go through a second screening pass (with
    their global lower bound), then through the streaming pass; the result must not change."""
    monkeypatch.setattr(ed_cpu, "screen_candidates", lambda batch: cap)
    x, train = make_case(7, 300, 512, sigma, torch.uint8)
    x = torch.cat([x, torch.randn(2, 512)])  # far queries: many candidates
    sigma64 = torch.full((9,), sigma, dtype=torch.float64)
    ref_out, ref_logz = empirical_denoise_ref(x, train, sigma)
    out, logz = ed_cpu.run(x, train, sigma64, tile_rows=64)
    assert row_rel_error(out, ref_out) <= REL_TOL
    assert logz_rel_error(logz, ref_logz) <= LOGZ_TOL


def test_cpu_bf16_screening_near_duplicates_and_ties():
    """Clustered training points (near-duplicates within the bf16 error band): many candidates,
    the screening gives way to fp32 or re-scores them all; near-ties resolved exactly."""
    gen = torch.Generator().manual_seed(5)
    base = torch.rand(20, 512, generator=gen, dtype=torch.float64) * 2 - 1
    train = base.repeat_interleave(25, 0) + 1e-3 * torch.randn(500, 512, generator=gen, dtype=torch.float64)
    train = train.float()
    x = (train[[0, 30, 260]].double() + 1e-3 * torch.randn(3, 512, generator=gen, dtype=torch.float64)).float()
    x = torch.cat([x, ((train[7] + train[8]) / 2)[None]])  # near-tie of two near-duplicates
    for sigma in (0.002, 0.01, 0.05):
        check_against_reference(x, train, sigma, "cpu")


def test_cpu_bf16_screening_gives_way_at_large_sigma(monkeypatch):
    screened = _spy_on(monkeypatch, "_ScreenGram")
    x, train = make_case(9, 500, 768, 80.0, torch.float32)
    sigma64 = torch.full((9,), 80.0, dtype=torch.float64)
    out_screen, logz_screen = ed_cpu.run(x, train, sigma64, tile_rows=100)
    out_plain, logz_plain = ed_cpu.run(x, train, sigma64, tile_rows=100, screen=False)
    assert screened
    torch.testing.assert_close(out_screen, out_plain, rtol=0, atol=0)  # every tile after the first: fp32
    ref_out, ref_logz = empirical_denoise_ref(x, train, 80.0)
    assert row_rel_error(out_screen, ref_out) <= REL_TOL


def test_cpu_tile_rows_keep_the_working_set_small():
    for batch, rows, dim, dtype in [
        (256, 10000, 3072, torch.float32),
        (64, 50000, 3072, torch.uint8),
        (1, 10, 5, torch.float32),
        (4096, 100000, 64, torch.float32),
    ]:
        for screen in (False, True):
            tile = ed_cpu.cpu_tile_rows(batch, rows, dim, dtype, screen)
            assert 1 <= tile <= rows
            assert tile == rows or tile >= 64
            assert batch * tile * 4 <= max(2 << 20, batch * 64 * 4)  # [B, T] weights
            if screen:
                assert tile * dim * 2 <= max(4 << 20, 64 * dim * 2)  # [T, D] bf16 buffer
            if dtype != torch.float32:
                assert tile * dim * 4 <= max(8 << 20, 64 * dim * 4)  # [T, D] fp32 decode buffer


@pytest.mark.slow
def test_cpu_never_materializes_batch_by_rows():
    """B=256, N=400000, D=8: [B, N] fp32 logits would take 410 MB; the run must stay far below."""
    script = textwrap.dedent("""
        import json, resource, torch
        from diffcore.ops import empirical_denoise
        train = torch.randint(0, 256, (400000, 8), dtype=torch.uint8)
        x = torch.randn(256, 8)
        empirical_denoise(x[:2], train[:100], 1.0, backend="cpu")  # warm up (loads _C)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = empirical_denoise(x, train, 1.0, backend="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"peak_growth_kb": after - before, "finite": bool(torch.isfinite(out).all())}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["finite"]
    assert report["peak_growth_kb"] < 100_000, report  # < 100 MB, vs 410 MB for [B, N] alone


def test_auto_backend_on_cpu_is_cpu():
    assert op_module.BACKENDS.resolve("auto", torch.device("cpu")) == "cpu"
    assert "cuda" not in op_module.BACKENDS.auto_order["cuda"]


def test_same_input_same_output():
    x, train = make_case(5, 200, 64, 0.7)
    first = empirical_denoise(x, train, 0.7, backend="cpu")
    second = empirical_denoise(x, train, 0.7, backend="cpu")
    assert torch.equal(first, second)


def test_not_differentiable_runs_without_graph():
    x, train = make_case(3, 30, 10, 0.5)
    x.requires_grad_(True)
    out = empirical_denoise(x, train, 0.5, backend="cpu")
    assert out.grad_fn is None and not out.requires_grad


# ------------------------------------------------------------------------------------------ errors
def _good():
    return torch.randn(3, 4, 5), torch.randn(7, 4, 5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_error_mismatched_trailing_shape(backend):
    x, _ = _good()
    with pytest.raises(ValueError, match="train: expected trailing shape"):
        empirical_denoise(x, torch.randn(7, 4, 6), 1.0, backend=backend)


def test_error_empty_train():
    x, _ = _good()
    with pytest.raises(ValueError, match="train: expected at least one training row"):
        empirical_denoise(x, torch.randn(0, 4, 5), 1.0)


@pytest.mark.parametrize(
    "sigma",
    [0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, float("nan"), 1.0])],
)
def test_error_bad_sigma(sigma):
    x, train = _good()
    with pytest.raises(ValueError, match="sigma"):
        empirical_denoise(x, train, sigma)


def test_error_sigma_wrong_shape():
    x, train = _good()
    with pytest.raises(ValueError, match="sigma: expected a scalar or shape"):
        empirical_denoise(x, train, torch.ones(4))


def test_error_sigma_on_another_device():
    x, train = _good()
    with pytest.raises(ValueError, match="sigma: expected a tensor on cpu"):
        empirical_denoise(x, train, torch.ones(3, device="meta"))


def test_zero_dim_sigma_tensor_is_a_scalar():
    x, train = _good()
    out = empirical_denoise(x, train, torch.tensor(0.7, dtype=torch.float64), backend="cpu")
    torch.testing.assert_close(out, empirical_denoise(x, train, 0.7, backend="cpu"), rtol=0, atol=0)


def test_error_nan_in_x():
    x, train = _good()
    x[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN"):
        empirical_denoise(x, train, 1.0)


def test_error_mixed_devices():
    x, train = _good()
    with pytest.raises(ValueError, match="one device"):
        empirical_denoise(x, train.to("meta"), 1.0)


@pytest.mark.parametrize("bad", ["x", "train"])
def test_error_unsupported_dtype(bad):
    x, train = _good()
    if bad == "x":
        x = x.to(torch.int32)
    else:
        train = train.to(torch.int16)
    with pytest.raises(TypeError, match=f"{bad}: expected dtype"):
        empirical_denoise(x, train, 1.0)


def test_error_float64_x_on_fast_backend():
    x, train = _good()
    with pytest.raises(TypeError, match="x: float64 is supported by backend 'reference' only"):
        empirical_denoise(x.double(), train, 1.0, backend="cpu")


def test_error_not_a_tensor():
    _, train = _good()
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        empirical_denoise([[1.0]], train, 1.0)


def test_error_cuda_backend_on_cpu_tensors():
    x, train = _good()
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"):
        empirical_denoise(x, train, 1.0, backend="cuda")


# ------------------------------------------------------------------------------------- GPU only
GPU_BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.cuda_ext),
    pytest.param("triton", marks=[pytest.mark.gpu, pytest.mark.triton]),
]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8], ids=["f32", "u8"])
@pytest.mark.parametrize("shape", [(5, 123, 123), (7, 300, 3072), (300, 1000, 64)])
def test_gpu_kernel_matches_reference(backend, sigma, train_dtype, shape):
    x, train = make_case(*shape, sigma, train_dtype)
    ref_out, ref_logz = empirical_denoise_ref(x, train, sigma)
    out, logz = empirical_denoise_with_logz(x.cuda(), train.cuda(), sigma, backend=backend)
    assert row_rel_error(out.cpu(), ref_out) <= REL_TOL
    assert logz_rel_error(logz.cpu(), ref_logz) <= LOGZ_TOL


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_triton_on_gpu_half_x(x_dtype):
    x, train = make_case(9, 200, 48, 0.5)
    x = x.to(x_dtype)
    ref_out, _ = empirical_denoise_ref(x, train, 0.5)
    out = empirical_denoise(x.cuda(), train.cuda(), 0.5, backend="triton")
    assert out.dtype == x_dtype
    assert row_rel_error(out.cpu(), ref_out) <= torch.finfo(x_dtype).eps


# ---------------------------------------------------------------------------------------------
# Both CPU screening precisions (DIFFCORE_CPU_SCREEN=bf16|fp32), whatever this machine would pick.


@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.0, 10.0, 80.0])
@pytest.mark.parametrize("train_dtype", [torch.uint8, torch.float32])
def test_cpu_forced_screening_precision(forced_screen, sigma, train_dtype):
    from diffcore import _cpu_caps

    assert _cpu_caps.screen_precision() == forced_screen
    x, train = make_case(6, 300, 768, sigma, train_dtype, seed=3)
    check_against_reference(x, train, sigma, "cpu")


def test_cpu_forced_screening_near_ties(forced_screen):
    """Near-duplicate training points and a query halfway between two of them, at sigma 0.002."""
    gen = torch.Generator().manual_seed(7)
    base = torch.rand(10, 512, generator=gen, dtype=torch.float64) * 2 - 1
    train = (base.repeat_interleave(20, 0) + 1e-3 * torch.randn(200, 512, generator=gen, dtype=torch.float64)).float()
    x = torch.stack([(train[3] + train[4]) / 2, train[100] + 1e-4, (train[0] + train[199]) / 2])
    for sigma in (0.002, 0.02):
        check_against_reference(x, train, sigma, "cpu")


def test_fp32_bounds_are_gamma_n():
    """The proven fp32 / fp64 coefficients are gamma_{D+1} (Higham Eq. 3.5); the measured fp32
    coefficient, used for dense tiles only, is far below it at image sizes."""
    dim = 3072
    pairs = ((ed_cpu.fp32_gemm_error_bound(dim), 2.0**-24), (ed_cpu.fp64_gemm_error_bound(dim), 2.0**-53))
    for bound, unit in pairs:
        nu = (dim + 1) * unit
        assert bound == pytest.approx(nu / (1 - nu), rel=1e-12)
    assert ed_cpu.measured_fp32_gemm_error_coefficient(dim) < ed_cpu.fp32_gemm_error_bound(dim) / 500
    with pytest.raises(ValueError, match="dim"):
        ed_cpu.gamma(2**24, 2.0**-24)


def test_dense_large_sigma_uses_the_measured_coefficient_only_after_the_proven_one(monkeypatch):
    """At sigma 80 (every pair carries weight) the proven fp32 bound would re-score too many pairs:
    the tile is then kept with the measured coefficient (a measured guarantee); at sigma 0.5 the
    proven bound is enough."""
    from diffcore._ext import extension

    real = extension()
    used = []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def empirical_denoise_tile_update(self, **kwargs):
            result = real.empirical_denoise_tile_update(**kwargs)
            if kwargs["g_dtype"] == "float32" and result[0] >= 0:
                used.append(kwargs["gemm_err_coef"])
            return result

    monkeypatch.setattr(ed_cpu, "extension", lambda: Spy())
    x, train = make_case(8, 400, 3072, 80.0, torch.float32, seed=4)
    out, _ = ed_cpu.run(x, train, torch.full((8,), 80.0, dtype=torch.float64), tile_rows=100, screen=False)
    assert set(used) == {ed_cpu.measured_fp32_gemm_error_coefficient(3072)}
    assert row_rel_error(out, empirical_denoise_ref(x, train, 80.0)[0]) <= REL_TOL  # the measured guarantee
    used.clear()
    x, train = make_case(8, 400, 3072, 0.5, torch.float32, seed=4)
    ed_cpu.run(x, train, torch.full((8,), 0.5, dtype=torch.float64), tile_rows=100, screen=False)
    assert set(used) == {ed_cpu.fp32_gemm_error_bound(3072)}


# ---------------------------------------------------------------- tiny sigma (issue 18, item 10)
@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
@pytest.mark.parametrize("sigma", [1e-155, 1e-300, 5e-324, torch.tensor([1.0, 1e-160, 1.0], dtype=torch.float64)])
def test_sigma_whose_square_underflows_is_refused(backend, sigma):
    x, train = _good()
    with pytest.raises(ValueError, match=r"sigma: expected values >= 1e-150"):
        empirical_denoise(x, train, sigma, backend=backend)


@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
def test_logits_beyond_float64(backend):
    """At sigma 1e-149 the absolute logits of distances ~1e10 leave the float64 range. The reference
    and the cpu backend (logits relative to the best row, as the reference) return the nearest
    training row (logz underflows to -inf); triton refuses, naming sigma, instead of returning NaN."""
    gen = torch.Generator().manual_seed(4)
    train, x = torch.randn(50, 300, generator=gen) * 1e4, torch.randn(2, 300, generator=gen) * 1e4
    if backend == "triton":
        with pytest.raises(ValueError, match="sigma: the weights could not be computed"):
            empirical_denoise(x, train, 1e-149, backend=backend)
        return
    out, logz = empirical_denoise_with_logz(x, train, 1e-149, backend=backend)
    nearest = ((x[:, None].double() - train[None].double()) ** 2).sum(-1).argmin(1)
    assert torch.equal(out, train[nearest]) and bool((logz == -math.inf).all())


@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
@pytest.mark.parametrize("sigma", [1e-8, 1e-30])
def test_midpoint_and_duplicate_at_tiny_sigma(backend, sigma):
    """The midpoint of two training rows is their mean at any sigma (an exact tie); with the first
    row duplicated, the weights are 2/3 and 1/3. Rows on a 2^-10 grid: the midpoint is exact in fp32."""
    gen = torch.Generator().manual_seed(6)
    y = torch.randint(-1024, 1024, (5, 64), generator=gen).float() / 1024
    y[2:] += 4.0  # far: rows 0 and 1 are the nearest
    x = ((y[0] + y[1]) / 2)[None]
    for train, expected in (
        (y, (y[0].double() + y[1].double()) / 2),
        (torch.cat([y[:1], y]), (2 * y[0].double() + y[1].double()) / 3),
    ):
        out = empirical_denoise(x, train, sigma, backend=backend)
        assert float((out[0].double() - expected).abs().max()) <= 1e-6, backend


# ------------------------------------------- exact ties at tiny sigma, huge values (issue 32)
def _permuted_ties(dim: int, train_dtype: torch.dtype):
    """Rows 0-2 are one row with its coordinates permuted: exactly equidistant from a constant x,
    but their float64 distance sums round differently (summed in another order); rows 3-4 far."""
    gen = torch.Generator().manual_seed(6)
    if train_dtype == torch.uint8:
        base = torch.randint(0, 256, (dim,), generator=gen, dtype=torch.uint8)
        far = torch.tensor([[0], [255]], dtype=torch.uint8).expand(2, dim)  # black and white: far
        x = torch.full((1, dim), 0.5 / 127.5)  # the value of pixel 127.5 (constant: permutations tie)
    else:
        base = torch.rand(dim, generator=gen) * 2 - 1
        far = torch.stack([torch.rand(dim, generator=gen) + 3, torch.rand(dim, generator=gen) - 4])
        x = torch.full((1, dim), 0.125)
    train = torch.cat([torch.stack([base, base.flip(0), base.roll(7)]), far])
    return x, train


@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8], ids=["f32", "u8"])
@pytest.mark.parametrize("sigma", [1e-30, 1e-8, 1e-6, 1e-4])
@pytest.mark.parametrize("dim", [64, 3072])
def test_cpu_exact_ties_summed_in_different_orders(dim, sigma, train_dtype):
    """Exact ties whose float64 distance sums differ (relative error 0.58 at sigma 1e-8 and 5% at
    1e-6 at D = 3072 before: the rounding of the sums, magnified by 1/(2 sigma^2), chose a winner)."""
    x, train = _permuted_ties(dim, train_dtype)
    values = train.double() / 127.5 - 1.0 if train_dtype == torch.uint8 else train.double()
    tied_mean = values[:3].mean(0, keepdim=True)  # the exact answer: the three tied rows weigh alike
    ref_out, _ = empirical_denoise_ref(x, train, sigma)
    assert row_rel_error(ref_out, tied_mean) <= 1e-12  # the reference too (it was off at 1e-30)
    out = empirical_denoise(x, train, sigma, backend="cpu")
    assert row_rel_error(out, tied_mean) <= REL_TOL


@pytest.mark.parametrize("dim", [64, 3072])
def test_cpu_exact_ties_with_forced_overflow_use_the_reference(monkeypatch, dim):
    """With candidate lists of one entry the three tied rows overflow both screening passes: the
    rows that need relative logits are then computed by the float64 reference, never streamed."""
    monkeypatch.setattr(ed_cpu, "screen_candidates", lambda batch: 1)
    x, train = _permuted_ties(dim, torch.float32)
    ref_out, ref_logz = empirical_denoise_ref(x, train, 1e-8)
    out, logz = ed_cpu.run(x, train, torch.full((1,), 1e-8, dtype=torch.float64))
    assert row_rel_error(out, ref_out) <= REL_TOL
    assert logz_rel_error(logz, ref_logz) <= LOGZ_TOL


@pytest.mark.parametrize("magnitude", [1e10, 1e15])
@pytest.mark.parametrize("sigma", [1.0, 1e6, 1e12])
@pytest.mark.parametrize("dim", [64, 3072])
def test_cpu_huge_values_up_to_the_limit_match_reference(magnitude, sigma, dim):
    """Queries of magnitude up to MAX_MAGNITUDE: the float64 rounding of |x|^2 + |y|^2 - 2 G is in
    the screening bound, and the logits are relative to the best row."""
    gen = torch.Generator().manual_seed(8)
    train = torch.rand(40, dim, generator=gen) * 2 - 1
    x = (torch.rand(3, dim, generator=gen) * 2 - 1) * magnitude
    ref_out, ref_logz = empirical_denoise_ref(x, train, sigma)
    out, logz = empirical_denoise_with_logz(x, train, sigma, backend="cpu")
    assert row_rel_error(out, ref_out) <= REL_TOL
    assert float(((logz.double() - ref_logz).abs() / ref_logz.abs().clamp_min(1.0)).max()) <= LOGZ_TOL


@pytest.mark.parametrize("backend", _params(ALL_BACKENDS))
@pytest.mark.parametrize("where", ["x", "train"])
@pytest.mark.parametrize("value", [2e15, 1e20, -3e38])
def test_values_above_1e15_are_refused(backend, where, value):
    """|x| near 1e20 gave a finite wrong result: values beyond MAX_MAGNITUDE are refused, naming
    the argument (as knn)."""
    x, train = _good()
    x, train = x.clone(), train.float().clone()
    (x if where == "x" else train).view(-1)[3] = value
    with pytest.raises(ValueError, match=rf"{where}: expected values of magnitude <= 1e\+15"):
        empirical_denoise(x, train, 1.0, backend=backend)


# ------------------------------------------- the one-call small path (digits sizes, issue 34)
@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8], ids=["f32", "u8"])
@pytest.mark.parametrize("sigma", [1e-5, 0.002, 0.05, 1.0, 3.0, 80.0, 1e4])
@pytest.mark.parametrize("batch,rows,dim", [(1, 1, 64), (7, 300, 64), (37, 1797, 64), (5, 120, 45), (9, 200, 256)])
def test_cpu_small_path_matches_reference(train_dtype, sigma, batch, rows, dim):
    """Rows of at most 256 values and training sets of at most 2^19 values take the one-call C++
    path (float64 Gram; fp32 where its bound holds; exact re-scoring where the bound is loose)."""
    assert ed_cpu.uses_small_path(rows, dim)
    x, train = make_case(batch, rows, dim, sigma, train_dtype, seed=batch + rows)
    check_against_reference(x, train, sigma, "cpu")


def test_cpu_small_path_per_row_sigma_and_far_queries():
    x, train = make_case(11, 500, 64, 1.0, torch.uint8, seed=3)
    x = torch.cat([x, torch.randn(3, 64) * 5])  # far from every training row
    sigma = torch.tensor(
        [0.003, 0.05, 0.5, 1.0, 2.0, 5.0, 80.0, 0.01, 0.2, 30.0, 1e3, 0.02, 1.0, 80.0], dtype=torch.float64
    )
    check_against_reference(x, train, sigma, "cpu")


def test_cpu_small_path_near_ties_and_duplicates():
    """Near-ties (distances equal up to 1e-6 relative) and exact duplicates at small sigma."""
    gen = torch.Generator().manual_seed(9)
    train = torch.rand(100, 64, generator=gen) * 2 - 1
    train[50] = train[10]  # a duplicate: weighs as much as its twin
    mid = (train[3] + train[4]) / 2
    x = torch.stack([mid, mid + 1e-6 * (train[3] - train[4]), train[10] + 0.001])
    for sigma in (0.002, 0.01, 0.05):
        check_against_reference(x, train, sigma, "cpu")


def test_cpu_small_path_agrees_with_the_tile_path_and_threads(monkeypatch):
    """Same result (to the tolerance) as the tile path, and bit-identical for 1 and 2 threads."""
    x, train = make_case(37, 1797, 64, 1.0, torch.float32, seed=2)
    sigma64 = torch.full((37,), 1.0, dtype=torch.float64)
    small_out, _ = ed_cpu.run(x, train, sigma64)
    tile_out, _ = ed_cpu.run(x, train, sigma64, small=False)
    assert row_rel_error(small_out, tile_out) <= 2 * REL_TOL
    one, two = small_path_on_one_and_two_threads(monkeypatch, x, train, sigma64)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_cpu_small_path_refuses_nan_and_huge_train():
    x, train = make_case(4, 100, 64, 1.0)
    for value, message in (
        (float("nan"), "train: contains NaN"),
        (float("inf"), "train: contains Inf"),
        (1e16, r"train: expected values of magnitude <= 1e\+15"),
    ):
        bad = train.clone()
        bad[7, 3] = value
        with pytest.raises(ValueError, match=message):
            empirical_denoise(x, bad, 1.0, backend="cpu")
