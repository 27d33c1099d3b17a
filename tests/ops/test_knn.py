"""diffcore.ops.knn: every backend against the float64 reference (exact indices, ties to the
lower index; distances to fp32 rounding), and errors naming the argument."""
from __future__ import annotations

import importlib

import pytest
import torch

from diffcore import _backend
from diffcore.ops.knn import knn
from diffcore.ref.knn import knn_ref

HAS_GPU = torch.cuda.is_available()
# backends usable on CPU tensors here (as tests/conftest.py's cpu_backends; Triton via the interpreter)
CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.why_unusable(b, torch.device("cpu")) is None]


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
        d.double().cpu(), d_ref.cpu(), rtol=2 * torch.finfo(expected_dtype).eps, atol=0)


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
    knn_module = importlib.import_module("diffcore.ops.knn")

    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    monkeypatch.setattr(knn_module, "CPU_TILE_ELEMENTS", 64 * 300)  # 256-row tiles (the minimum)
    monkeypatch.setattr(knn_module, "CPU_GRAM_ELEMENTS", 256 * 7)  # 7-query blocks
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
    from diffcore.ops.knn import _knn_cpu

    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    queries, train = _uniform((20, 768), 14), _uniform((3000, 768), 15)
    stats = {}
    _knn_cpu(queries, train, 2, stats=stats)
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
    from diffcore.ops.knn import bf16_matmul_accumulates_in_fp32

    assert bf16_matmul_accumulates_in_fp32()
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
    gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
    bound = nq * dy + dq * ny + dq * dy + gamma * nq * ny + 2.0 ** -8 * screened.abs()
    assert bool(((screened - exact).abs() <= bound).all())


def test_auto_on_cpu_picks_cpu_kernel():
    from diffcore.ops.knn import BACKENDS

    if "cpu" not in CPU_BACKENDS:
        pytest.skip("diffcore._C is not built")
    assert BACKENDS.resolve("auto", torch.device("cpu")) == "cpu"
    assert "cuda" not in BACKENDS.auto_order["cuda"]


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
