"""diffcore.ops.attention against the float64 reference: forward, backward and JVP on every
backend usable here, torch.func transforms through the autograd Function, and input errors.

Tolerances (flash-attention style; docs/design.md, Numerics): a backend's error against the float64 reference is
at most ``RATIO`` times the error of plain PyTorch (``attention_math``) at the same dtype, plus a
floor of a few ulps of the result's scale for fp32 where plain PyTorch happens to be exact.
"""

from __future__ import annotations

import pytest
import torch

import diffcore
from diffcore.ops import _attention, _attention_cpu
from diffcore.ref.attention import attention_jvp_ref, attention_math, attention_ref, attention_vjp_ref
from tests.helpers import cpu_backends

RATIO = 3.0
FLOOR_ULPS = 16

BACKENDS = cpu_backends(("reference", "cpu", "triton"))
# small, odd shapes: (B, H, Lq, Lk, Dh); the interpreter is slow, so Triton gets few of them
SHAPES = [(1, 2, 37, 37, 32), (2, 1, 16, 16, 96), (1, 1, 50, 23, 40)]
TRITON_SHAPES = [(1, 2, 37, 37, 32), (1, 1, 21, 33, 96)]


def _params(backends):
    out = []
    for b in backends:
        marks = [pytest.mark.triton] if b == "triton" else []
        for shape in TRITON_SHAPES if b == "triton" else SHAPES:
            out.append(pytest.param(b, shape, marks=marks, id=f"{b}-{'x'.join(map(str, shape))}"))
    return out


def _inputs(shape, dtype, seed=0, tangents=False):
    b, h, lq, lk, d = shape
    g = torch.Generator().manual_seed(seed)
    sizes = [(b, h, lq, d), (b, h, lk, d), (b, h, lk, d)] * (2 if tangents else 1)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in sizes]


def _err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def _tol(math_err: float, ref: torch.Tensor, dtype: torch.dtype) -> float:
    floor = FLOOR_ULPS * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)
    return RATIO * math_err + floor


def _math_jvp(q, k, v, tq, tk, tv):
    return torch.func.jvp(attention_math, (q, k, v), (tq, tk, tv))


def _math_vjp(q, k, v, d_o):
    _, pull = torch.func.vjp(attention_math, q, k, v)
    return pull(d_o)


def _dtypes_for(backend):
    """Triton: the interpreter has fp32 and fp16; cpu: fp32, and fp16/bf16 computed in fp32."""
    return {"triton": [torch.float32, torch.float16], "cpu": [torch.float32, torch.float16, torch.bfloat16]}.get(
        backend, [torch.float32]
    )


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("backend,shape", _params(BACKENDS))
def test_forward_matches_reference(backend, shape):
    for dtype in _dtypes_for(backend):
        q, k, v = _inputs(shape, torch.float64)
        ref = attention_ref(q, k, v)
        ql, kl, vl = (t.to(dtype) for t in (q, k, v))
        out = diffcore.ops.attention(ql, kl, vl, backend=backend)
        assert out.dtype == dtype and out.shape == ref.shape
        tol = _tol(_err(attention_math(ql, kl, vl), ref), ref, dtype)
        assert _err(out, ref) <= tol, (dtype, _err(out, ref), tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_forward_float64_is_exact(backend):
    q, k, v = _inputs((2, 3, 29, 31, 24), torch.float64)
    out = diffcore.ops.attention(q, k, v, scale=0.3, backend=backend)
    assert out.dtype == torch.float64
    assert _err(out, attention_ref(q, k, v, 0.3)) < 1e-12


def test_large_logits_are_stable():
    """Scores of +-1e4 (an fp32 exp would overflow without the running max)."""
    q, k, v = _inputs((1, 1, 20, 20, 32), torch.float32)
    q = q * 300.0
    ref = attention_ref(q.double(), k.double(), v.double())
    out = diffcore.ops.attention(q, k, v, backend="cpu")
    assert torch.isfinite(out).all()
    assert _err(out, ref) < 1e-3


# ------------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("backend,shape", _params(BACKENDS))
def test_backward_matches_reference(backend, shape):
    for dtype in _dtypes_for(backend):
        q, k, v, d_o, _, _ = _inputs(shape, torch.float64, seed=1, tangents=True)
        d_o = d_o[..., : q.shape[2], :] if d_o.shape[2] >= q.shape[2] else torch.randn_like(q)
        refs = attention_vjp_ref(q, k, v, d_o)
        low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = diffcore.ops.attention(*low, backend=backend)
        out.backward(d_o.to(dtype))
        maths = _math_vjp(*(t.detach() for t in low), d_o.to(dtype))
        for name, t, r, m in zip("qkv", low, refs, maths):
            tol = _tol(_err(m, r), r, dtype)
            assert _err(t.grad, r) <= tol, (name, dtype, _err(t.grad, r), tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    q, k, v = (t.requires_grad_() for t in _inputs((1, 2, 7, 5, 4), torch.float64, seed=2))
    fn = lambda q, k, v: diffcore.ops.attention(q, k, v, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


# ------------------------------------------------------------------------------------------ JVP
@pytest.mark.parametrize("backend,shape", _params(BACKENDS))
def test_jvp_matches_reference(backend, shape):
    for dtype in _dtypes_for(backend):
        q, k, v, tq, tk, tv = _inputs(shape, torch.float64, seed=3, tangents=True)
        ref_o, ref_t = attention_jvp_ref(q, k, v, tq, tk, tv)
        low = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
        out, t_out = torch.func.jvp(
            lambda a, b, c: diffcore.ops.attention(a, b, c, backend=backend), tuple(low[:3]), tuple(low[3:])
        )
        m_o, m_t = _math_jvp(*low)
        assert _err(out, ref_o) <= _tol(_err(m_o, ref_o), ref_o, dtype)
        tol = _tol(_err(m_t, ref_t), ref_t, dtype)
        assert _err(t_out, ref_t) <= tol, (dtype, _err(t_out, ref_t), tol)


def _central_difference(q, k, v, tq, tk, tv, eps: float = 1e-6) -> torch.Tensor:
    """The directional derivative of the float64 reference attention along (tq, tk, tv), by central
    differences (error O(eps^2) plus rounding O(1e-16 / eps))."""
    forward = attention_ref(q + eps * tq, k + eps * tk, v + eps * tv)
    backward = attention_ref(q - eps * tq, k - eps * tk, v - eps * tv)
    return (forward - backward) / (2 * eps)


def test_reference_jvp_formula_matches_autodiff_and_finite_differences():
    q, k, v, tq, tk, tv = _inputs((2, 2, 9, 11, 8), torch.float64, seed=4, tangents=True)
    _, t_formula = attention_jvp_ref(q, k, v, tq, tk, tv)
    _, t_auto = torch.func.jvp(attention_ref, (q, k, v), (tq, tk, tv))
    assert _err(t_formula, t_auto) < 1e-12
    assert _err(t_formula, _central_difference(q, k, v, tq, tk, tv)) < 1e-7


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("keep_probs_budget", [0, 2**30], ids=["recompute", "kept-probs"])
def test_jvp_float64_both_cpu_paths(backend, keep_probs_budget, monkeypatch):
    monkeypatch.setattr(_attention, "PROBS_BUDGET_BYTES", keep_probs_budget)
    q, k, v, tq, tk, tv = _inputs((2, 3, 13, 17, 12), torch.float64, seed=5, tangents=True)
    _, ref_t = attention_jvp_ref(q, k, v, tq, tk, tv)
    _, t_out = torch.func.jvp(lambda a, b, c: diffcore.ops.attention(a, b, c, backend=backend), (q, k, v), (tq, tk, tv))
    assert _err(t_out, ref_t) < 1e-12
    assert _err(t_out, _central_difference(q, k, v, tq, tk, tv)) < 1e-7


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_jvp_with_partial_tangents(backend):
    q, k, v, tq, _, _ = _inputs((1, 2, 10, 10, 8), torch.float64, seed=6, tangents=True)
    _, ref_t = attention_jvp_ref(q, k, v, tq, None, None)
    _, t_out = torch.func.jvp(lambda a: diffcore.ops.attention(a, k, v, backend=backend), (q,), (tq,))
    assert _err(t_out, ref_t) < 1e-12


@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=[pytest.mark.triton] if b == "triton" else []) for b in BACKENDS]
)
def test_attention_and_jvp_fused(backend):
    dtype = torch.float32
    q, k, v, tq, tk, tv = _inputs((1, 2, 19, 26, 32), torch.float64, seed=7, tangents=True)
    ref_o, ref_t = attention_jvp_ref(q, k, v, tq, tk, tv)
    low = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
    out, t_out = diffcore.ops.attention_and_jvp(*low, backend=backend)
    m_o, m_t = _math_jvp(*low)
    assert _err(out, ref_o) <= _tol(_err(m_o, ref_o), ref_o, dtype)
    assert _err(t_out, ref_t) <= _tol(_err(m_t, ref_t), ref_t, dtype)


# ------------------------------------------------------------------------------------------ torch.func
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_vmap_jacfwd_jacrev_agree(backend):
    q, k, v = _inputs((1, 1, 4, 5, 3), torch.float64, seed=8)
    fn = lambda a: diffcore.ops.attention(a, k, v, backend=backend)  # noqa: E731
    j_fwd = torch.func.jacfwd(fn)(q)
    j_rev = torch.func.jacrev(fn)(q)
    j_ref = torch.func.jacrev(lambda a: attention_ref(a, k, v))(q)
    assert _err(j_fwd, j_ref) < 1e-12 and _err(j_rev, j_ref) < 1e-12
    qs = torch.randn(3, *q.shape, dtype=torch.float64)
    batched = torch.vmap(fn)(qs)
    assert _err(batched, torch.stack([attention_ref(x, k, v) for x in qs])) < 1e-12
    # vmap over k and v too (in_dims on a middle axis)
    ks = torch.randn(1, 3, 1, 5, 3, dtype=torch.float64)
    out = torch.vmap(lambda b: diffcore.ops.attention(q, b, b, backend=backend), in_dims=1)(ks)
    assert _err(out, torch.stack([attention_ref(q, ks[:, i], ks[:, i]) for i in range(3)])) < 1e-12


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("chunk", [8, 1 << 18], ids=["many-chunks", "one-chunk"])
def test_grad_of_jvp_and_vmap_of_jvp(backend, chunk, monkeypatch):
    """Reverse mode over forward mode (e.g. a JVP inside a training loss) and batched JVPs."""
    monkeypatch.setattr(_attention_cpu, "SCORE_CHUNK_ELEMENTS", chunk)
    q, k, v, tq, _, _ = _inputs((1, 2, 6, 6, 4), torch.float64, seed=9, tangents=True)

    def jvp_norm(fn, a):
        return torch.func.jvp(lambda x: fn(x, k, v), (a,), (tq,))[1].square().sum()

    ours = torch.func.grad(lambda a: jvp_norm(lambda *t: diffcore.ops.attention(*t, backend=backend), a))(q)
    ref = torch.func.grad(lambda a: jvp_norm(attention_ref, a))(q)
    assert _err(ours, ref) < 1e-10
    qs = torch.randn(4, *q.shape, dtype=torch.float64)
    t_b = torch.vmap(
        lambda a, t: torch.func.jvp(lambda x: diffcore.ops.attention(x, k, v, backend=backend), (a,), (t,))[1]
    )(qs, qs)
    t_r = torch.stack([attention_jvp_ref(a, k, v, a, None, None)[1] for a in qs])
    assert _err(t_b, t_r) < 1e-12


def test_auto_on_cpu_picks_cpu_backend(monkeypatch):
    monkeypatch.delenv("DIFFCORE_BACKEND", raising=False)
    assert _attention.BACKENDS.resolve("auto", torch.device("cpu")) == "cpu"
    assert "cuda" not in _attention.BACKENDS.auto_order["cuda"]  # never ran on a GPU


def test_package_attribute_is_the_op_and_the_module_is_private():
    q, k, v = _inputs((1, 1, 5, 5, 4), torch.float32)
    assert callable(diffcore.ops.attention) and diffcore.ops.attention is _attention.attention
    assert torch.equal(diffcore.ops.attention(q, k, v), _attention.attention(q, k, v))
    assert set(_attention.RUNNERS) == set(_attention.BACKENDS.implemented)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda q, k, v: (q[0], k, v), "q: expected 4 dimensions"),
        (lambda q, k, v: (q, k.double(), v), "k, v: expected the dtype of q"),
        (lambda q, k, v: (q, k[:, :1], v), "k: expected shape"),
        (lambda q, k, v: (q, k, v[..., :3, :]), "v: expected the shape of k"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), "q: expected dtype"),
        (lambda q, k, v: (q[..., :0, :], k, v), "q: expected a non-empty tensor"),
    ],
)
def test_bad_inputs_name_the_argument(make, match):
    q, k, v = _inputs((1, 2, 5, 5, 4), torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        diffcore.ops.attention(*make(q, k, v))


def test_bad_scale_backend_and_head_dim():
    q, k, v = _inputs((1, 1, 3, 3, 4), torch.float32)
    with pytest.raises(ValueError, match="scale"):
        diffcore.ops.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="unknown backend"):
        diffcore.ops.attention(q, k, v, backend="magic")
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"):
        diffcore.ops.attention(q, k, v, backend="cuda")
    big = torch.zeros(1, 1, 3, 257)
    with pytest.raises(ValueError, match="head dim"):
        diffcore.ops.attention(big, big, big)
    with pytest.raises(ValueError, match="tk: expected shape"):
        diffcore.ops.attention_and_jvp(q, k, v, None, k[..., :2, :], None)


# ------------------------------------------------------------------------------------------ GPU
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_SHAPES = [(2, 3, 77, 77, 64), (1, 2, 130, 200, 96), (1, 1, 256, 256, 256), (1, 2, 1031, 1031, 32)]


def _gpu_check(backend, shape, dtype, jvp=True, backward=True):
    q, k, v, tq, tk, tv = (t.cuda() for t in _inputs(shape, torch.float64, seed=11, tangents=True))
    ref_o, ref_t = attention_jvp_ref(q, k, v, tq, tk, tv)
    low = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
    out = diffcore.ops.attention(*low[:3], backend=backend)
    m_o, m_t = _math_jvp(*low)
    assert _err(out, ref_o) <= _tol(_err(m_o, ref_o), ref_o, dtype)
    if jvp:
        _, t_out = torch.func.jvp(
            lambda a, b, c: diffcore.ops.attention(a, b, c, backend=backend), tuple(low[:3]), tuple(low[3:])
        )
        assert _err(t_out, ref_t) <= _tol(_err(m_t, ref_t), ref_t, dtype)
    if backward:
        d_o = torch.randn_like(ref_o)
        refs = attention_vjp_ref(q, k, v, d_o)
        leaves = [t.detach().requires_grad_() for t in low[:3]]
        diffcore.ops.attention(*leaves, backend=backend).backward(d_o.to(dtype))
        maths = _math_vjp(*low[:3], d_o.to(dtype))
        for t, r, m in zip(leaves, refs, maths):
            assert _err(t.grad, r) <= _tol(_err(m, r), r, dtype)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_on_gpu(shape, dtype):
    _gpu_check("triton", shape, dtype)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_ext_on_gpu(shape, dtype):
    _gpu_check("cuda", shape, dtype, backward=False)


@pytest.mark.triton
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable on CPU tensors here")
def test_triton_under_torch_func():
    """func.grad, jacfwd (vmap over the JVP: tangents arrive batched), jacrev through Triton."""
    q, k, v = _inputs((1, 1, 5, 21, 16), torch.float32, seed=12)
    fn = lambda a: diffcore.ops.attention(a, k, v, backend="triton")  # noqa: E731
    ref = lambda a: attention_ref(a.double(), k.double(), v.double())  # noqa: E731
    j_ref = torch.func.jacfwd(ref)(q.double())
    assert _err(torch.func.jacfwd(fn)(q), j_ref) < 1e-5
    assert _err(torch.func.jacrev(fn)(q), j_ref) < 1e-5
    g = torch.func.grad(lambda a: fn(a).square().sum())(q)
    assert _err(g, torch.func.grad(lambda a: ref(a).square().sum())(q.double())) < 1e-5


@pytest.mark.parametrize("chunk", [64, 300, 1 << 18], ids=["row-chunks", "odd-chunks", "head-chunks"])
def test_cpu_chunking_paths_float64(chunk, monkeypatch):
    """Row chunks (long sequences), uneven chunks and multi-head chunks give the same results."""
    monkeypatch.setattr(_attention_cpu, "SCORE_CHUNK_ELEMENTS", chunk)
    q, k, v, tq, tk, tv = _inputs((2, 3, 19, 23, 8), torch.float64, seed=13, tangents=True)
    ref_o, ref_t = attention_jvp_ref(q, k, v, tq, tk, tv)
    out, t_out = torch.func.jvp(lambda a, b, c: diffcore.ops.attention(a, b, c, backend="cpu"), (q, k, v), (tq, tk, tv))
    assert _err(out, ref_o) < 1e-12 and _err(t_out, ref_t) < 1e-12
    fused_o, fused_t = diffcore.ops.attention_and_jvp(q, k, v, tq, tk, tv, backend="cpu")
    assert _err(fused_o, ref_o) < 1e-12 and _err(fused_t, ref_t) < 1e-12
    d_o = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    diffcore.ops.attention(*leaves, backend="cpu").backward(d_o)
    for t, r in zip(leaves, attention_vjp_ref(q, k, v, d_o)):
        assert _err(t.grad, r) < 1e-12


def test_inside_a_module_with_parameters_under_jvp_vmap_and_backward():
    """The UNet's use: q, k, v projected by layers whose weights require grad, [B, H, L, Dh] fp32."""
    torch.manual_seed(14)
    b, h, l, d = 2, 2, 16, 8
    proj = torch.nn.Linear(h * d, 3 * h * d)

    def block(x, attn):  # x [B, L, H*Dh]
        q, k, v = proj(x).reshape(x.shape[0], l, 3, h, d).permute(2, 0, 3, 1, 4)
        return attn(q, k, v, scale=d**-0.5).transpose(1, 2).reshape(x.shape)

    ours = lambda q, k, v, scale: diffcore.ops.attention(q, k, v, scale=scale)  # noqa: E731
    ref = lambda q, k, v, scale: attention_ref(q, k, v, scale)  # noqa: E731
    x, tx = torch.randn(b, l, h * d), torch.randn(b, l, h * d)
    for context in (torch.enable_grad, torch.no_grad):
        with context():
            o1, t1 = torch.func.jvp(lambda z: block(z, ours), (x,), (tx,))
            o2, t2 = torch.func.jvp(lambda z: block(z, ref), (x,), (tx,))
        assert _err(o1, o2) < 1e-5 and _err(t1, t2) < 1e-5
    xs = torch.randn(3, b, l, h * d)
    assert _err(torch.vmap(lambda z: block(z, ours))(xs), torch.vmap(lambda z: block(z, ref))(xs)) < 1e-5
    block(x, ours).square().sum().backward()
    g1 = proj.weight.grad.clone()
    proj.weight.grad = None
    block(x, ref).square().sum().backward()
    assert _err(g1, proj.weight.grad) < 1e-4


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_vmapped_vjp_under_no_grad(backend):
    """A batch of VJPs (vmap over the cotangents, as a Jacobian's block methods use) under
    torch.no_grad (no graph back to the parameters): the cpu backend's in-place chunk buffers
    cannot take vmapped cotangents, so they go to the vmappable formula, and match it."""
    q, k, v = _inputs((2, 2, 6, 6, 4), torch.float64, seed=15)
    cotangents = torch.randn(3, *q.shape, dtype=torch.float64)
    with torch.no_grad():
        vjp = torch.func.vjp(lambda a: diffcore.ops.attention(a, k, v, backend=backend), q)[1]
        ours = torch.func.vmap(lambda c: vjp(c)[0])(cotangents)
    assert not ours.requires_grad
    ref = torch.stack([attention_vjp_ref(q, k, v, c)[0] for c in cotangents])
    assert _err(ours, ref) < 1e-12
