"""diffcore.ops.knn: every backend against the float64 reference (exact indices, ties to the
lower index; distances to fp32 rounding), and errors naming the argument."""

from __future__ import annotations

import os

import pytest
import torch

from diffcore.ops import _knn, _knn_cpu, knn
from diffcore.ref.knn import knn_ref
from tests.helpers import cpu_backends

HAS_GPU = torch.cuda.is_available()
CPU_BACKENDS = cpu_backends()  # usable on CPU tensors here (Triton via the interpreter)


def _marks(backend):
    return [pytest.mark.triton] if backend == "triton" else []


BACKEND_PARAMS = [pytest.param(b, marks=_marks(b)) for b in CPU_BACKENDS]


def _uniform(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def _assert_matches_reference(queries, train, k, backend):
    d, i = knn(queries, train, k, backend=backend)
    d_ref, i_ref = knn_ref(queries, train, k)
    assert i.dtype == torch.int64 and i.shape == (queries.shape[0], k)
    expected_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    assert d.dtype == expected_dtype
    assert torch.equal(i.cpu(), i_ref.cpu()), f"indices differ from the reference ({backend})"
    # exact distances, rounded once to the output dtype
    assert torch.equal(d.cpu(), d_ref.cpu().to(expected_dtype)) or torch.allclose(
        d.double().cpu(), d_ref.cpu(), rtol=2 * torch.finfo(expected_dtype).eps, atol=0
    )


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_odd_shape_5x123(backend, k):
    queries, train = _uniform((5, 123), 0), _uniform((123, 123), 1)
    _assert_matches_reference(queries, train, k, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_image_dim_3072(backend, k):
    queries, train = _uniform((3, 3, 32, 32), 2), _uniform((301, 3, 32, 32), 3)
    if backend == "triton":  # the interpreter is slow: fewer rows
        train = train[:97]
    _assert_matches_reference(queries, train, k, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_uint8_train(backend):
    g = torch.Generator().manual_seed(4)
    train = torch.randint(0, 256, (77, 3, 5, 7), dtype=torch.uint8, generator=g)
    queries = _uniform((6, 3, 5, 7), 5)
    queries[:2] = train[[10, 40]].float() / 127.5 - 1  # some queries equal to training images
    _assert_matches_reference(queries, train, 3, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_exact_duplicates_break_ties_by_lower_index(backend):
    train = _uniform((60, 33), 6)
    train[41] = train[7]
    train[52] = train[7]
    train[30] = train[12]
    queries = torch.stack([train[7], train[12] + 1e-3, _uniform((33,), 7)])
    d, i = knn(queries, train, 4, backend=backend)
    assert i[0, :3].tolist() == [7, 41, 52]
    assert d[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert i[1, :2].tolist() == [12, 30]
    _assert_matches_reference(queries, train, 4, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_queries_equal_to_training_rows_have_distance_zero(backend):
    train = _uniform((90, 50), 8)
    queries = train[[3, 89, 0]].clone()
    d, i = knn(queries, train, 2, backend=backend)
    assert i[:, 0].tolist() == [3, 89, 0]
    assert torch.all(d[:, 0] == 0)
    _assert_matches_reference(queries, train, 2, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_float64_and_half_queries(backend):
    train = _uniform((70, 20), 9).double()
    queries = _uniform((4, 20), 10).double()
    _assert_matches_reference(queries, train, 3, backend)
    _assert_matches_reference(queries.half(), train.half(), 3, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_near_ties_and_large_offsets(backend):
    """Rows whose distances differ far below the screening bound: only exact re-scoring separates them."""
    base = _uniform((1, 64), 11) * 100  # large norms make |q|^2 + |y|^2 - 2 q.y cancellation severe
    train = base.repeat(40, 1)
    train[torch.arange(40), torch.arange(40) % 64] += torch.linspace(1e-3, 2e-3, 40)
    queries = base + 1e-4
    _assert_matches_reference(queries, train, 5, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_uint8_gray_images_and_small_queries(backend):
    """Training images near mid-gray (values near 0 after mapping) and queries near 0: the uint8
    mapping's absolute rounding dominates any relative bound."""
    g = torch.Generator().manual_seed(16)
    train = torch.randint(126, 130, (80, 48), dtype=torch.uint8, generator=g)
    train[50] = train[20]
    queries = torch.randn(5, 48, generator=g) * 1e-3
    queries[0] = train[20].float() / 127.5 - 1
    _assert_matches_reference(queries, train, 4, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("as_uint8", [False, True])
def test_digits(backend, as_uint8):
    """Real images (the embedded 8x8 digits): queries are training images and noisy copies."""
    from diffcore.data.digits import load_digits

    train = load_digits(as_uint8=as_uint8)[0]
    images = load_digits()[0]
    step = 9
    if backend == "triton":  # the interpreter is slow: fewer images
        train, step = train[:400], 60
    queries = torch.cat([images[::step], images[5::step] + 0.1 * _uniform(images[5::step].shape, 18)])
    _assert_matches_reference(queries, train, 5, backend)


@pytest.mark.slow
@pytest.mark.parametrize("train_kind", ["float32", "uint8"])
def test_cpu_randomized_against_reference(train_kind):
    """Many queries, clustered data (many near neighbours): indices equal the reference."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    g = torch.Generator().manual_seed(17)
    centers = torch.rand(8, 256, generator=g) * 2 - 1
    train = centers[torch.randint(0, 8, (2500,), generator=g)] + 0.05 * torch.randn(2500, 256, generator=g)
    train = train.clamp(-1, 1)
    if train_kind == "uint8":
        train = ((train + 1) * 127.5).round().to(torch.uint8)
    queries = centers[torch.randint(0, 8, (64,), generator=g)] + 0.05 * torch.randn(64, 256, generator=g)
    _assert_matches_reference(queries, train, 5, "cpu")


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with pytest.raises(RuntimeError, match="cuda"):
        knn(torch.zeros(2, 4), torch.zeros(5, 4), backend="cuda")


def test_cpu_streams_over_many_tiles(monkeypatch):
    """Several training tiles and query blocks: the top-k merge across tiles."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    monkeypatch.setattr(_knn_cpu, "CPU_TILE_ELEMENTS", 64 * 300)  # 256-row tiles (the minimum)
    monkeypatch.setattr(_knn_cpu, "CPU_GRAM_ELEMENTS", 256 * 7)  # 7-query blocks
    train = _uniform((1500, 300), 12)
    queries = torch.cat([_uniform((15, 300), 13), train[[5, 700, 1499]] + 1e-3])
    _assert_matches_reference(queries, train, 3, "cpu")
    _assert_matches_reference(queries, train[:700], 300, "cpu")  # k larger than a tile


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_non_contiguous_inputs(backend):
    wide = _uniform((2 * 50, 2 * 40), 19)
    train = wide[::2, ::2]  # strided view [50, 40]
    queries = _uniform((40, 3), 20).t()  # transposed view [3, 40]
    assert not train.is_contiguous() and not queries.is_contiguous()
    _assert_matches_reference(queries, train, 2, backend)


def test_cpu_screening_keeps_few_candidates():
    """The bf16 screen must discard almost everything on random data (else it is no screen)."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    queries, train = _uniform((20, 768), 14), _uniform((3000, 768), 15)
    stats = {}
    _knn_cpu.run(queries, train, 2, stats=stats)
    assert 2 * 20 <= stats["rescored"] < 0.1 * 20 * 3000


@pytest.mark.triton
def test_triton_screening_keeps_few_candidates():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton is not usable on CPU tensors here")
    from diffcore.kernels.knn import knn_triton

    queries, train = _uniform((16, 256), 14), _uniform((600, 256), 15)
    stats = {}
    knn_triton(queries, train, 2, stats=stats)
    assert 2 * 16 <= stats["rescored"] < 0.1 * 16 * 600


def test_bf16_matmul_contract_probe():
    """The CPU backend's bound assumes fp32 accumulation in torch's bf16 matmul; the probe must hold
    here and must catch a bf16 accumulation."""
    assert _knn_cpu.bf16_matmul_accumulates_in_fp32()
    signs = torch.ones(4096)
    signs[2048:] = -1
    partial = torch.zeros((), dtype=torch.bfloat16)
    for value in signs.bfloat16():  # what a bf16 accumulator would return: far off the exact 0
        partial = partial + value
    assert abs(float(partial)) > 100


@pytest.mark.parametrize("case", ["uniform", "near", "offset", "uint8"])
def test_cpu_screening_bound_holds_without_safety_factor(case):
    """The error bound of csrc/knn/knn.cpp (input rounding by Cauchy-Schwarz on the measured
    rounding norms, fp32 accumulation, bf16 output rounding) holds for torch's bf16 matmul even
    without the safety factor, on the data shapes the tests and benchmarks use."""
    g = torch.Generator().manual_seed(21)
    dim = 3072
    train = torch.rand(400, dim, generator=g) * 2 - 1
    queries = torch.rand(48, dim, generator=g) * 2 - 1
    if case == "near":
        queries = train[:48] + 0.01 * torch.randn(48, dim, generator=g)
    elif case == "offset":
        base = torch.randn(1, dim, generator=g) * 100
        queries, train = base + torch.randn(48, dim, generator=g), base + torch.randn(400, dim, generator=g)
    elif case == "uint8":
        train = torch.randint(0, 256, (400, dim), generator=g).double().div(127.5).sub(1).float()
    q_round, y_round = queries.bfloat16(), train.bfloat16()
    exact = queries.double() @ train.double().t()
    screened = (q_round @ y_round.t()).double()
    dq = (queries.double() - q_round.double()).norm(dim=1)[:, None]
    dy = (train.double() - y_round.double()).norm(dim=1)[None, :]
    nq, ny = q_round.double().norm(dim=1)[:, None], y_round.double().norm(dim=1)[None, :]
    gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
    bound = nq * dy + dq * ny + dq * dy + gamma * nq * ny + 2.0**-8 * screened.abs()
    assert bool(((screened - exact).abs() <= bound).all())


def test_auto_on_cpu_picks_cpu_kernel():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    assert _knn.BACKENDS.resolve("auto", torch.device("cpu")) == "cpu"
    assert "cuda" not in _knn.BACKENDS.auto_order["cuda"]


@pytest.mark.triton
def test_triton_rejects_large_k():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton is not usable on CPU tensors here")
    with pytest.raises(ValueError, match="k"):
        knn(_uniform((2, 8), 0), _uniform((40, 8), 1), 17, backend="triton")


# ---------------------------------------------------------------------------------------------
# CUDA (never run on a GPU yet: these run in the GPU check script)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("k", [1, 2, 5])
def test_cuda_kernel_matches_reference(k):
    queries = _uniform((37, 3, 32, 32), 20).cuda()
    train = _uniform((1203, 3, 32, 32), 21).cuda()
    train[700] = train[5]
    queries[0] = train[5]
    _assert_matches_reference(queries, train, k, "cuda")
    g = torch.Generator().manual_seed(22)
    train8 = torch.randint(0, 256, (5000, 123), dtype=torch.uint8, generator=g).cuda()
    _assert_matches_reference(_uniform((9, 123), 23).cuda(), train8, k, "cuda")


@pytest.mark.gpu
@pytest.mark.triton
def test_triton_on_gpu_matches_reference():
    queries, train = _uniform((33, 3072), 24).cuda(), _uniform((2001, 3072), 25).cuda()
    _assert_matches_reference(queries, train, 2, "triton")


# ---------------------------------------------------------------------------------------------
# Errors name the argument


def test_error_mismatched_trailing_shapes():
    with pytest.raises(ValueError, match="train"):
        knn(torch.zeros(2, 3, 4), torch.zeros(5, 4, 3))


def test_error_empty_train():
    with pytest.raises(ValueError, match="train"):
        knn(torch.zeros(2, 4), torch.zeros(0, 4))


@pytest.mark.parametrize("k", [0, -1, 6, 2.0, True])
def test_error_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        knn(torch.zeros(2, 4), torch.zeros(5, 4), k)


def test_error_nan_in_queries():
    q = torch.zeros(2, 4)
    q[1, 2] = float("nan")
    with pytest.raises(ValueError, match="queries.*NaN"):
        knn(q, torch.zeros(5, 4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_error_nan_in_train(backend):
    y = torch.zeros(5, 4)
    y[3, 1] = float("inf")
    with pytest.raises(ValueError, match="train"):
        knn(torch.zeros(2, 4), y, backend=backend)


def test_error_bad_dtypes():
    with pytest.raises(TypeError, match="queries"):
        knn(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(5, 4))
    with pytest.raises(TypeError, match="train"):
        knn(torch.zeros(2, 4), torch.zeros(5, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="train"):
        knn(torch.zeros(2, 4), torch.zeros(5, 4, dtype=torch.int64))


def test_error_not_a_tensor():
    with pytest.raises(TypeError, match="queries"):
        knn([[0.0, 1.0]], torch.zeros(5, 2))


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU for a second device")
def test_error_mixed_devices():
    with pytest.raises(ValueError, match="queries.*train|device"):
        knn(torch.zeros(2, 4).cuda(), torch.zeros(5, 4))


def test_error_mixed_devices_meta():
    """A second device without a GPU: the meta device."""
    with pytest.raises(ValueError, match="device"):
        knn(torch.zeros(2, 4), torch.zeros(5, 4, device="meta"))


def test_error_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        knn(torch.zeros(2, 4), torch.zeros(5, 4), backend="fortran")


# ---------------------------------------------------------------------------------------------
# Every CPU screening precision (DIFFCORE_CPU_SCREEN=int8|bf16|fp32), whatever this machine would pick.


def _hard_cases():
    return [
        lambda b: test_near_ties_and_large_offsets(b),
        lambda b: test_exact_duplicates_break_ties_by_lower_index(b),
        lambda b: test_uint8_train(b),
        lambda b: test_uint8_gray_images_and_small_queries(b),
        lambda b: test_float64_and_half_queries(b),
        lambda b: test_image_dim_3072(b, 2),
        lambda b: test_digits(b, True),
    ]


@pytest.mark.parametrize(
    "case", range(7), ids=["near_ties", "duplicates", "uint8", "uint8_gray", "float64_half", "dim3072", "digits_uint8"]
)
def test_cpu_forced_screening_precision(forced_knn_screen, case):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    from diffcore import _cpu_caps

    assert _cpu_caps.knn_screen_precision() == forced_knn_screen
    _hard_cases()[case]("cpu")


def test_cpu_fp32_screen_rescores_no_more_than_bf16_and_int8_few():
    """The proven fp32 bound is tighter than the bf16 one: fewer rows survive the screening; the
    int8 screen's bound (input rounding only) keeps the survivors to a few percent."""
    queries, train = _uniform((40, 3072), 30), _uniform((600, 3072), 31)
    counts = {}
    for precision in ("int8", "bf16", "fp32"):
        stats = {}
        d2, idx = _knn_cpu.run(queries, train, 2, stats=stats, precision=precision)
        assert stats["precision"] == precision
        assert torch.equal(idx, knn_ref(queries, train, 2)[1])
        counts[precision] = stats["rescored"]
    assert 2 * 40 <= counts["fp32"] <= counts["bf16"]
    assert counts["int8"] <= 0.05 * 40 * 600


@pytest.mark.parametrize("dim", [1, 2, 15, 16, 17, 64])
def test_cpu_int8_screen_short_rows(dim):
    """Rows shorter than INT8_MIN_DIM screen in floating point (torch._int_mm gave zeros at dim 1);
    from INT8_MIN_DIM on, int8; exact either way."""
    queries, train = _uniform((9, dim), 40 + dim), _uniform((300, dim), 41)
    stats = {}
    d2, idx = _knn_cpu.run(queries, train, 3, stats=stats, precision="int8")
    assert stats["precision"] == ("int8" if dim >= _knn_cpu.INT8_MIN_DIM else _knn_cpu.screen_choice().precision)
    assert torch.equal(idx, knn_ref(queries, train, 3)[1])


def test_int8_probe_finds_the_levels_here_and_catches_saturation():
    """The probe gives the levels at which torch's int8 GEMM is exact on this machine, and that
    GEMM is exact at those levels on tile-sized random products with extremes mixed in."""
    from diffcore import _cpu_caps

    levels = _cpu_caps.int8_gemm_levels()
    if levels is None:
        pytest.skip("torch's int8 GEMM is not exact here: knn screens in floating point")
    assert levels in _cpu_caps.INT8_LEVELS
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (300, 3072), generator=g, dtype=torch.int8)
    b = torch.randint(-levels, levels + 1, (700, 3072), generator=g, dtype=torch.int8)
    a[:3], b[:3] = 127, levels  # the largest pair sums
    assert torch.equal(torch._int_mm(a, b.t()).double(), a.double() @ b.double().t())


@pytest.mark.slow
def test_int8_screen_under_avx2_caps():
    """The AVX2 int8 path (7-bit training rows, where oneDNN's kernel saturates 8-bit pairs),
    reproduced with the instruction-set caps in a fresh process: the probe picks levels at which
    the GEMM is exact and knn stays exact on near-ties and uint8 data."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from diffcore import _cpu_caps\n"
        "from diffcore.ops import _knn_cpu\n"
        "from diffcore.ref.knn import knn_ref\n"
        "levels = _cpu_caps.int8_gemm_levels()\n"
        "print('levels', levels)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "base = torch.rand(1, 3072, generator=g) * 2 - 1\n"
        "train = base + 1e-3 * torch.randn(400, 3072, generator=g)\n"
        "queries = base + 1e-3 * torch.randn(20, 3072, generator=g)\n"
        "u8 = torch.randint(0, 256, (300, 3072), generator=g, dtype=torch.uint8)\n"
        "for y in (train, u8):\n"
        "    stats = {}\n"
        "    idx = _knn_cpu.run(queries, y.contiguous(), 3, stats=stats, precision='int8' if levels else None)[1]\n"
        "    assert torch.equal(idx, knn_ref(queries, y, 3)[1]), stats\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2")
    env.pop("DIFFCORE_CPU_SCREEN", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if "levels None" in done.stdout:
        pytest.skip("torch's int8 GEMM is not exact under the AVX2 caps here (knn screens in floating point)")
    assert "ok" in done.stdout, done.stdout


@pytest.mark.parametrize("case", ["cancellation", "offset", "uint8"])
def test_fp32_screening_bound_is_worst_case(case):
    """The fp32 screening bound gamma_D |q||y| (any summation order) holds for torch's fp32 GEMM,
    also where cancellation is severe (large common offset)."""
    g = torch.Generator().manual_seed(22)
    dim = 3072
    queries, train = torch.rand(32, dim, generator=g) * 2 - 1, torch.rand(300, dim, generator=g) * 2 - 1
    if case == "cancellation":
        signs = torch.ones(dim)
        signs[dim // 2 :] = -1
        queries, train = queries * 1e-3 + signs * 100, train * 1e-3 + 100
    elif case == "offset":
        base = torch.randn(1, dim, generator=g) * 100
        queries, train = base + torch.randn(32, dim, generator=g), base + torch.randn(300, dim, generator=g)
    elif case == "uint8":
        train = torch.randint(0, 256, (300, dim), generator=g).double().div(127.5).sub(1).float()
    exact = queries.double() @ train.double().t()
    got = (queries @ train.t()).double()
    gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
    bound = gamma * queries.double().norm(dim=1)[:, None] * train.double().norm(dim=1)[None, :]
    assert bool(((got - exact).abs() <= bound).all())


def test_invalid_screen_variable_is_an_error_naming_it(monkeypatch):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    from diffcore import _cpu_caps

    monkeypatch.setenv("DIFFCORE_CPU_SCREEN", "int4")
    _cpu_caps.screen_choice.cache_clear()
    try:
        with pytest.raises(ValueError, match="DIFFCORE_CPU_SCREEN"):
            knn(_uniform((2, 8), 1), _uniform((5, 8), 2), 1, backend="cpu")
    finally:
        _cpu_caps.screen_choice.cache_clear()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_values_above_1e15_are_refused_on_every_backend(backend):
    q = torch.zeros(2, 4, dtype=torch.float64)
    y = torch.zeros(3, 4, dtype=torch.float64)
    y[1, 2] = 1e16
    with pytest.raises((ValueError, RuntimeError), match="train.*(1e\\+?15|magnitude)"):
        knn(q, y, k=1, backend=backend)
    q[0, 0] = -1e16
    with pytest.raises(ValueError, match="queries: expected values of magnitude <= 1e\\+15"):
        knn(q, torch.zeros(3, 4, dtype=torch.float64), k=1, backend=backend)


@pytest.mark.parametrize("precision", ["int8", "bf16", "fp32"])
def test_cpu_all_pairs_prepares_rows_once_and_matches_reference(precision, monkeypatch):
    """knn(train, train) (every study's all-pairs case) reuses the queries' screening rows for the
    training set (int8: when both get the same levels); exact against the float64 reference, ties
    (duplicated rows, lower index first) included, and the same result as with a copy of the
    queries (rows prepared twice)."""
    from diffcore import _cpu_caps

    train = _uniform((300, 64), 50)
    train[7] = train[3]  # an exact tie: rows 3 and 7 are each other's zero-distance neighbours
    train[150:160] = torch.round(train[150:160] * 4) / 4  # coarse rows: more near-ties
    if precision == "bf16" and not _cpu_caps.bf16_matmul_accumulates_in_fp32():
        pytest.skip("torch's bf16 matmul does not accumulate in fp32 here (the bf16 screen refuses)")
    if precision == "int8" and _cpu_caps.int8_gemm_levels() is None:
        pytest.skip("torch's int8 GEMM is not exact here (the int8 screen refuses)")
    d2, idx = _knn_cpu.run(train, train, 3, precision=precision)
    d2_copy, idx_copy = _knn_cpu.run(train.clone(), train, 3, precision=precision)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: query blocks whose Gram block stays in cache (here 32 queries)
    monkeypatch.setattr(_knn_cpu, "CPU_GRAM_CACHE_BYTES", 300 * 4 * 32)
    try:
        d2_one, idx_one = _knn_cpu.run(train, train, 3, precision=precision)
    finally:
        torch.set_num_threads(threads)
    d_ref, i_ref = knn_ref(train, train, 3)
    assert torch.equal(idx, i_ref) and torch.equal(idx, idx_copy) and torch.equal(d2, d2_copy)
    assert torch.equal(idx, idx_one) and torch.equal(d2, d2_one)
    assert torch.equal(d2, d_ref.square()) or torch.allclose(d2, d_ref.square(), rtol=4e-16, atol=0)
    assert idx[3, :2].tolist() == [3, 7] and idx[7, :2].tolist() == [3, 7]


@pytest.mark.parametrize("precision", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("k", [2, 5, 40])
def test_cpu_float_bounds_small_problem_against_reference(precision, k):
    """The float lower bounds and the selection of the k smallest (k above the 32-row bound block
    too) on a small problem that takes the single-thread path: ties, duplicated training rows,
    coarse rows (near-ties), odd D, uint8 training rows; exact against the float64 reference and
    the same result with one and two torch threads (the thread count is restored)."""
    from diffcore import _cpu_caps

    if precision == "bf16" and not _cpu_caps.bf16_matmul_accumulates_in_fp32():
        pytest.skip("torch's bf16 matmul does not accumulate in fp32 here (the bf16 screen refuses)")
    if precision == "int8" and _cpu_caps.int8_gemm_levels() is None:
        pytest.skip("torch's int8 GEMM is not exact here (the int8 screen refuses)")
    g = torch.Generator().manual_seed(60 + k)
    train = _uniform((333, 67), 61)
    train[100] = train[4]
    train[200] = train[4]  # three equal rows: the lower index first
    train[150:190] = torch.round(train[150:190] * 3) / 3  # coarse rows: many near-ties
    u8 = torch.randint(0, 256, (250, 67), dtype=torch.uint8, generator=g)
    u8[90] = u8[17]
    cases = [(train, train), (torch.cat([train[::7], train[150:160] + 1e-4]), train)]
    cases.append((torch.cat([u8[::9].float() / 127.5 - 1, _uniform((5, 67), 62)]), u8))
    threads = torch.get_num_threads()
    for queries, rows in cases:
        d_ref, i_ref = knn_ref(queries, rows, k)
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            try:
                results.append(_knn_cpu.run(queries, rows, k, precision=precision))
                assert torch.get_num_threads() == count
            finally:
                torch.set_num_threads(threads)
        for d2, idx in results:
            assert torch.equal(idx, i_ref)
            assert torch.allclose(d2, d_ref.square(), rtol=1e-14, atol=0)  # summation order only
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_cpu_double_bounds_where_float_terms_could_overflow():
    """Rows whose float bound terms could overflow (|x| near 1e15 with D = 200000: the fp32 screen,
    C_q + C_j = 1.01 |q|^2 + 3.1 |q~|^2 + the same of the row above 1e36, csrc/knn/knn.cpp) take
    the double bounds: still exact, ties included."""
    g = torch.Generator().manual_seed(70)
    dim = 200000

    def rows(count):
        signs = torch.where(torch.rand(count, dim, generator=g) < 0.5, -1.0, 1.0)
        return signs * 1e15 * (1 - 0.01 * torch.rand(count, dim, generator=g))

    train = rows(6)
    train[4] = train[1]
    queries = torch.cat([train[1:2] * (1 - 1e-6), train[3:4], rows(1)])
    norms = torch.cat([queries, train]).double().square().sum(dim=1)
    assert 2 * 4.11 * float(norms.min()) > 1e36  # every pair takes the double bounds
    d2, idx = _knn_cpu.run(queries, train, 3)
    d_ref, i_ref = knn_ref(queries, train, 3)
    assert torch.equal(idx, i_ref) and idx[0, :2].tolist() == [1, 4]
    assert torch.allclose(d2, d_ref.square(), rtol=1e-12, atol=0)  # double sums over 200000 terms, any order


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_cpu_float_bounds_at_small_and_large_scales(scale):
    """The float bounds' margin is relative (plus 2^-20 of the bound's 1e-12 absolute term), so rows
    of small or large magnitude are screened as well as rows in [-1, 1]: exact, and few rows
    re-scored."""
    queries, train = _uniform((40, 64), 80) * scale, _uniform((2000, 64), 81) * scale
    train[1500] = train[20]  # a tie
    queries[0] = train[20]
    stats = {}
    d2, idx = _knn_cpu.run(queries, train, 3, stats=stats)
    d_ref, i_ref = knn_ref(queries, train, 3)
    assert torch.equal(idx, i_ref) and idx[0, :2].tolist() == [20, 1500]
    assert torch.allclose(d2, d_ref.square(), rtol=1e-14, atol=0)
    assert stats["rescored"] < 0.05 * 40 * 2000
