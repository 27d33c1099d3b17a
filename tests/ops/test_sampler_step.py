"""diffcore.ops.sampler_step: every backend against the float64 reference; coefficient formulas
against the textbook updates; NaN/Inf flag; bitwise determinism of the CPU kernel; errors."""

from __future__ import annotations

import pytest
import torch

from diffcore import _env
from diffcore.ops import _sampler_step
from diffcore.ops._sampler_step import NO_BAD_STEP, new_finite_flag, sampler_step, step_coefficients
from diffcore.ref import sampler_step as ref
from tests.helpers import cpu_backends

BACKENDS = cpu_backends(("reference", "cpu", "triton"))
SHAPES = [(5, 123, 123), (7, 3, 5), (1,), (3, 1001)]
DTYPES_OF = {
    "reference": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float16),  # no bf16 in the interpreter
}
ROWS = {  # (kind, row, uses extra, uses noise)
    "euler": ((0.7, 0.3, 0.0, 0.0), False, False),
    "heun": ((0.8, 0.45, -0.25, 0.0), True, False),
    "dpmpp_2m": ((0.6, 0.55, -0.15, 0.0), True, False),
    "ddim": ((0.5, 0.5, 0.0, 0.31), False, True),
    "churn": ((1.0, 0.0, 0.0, 1.7), False, True),
}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]


def _torch_in_dtype(x, d, e, z, row):
    """Plain PyTorch at the tensors' own dtype: the yardstick of the kernels' rounding error."""
    out = row[0] * x + row[1] * d
    if e is not None:
        out = out + row[2] * e
    if z is not None:
        out = out + row[3] * z
    return out


@pytest.mark.parametrize(
    "backend",
    [b for b in BACKENDS if b != "triton"]
    + [pytest.param("triton", marks=pytest.mark.triton)] * ("triton" in BACKENDS),
)
@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_float64_reference(backend, kind, shape):
    row, uses_extra, uses_noise = ROWS[kind]
    for dtype in DTYPES_OF[backend]:
        x, d, e, z = _inputs(shape, dtype)
        e = e if uses_extra else None
        z = z if uses_noise else None
        expected = ref.sampler_step_ref(x, d, row, e, z)
        got = sampler_step(kind, x, d, row, extra=e, noise=z, backend=backend)
        assert got.dtype == dtype and got.shape == x.shape
        plain_error = (_torch_in_dtype(x, d, e, z, row).double() - expected).abs().max().item()
        error = (got.double() - expected).abs().max().item()
        eps = torch.finfo(dtype).eps
        assert error <= 3 * plain_error + 4 * eps, (backend, kind, dtype, error, plain_error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_and_step_index(backend):
    sigmas = torch.tensor([80.0, 20.0, 3.0, 0.5, 0.0], dtype=torch.float64)
    table = step_coefficients("dpmpp_2m", sigmas)
    x, d, e, _ = _inputs((4, 33), torch.float32)
    for step in range(table.shape[0]):
        extra = e if table[step, 2] != 0 else None
        got = sampler_step("dpmpp_2m", x, d, table, step=step, extra=extra, backend=backend)
        expected = ref.sampler_step_ref(x, d, table[step], extra)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_may_alias_x(backend):
    x, d, e, _ = _inputs((3, 257), torch.float32)
    row = (0.9, 0.2, -0.1, 0.0)
    expected = sampler_step("heun", x, d, row, extra=e, backend=backend)
    got = sampler_step("heun", x, d, row, extra=e, out=x, backend=backend)
    assert got is x and torch.equal(x, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_finite_flag_records_the_step(backend, bad):
    x, d, _, _ = _inputs((2, 3, 50), torch.float32)
    flag = new_finite_flag("cpu")
    sampler_step("euler", x, d, (0.5, 0.5, 0, 0), step=0, finite_flag=flag, backend=backend)
    assert int(flag[0]) == NO_BAD_STEP
    d[1, 2, 7] = bad
    sampler_step("euler", x, d, (0.5, 0.5, 0, 0), step=6, finite_flag=flag, backend=backend)
    sampler_step("euler", x, d, (0.5, 0.5, 0, 0), step=9, finite_flag=flag, backend=backend)
    assert int(flag[0]) == 6  # the first bad step is kept


@pytest.mark.skipif("cpu" not in BACKENDS, reason="diffcore._C is not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_finite_check_covers_every_thread_block(threads):
    """Above the parallel threshold (32768 elements) the CPU step splits the tensor into one block
    per thread: a NaN at the start, at a block edge or in the last element is seen by each split."""
    n = 2 * (1 << 15) + 37
    x, d, _, _ = _inputs((n,), torch.float32, seed=2)
    with _env.torch_threads(threads):
        for position in (0, n // 2 - 1, n // 2, n // 3 + 5, n - 1):
            bad = d.clone()
            bad[position] = float("nan")
            flag = new_finite_flag("cpu")
            sampler_step("euler", x, bad, (0.5, 0.5, 0, 0), step=4, finite_flag=flag, backend="cpu")
            assert int(flag[0]) == 4, f"NaN at {position} of {n} missed with {threads} threads"


def test_coefficient_tables_match_textbook_updates():
    sigmas = [80.0, 41.3, 12.0, 2.5, 0.4, 0.03, 0.0]
    g = torch.Generator().manual_seed(3)
    x, d, e, z = (torch.randn(9, generator=g, dtype=torch.float64) for _ in range(4))
    for kind in ("euler", "heun", "dpmpp_2m", "ddim"):
        for eta in (0.0, 0.7, 1.0) if kind == "ddim" else (0.0,):
            table = step_coefficients(kind, sigmas, eta=eta)
            for i in range(len(sigmas) - 1):
                s, s_next = sigmas[i], sigmas[i + 1]
                prev = sigmas[i - 1] if i > 0 else None
                expected = ref.textbook_step(kind, x, d, s, s_next, extra=e, sigma_prev=prev, noise=z, eta=eta)
                got = ref.sampler_step_ref(x, d, table[i], e, z)
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"{kind} eta={eta} step {i}")
    churn = _sampler_step.churn_coefficients(2.0, 2.5, 1.007)
    torch.testing.assert_close(
        ref.sampler_step_ref(x, d, churn, None, z), ref.textbook_step("churn", x, d, 2.0, 2.5, noise=z, s_noise=1.007)
    )


def test_dpmpp_2m_first_and_last_steps_are_first_order():
    table = step_coefficients("dpmpp_2m", [10.0, 1.0, 0.1, 0.0])
    assert table[0, 2] == 0.0 and table[-1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert table[1, 2] != 0.0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="diffcore._C is not built")
def test_cpu_kernel_is_bitwise_deterministic_across_threads_and_sizes():
    n = 3 * (1 << 15) + 17  # several OpenMP chunks plus a tail
    x, d, e, z = _inputs((n,), torch.float32, seed=5)
    row = (0.8123, 0.2117, -0.0311, 0.137)
    results = []
    for t in (1, 2, 3):
        with _env.torch_threads(t):
            results.append(sampler_step("ddim", x, d, row, extra=e, noise=z, backend="cpu"))
    assert all(torch.equal(results[0], r) for r in results[1:])
    # element i does not depend on the tensor's length (no position-dependent vector/tail path)
    for length in (1, 7, 33, 1000):
        part = sampler_step("ddim", x[-length:], d[-length:], row, extra=e[-length:], noise=z[-length:], backend="cpu")
        assert torch.equal(part, results[0][-length:])


def test_autograd_gradients_and_jvp_are_the_coefficients():
    x, d, e, _ = (t.requires_grad_() for t in _inputs((3, 4), torch.float64))
    row = (0.7, 0.4, -0.1, 0.0)
    for backend in [b for b in BACKENDS if b != "triton"]:
        assert torch.autograd.gradcheck(
            lambda a, b, c, backend=backend: sampler_step("heun", a, b, row, extra=c, backend=backend), (x, d, e)
        )
    tangents = tuple(torch.randn_like(t) for t in (x, d, e))
    _, jvp = torch.func.jvp(
        lambda a, b, c: sampler_step("heun", a, b, row, extra=c, backend="reference"),
        (x.detach(), d.detach(), e.detach()),
        tangents,
    )
    torch.testing.assert_close(jvp, 0.7 * tangents[0] + 0.4 * tangents[1] - 0.1 * tangents[2])


def test_errors_name_the_argument():
    x, d, e, z = _inputs((2, 5), torch.float32)
    row = (0.5, 0.5, 0.0, 0.0)
    with pytest.raises(ValueError, match="kind"):
        sampler_step("rk4", x, d, row)
    with pytest.raises(ValueError, match="denoised"):
        sampler_step("euler", x, d[:1], row)
    with pytest.raises(TypeError, match="denoised"):
        sampler_step("euler", x, d.double(), row)
    with pytest.raises(ValueError, match="extra"):
        sampler_step("heun", x, d, (0.5, 0.5, 0.1, 0.0))
    with pytest.raises(ValueError, match="noise"):
        sampler_step("ddim", x, d, (0.5, 0.5, 0.0, 0.3))
    with pytest.raises(ValueError, match="step"):
        sampler_step("euler", x, d, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="step"):
        sampler_step("euler", x, d, torch.zeros(3, 4, dtype=torch.float64), step=3)
    with pytest.raises(ValueError, match="coefficients"):
        sampler_step("euler", x, d, torch.zeros(3, 5, dtype=torch.float64), step=0)
    with pytest.raises(ValueError, match="coefficients"):
        sampler_step("euler", x, d, (float("nan"), 0.5, 0.0, 0.0))
    with pytest.raises(ValueError, match="finite_flag"):
        sampler_step("euler", x, d, row, finite_flag=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="kind"):
        step_coefficients("churn", [1.0, 0.0])
    if "cpu" in BACKENDS:
        with pytest.raises(TypeError, match="backend 'cpu'"):
            sampler_step("euler", x.half(), d.half(), row, backend="cpu")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="diffcore._C is not built")
@pytest.mark.parametrize(
    ("bad", "message"),
    [({"c_extra": 0.5}, "extra"), ({"dtype": "float16", "numel": 2}, "dtype")],
    ids=["extra-without-pointer", "dtype"],
)
def test_extension_checks_again(bad, message):
    """The C ABI checks its arguments itself: a c_extra without an extra pointer, a dtype it lacks."""
    from diffcore._ext import extension

    x = torch.zeros(4)
    arguments = dict(
        dtype="float32",
        x=x.data_ptr(),
        denoised=x.data_ptr(),
        extra=0,
        noise=0,
        out=x.data_ptr(),
        numel=4,
        c_x=1.0,
        c_denoised=0.0,
        c_extra=0.0,
        c_noise=0.0,
        step=0,
        flag=0,
        threads=1,
    )
    with pytest.raises(ValueError, match=message):
        extension().sampler_step_cpu(**(arguments | bad))


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("kind", list(ROWS))
def test_cuda_kernel_matches_reference(kind):
    row, uses_extra, uses_noise = ROWS[kind]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x, d, e, z = (t.cuda() for t in _inputs((5, 123, 123), dtype))
        e, z = (e if uses_extra else None), (z if uses_noise else None)
        expected = ref.sampler_step_ref(x, d, row, e, z)
        flag = new_finite_flag("cuda")
        got = sampler_step(kind, x, d, row, extra=e, noise=z, backend="cuda", step=0, finite_flag=flag)
        plain = (_torch_in_dtype(x, d, e, z, row).double() - expected).abs().max().item()
        assert (got.double() - expected).abs().max().item() <= 3 * plain + 4 * torch.finfo(dtype).eps
        assert int(flag[0]) == NO_BAD_STEP
        d[0, 0, 0] = float("nan")
        sampler_step(kind, x, d, row, extra=e, noise=z, backend="cuda", step=4, finite_flag=flag)
        assert int(flag[0]) == 4


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("kind", list(ROWS))
def test_triton_on_gpu_matches_reference(kind):
    row, uses_extra, uses_noise = ROWS[kind]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, d, e, z = (t.cuda() for t in _inputs((5, 123, 123), dtype))
        e, z = (e if uses_extra else None), (z if uses_noise else None)
        expected = ref.sampler_step_ref(x, d, row, e, z)
        got = sampler_step(kind, x, d, row, extra=e, noise=z, backend="triton")
        plain = (_torch_in_dtype(x, d, e, z, row).double() - expected).abs().max().item()
        assert (got.double() - expected).abs().max().item() <= 3 * plain + 4 * torch.finfo(dtype).eps


def test_auto_uses_the_reference_for_dtypes_the_kernel_lacks():
    name, _ = _sampler_step.step_runner("auto", torch.device("cpu"), torch.float16)
    assert name == "reference"
    x, d, _, _ = _inputs((2, 9), torch.bfloat16)
    torch.testing.assert_close(sampler_step("euler", x, d, (0.5, 0.5, 0, 0)).float(), (0.5 * x + 0.5 * d).float())


@pytest.mark.skipif("cpu" not in BACKENDS, reason="diffcore._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_cpu_kernel_matches_the_keyword_entry(dtype):
    """``sampler_step_cpu_bind`` (the sampler's positional hot path) gives the bits, the return value
    and the flag of ``sampler_step_cpu``, across thread counts and with every optional operand."""
    from diffcore.ops import _sampler_step_cpu as cpu

    n = 3 * (1 << 15) + 17
    x, d, e, z = _inputs((n,), dtype, seed=7)
    d[n - 3] = float("inf")
    row = (0.8123, 0.2117, -0.0311, 0.137)
    for threads in (1, 2):
        with _env.torch_threads(threads):
            for extra, noise in ((None, None), (e, None), (None, z), (e, z)):
                used = (row[0], row[1], row[2] if extra is not None else 0.0, row[3] if noise is not None else 0.0)
                keyword, bound = torch.empty_like(x), torch.empty_like(x)
                keyword_flag, bound_flag = new_finite_flag("cpu"), new_finite_flag("cpu")
                cpu.run(x, d, extra, noise, keyword, used, 4, keyword_flag)
                kernel = cpu.bound_kernel(x, bound_flag)
                pointers = [0 if t is None else t.data_ptr() for t in (extra, noise)]
                bad = kernel(x.data_ptr(), d.data_ptr(), *pointers, bound.data_ptr(), *used, 4)
                assert bad > 0 and int(bound_flag) == int(keyword_flag) == 4
                assert torch.equal(bound, keyword)
                # the runner around it: True on NaN/Inf only when it checks (a flag was given)
                runner_out = torch.empty_like(x)
                assert cpu.bound_runner(x, new_finite_flag("cpu"))(x, d, extra, noise, runner_out, used, 2)
                assert not cpu.bound_runner(x, None)(x, d, extra, noise, runner_out, used, 2)
                assert torch.equal(runner_out, keyword)
    from diffcore._ext import extension

    with pytest.raises(ValueError, match="dtype"):
        extension().sampler_step_cpu_bind(dtype="float16", numel=4, flag=0, threads=1)
    with pytest.raises(ValueError, match="numel"):
        extension().sampler_step_cpu_bind(dtype="float32", numel=0, flag=0, threads=1)
    with pytest.raises(ValueError, match="extra"):
        cpu.bound_kernel(x, None)(x.data_ptr(), d.data_ptr(), 0, 0, x.data_ptr(), 1.0, 0.0, 0.5, 0.0, 0)
