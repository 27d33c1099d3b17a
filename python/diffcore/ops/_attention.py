"""Scaled dot-product attention with forward, backward and forward-mode JVP on every backend.

    attention(q, k, v, *, scale=None, backend="auto") -> softmax(q k^T * scale) v

Shapes: q [B, H, Lq, Dh], k and v [B, H, Lk, Dh] -> [B, H, Lq, Dh]; ``scale`` defaults to
1/sqrt(Dh). A ``torch.autograd.Function`` with ``setup_context``, ``backward``, ``jvp`` and an
explicit ``vmap`` rule, so that ``.backward()``, ``torch.func.grad/jvp/vmap/jacfwd/jacrev`` all work
through it (``torch.func.jvp`` through ``F.scaled_dot_product_attention`` fails on the CPU).

Backends: ``cpu`` (chunked batched torch matrix products, ``_attention_cpu.py``), ``triton``
(flash-style kernels, ``diffcore.kernels.attention``), ``cuda`` (CUDA C++ forward and JVP in
``diffcore._C``, launched by ``_attention_cuda.py``; its backward is the Triton kernel), ``reference``
(``diffcore.ref.attention``). Equations: see ``diffcore.ref.attention``. This module holds the
checks, the backend resolution, the autograd Function and the table ``RUNNERS`` of backend name ->
``_Runner`` (forward, jvp, backward, forward_jvp); the private torch internals it needs are in
``_torch_compat.py``.

What the forward keeps: the output O and the row log-sum-exp ``lse`` (FlashAttention-2); the
backward and the JVP recompute P blockwise. When autograd has to
differentiate through the backward or the JVP themselves (``create_graph=True``, reverse mode over
forward mode), they are computed with the differentiable formula of ``diffcore.ref.attention``
(O(L^2) memory) instead of the fused kernels. On the ``cpu`` backend,
when forward-mode AD is active, no reverse mode can flow through the call, and P is small (at most
``PROBS_BUDGET_BYTES``), the forward also keeps P, so that forward + JVP needs no recomputation of
the scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffcore import _checks
from diffcore._backend import OpBackends
from diffcore.ops import _attention_cpu as _cpu, _attention_cuda as _cuda, _torch_compat as compat
from diffcore.ref import attention as ref

__all__ = ["attention", "attention_and_jvp"]

BACKENDS = OpBackends(
    op="attention",
    implemented=("reference", "cpu", "cuda", "triton"),
    # cuda (C++): compiled, never run on a GPU -> not in auto. triton: verified under the
    # interpreter only (see docs/attention.md).
    auto_order={"cpu": ("cpu",), "cuda": ("reference",)},  # GPU kernels join auto after a GPU run matches the reference
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
# the cpu backend keeps P (fp32/fp64) for the JVP when it is at most this large
PROBS_BUDGET_BYTES = 256 * 2**20


def _reverse_mode_possible(*tensors: torch.Tensor) -> bool:
    """True when a gradient may flow back through this call: an input requires grad, or a
    torch.func.grad/vjp/jacrev transform is active (then the kept P, a non-differentiable output,
    must not be used by the JVP)."""
    return any(t.requires_grad for t in tensors) or compat.grad_transform_active()


def _check_inputs(q, k, v, scale, backend: str) -> tuple[float, str]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    _checks.check_same_device(q=q, k=k, v=v)
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k: expected shape [{b}, {h}, Lk, {d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim (last axis) must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")
    if scale is None:
        scale = ref.default_scale(d)
    elif (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not (float(scale) == float(scale))
        or abs(float(scale)) == float("inf")
    ):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    name = BACKENDS.resolve(backend, q.device)
    if name in ("triton", "cuda") and q.dtype == torch.float64:
        raise TypeError(
            f"q: backend {name!r} takes float32, float16 or bfloat16, got float64 "
            "(use backend='cpu' or 'reference' for float64)"
        )
    if name == "triton" and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError("q: the Triton interpreter (CPU tensors) has no bfloat16; use float32/float16 or a GPU")
    return float(scale), name


# --------------------------------------------------------------------------------------------------
# Runners. forward(q, k, v, scale, keep_probs) -> (O [B,H,Lq,D] in q.dtype, lse [B,H,Lq] fp32/64,
# probs or empty); jvp(q, k, v, tq, tk, tv, scale, out, lse, probs, no_reverse) -> tO;
# backward(q, k, v, out, lse, d_out, scale, need) -> (dq, dk, dv); forward_jvp(q, k, v, tq, tk, tv,
# scale) -> (O, tO) without autograd. All take and return [B, H, L, D] tensors.


@dataclass(frozen=True)
class _Runner:
    forward: Callable
    jvp: Callable
    backward: Callable
    forward_jvp: Callable


def _empty_probs(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], 0, 0), dtype=ref.compute_dtype(q.dtype))


def _unflat(x: torch.Tensor, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.reshape(*like.shape[:2], *x.shape[1:]).to(dtype or like.dtype)


def _cpu_forward(q, k, v, scale, keep_probs):
    out, lse, probs = _cpu.forward(q, k, v, scale, keep_probs=keep_probs)
    probs = _unflat(probs, q, probs.dtype) if probs is not None else _empty_probs(q)
    return _unflat(out, q), _unflat(lse, q, lse.dtype), probs


def _cpu_jvp(q, k, v, tq, tk, tv, scale, out, lse, probs, no_reverse):
    flat_probs = probs.reshape(-1, *probs.shape[2:]) if probs.numel() else None
    ct = ref.compute_dtype(q.dtype)
    if no_reverse and not any(compat.vmap_batched(t) for t in (q, k, v, tq, tk, tv)):
        # no gradient can flow back through this JVP: reused buffers, in-place updates on
        # plain tensors (the worker threads of the cpu backend see no torch.func state)
        pq, pk, pv, ptq, ptk, ptv = (compat.plain_tensor(t) for t in (q, k, v, tq, tk, tv))
        with torch.no_grad(), compat.functorch_disabled():
            t_out = _cpu.jvp_inplace(
                pq,
                pk,
                pv,
                ptq,
                ptk,
                ptv,
                scale,
                _cpu.flat(compat.plain_tensor(out), ct),
                compat.plain_tensor(lse).reshape(-1, lse.shape[-1]),
                probs=compat.plain_tensor(flat_probs),
            )
    else:
        t_out = _cpu.jvp(q, k, v, tq, tk, tv, scale, _cpu.flat(out, ct), probs=flat_probs)
    return _unflat(t_out, q)


def _cpu_backward(q, k, v, out, lse, d_out, scale, need):
    ct = ref.compute_dtype(q.dtype)
    grads = _cpu.backward(q, k, v, _cpu.flat(out, ct), lse.reshape(-1, lse.shape[-1]), d_out, scale, need)
    return tuple(None if g is None else _unflat(g, t) for g, t in zip(grads, (q, k, v)))


def _cpu_forward_jvp(q, k, v, tq, tk, tv, scale):
    out, t_out, _ = _cpu.forward_jvp(q, k, v, tq, tk, tv, scale)
    return _unflat(out, q), _unflat(t_out, q)


def _triton():
    from diffcore.kernels import attention as triton_kernels  # imports triton: only when used

    return triton_kernels


def _kernel_jvp(jvp_kernel):
    """A jvp runner for kernels that read raw memory: plain tensors, torch.func off."""

    def run(q, k, v, tq, tk, tv, scale, out, lse, probs, no_reverse):
        args = [compat.plain_tensor(t) for t in (q, k, v, tq, tk, tv)]
        with compat.functorch_disabled():  # kernels allocate and read plain tensors
            return jvp_kernel()(*args, scale, compat.plain_tensor(out), compat.plain_tensor(lse))

    return run


def _triton_backward(q, k, v, out, lse, d_out, scale, need):
    q, k, v, out, lse, d_out = (compat.plain_tensor(t) for t in (q, k, v, out, lse, d_out))
    with compat.functorch_disabled():
        return _triton().backward(q, k, v, out, lse, d_out, scale, need)


def _triton_forward(q, k, v, scale, keep_probs):
    out, lse = _triton().forward(q, k, v, scale)
    return out, lse, _empty_probs(q)


def _triton_forward_jvp(q, k, v, tq, tk, tv, scale):
    out, t_out, _ = _triton().forward_jvp(q, k, v, tq, tk, tv, scale)
    return out, t_out


def _cuda_forward(q, k, v, scale, keep_probs):
    out, lse = _cuda.forward(q, k, v, scale)
    return out, lse, _empty_probs(q)


def _reference_forward(q, k, v, scale, keep_probs):
    return ref.attention_ref(q, k, v, scale), ref.attention_lse_ref(q, k, scale), _empty_probs(q)


def _reference_jvp(q, k, v, tq, tk, tv, scale, *_):
    return ref.attention_jvp_ref(q, k, v, tq, tk, tv, scale)[1]


def _reference_backward(q, k, v, out, lse, d_out, scale, need):
    return ref.attention_vjp_ref(q, k, v, d_out, scale)


RUNNERS = {
    "reference": _Runner(_reference_forward, _reference_jvp, _reference_backward, ref.attention_jvp_ref),
    "cpu": _Runner(_cpu_forward, _cpu_jvp, _cpu_backward, _cpu_forward_jvp),
    "triton": _Runner(_triton_forward, _kernel_jvp(lambda: _triton().jvp), _triton_backward, _triton_forward_jvp),
    # the CUDA C++ backend has forward and JVP kernels; its backward is the Triton one
    "cuda": _Runner(_cuda_forward, _kernel_jvp(lambda: _cuda.jvp), _triton_backward, _cuda.forward_jvp),
}
_KERNELS = ("triton", "cuda")  # read raw memory: not differentiable, not vmappable


def _grad_through(*tensors) -> bool:
    """True when autograd must differentiate through this computation (double backward, or
    reverse mode over the JVP): the fused kernels are not differentiable, the formula is."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _jvp(backend: str, q, k, v, tq, tk, tv, scale: float, out, lse, probs, no_reverse: bool = False):
    if tq is None and tk is None and tv is None:
        return torch.zeros_like(out)
    if backend in _KERNELS and _grad_through(q, k, v, tq, tk, tv):
        backend = "reference"
    elif backend in _KERNELS and any(compat.vmap_batched(t) for t in (q, k, v, tq, tk, tv, out)):
        # under vmap over a JVP (jacfwd) the tangents arrive vmap-batched; the kernels read raw
        # memory, so this case uses the chunked torch formula (vmappable, any device)
        backend = "cpu"
    return RUNNERS[backend].jvp(q, k, v, tq, tk, tv, scale, out, lse, probs, no_reverse)


def _backward(backend: str, q, k, v, out, lse, d_out, scale: float, need):
    if torch.is_grad_enabled() or (backend != "reference" and compat.vmap_batched(d_out)):
        # create_graph=True / higher order, or vmap-batched cotangents (jacrev, a vmapped VJP under
        # no_grad) reaching a raw-memory kernel or the cpu backend's in-place chunk buffers: the
        # differentiable, vmappable formula
        backend = "reference"
    return RUNNERS[backend].backward(q, k, v, out, lse, d_out, scale, need)


class _Attention(torch.autograd.Function):
    """forward(q, k, v, scale, backend, keep_probs) -> (O, lse, probs); lse and probs are not
    differentiable (probs is empty unless the cpu backend kept it for a JVP)."""

    @staticmethod
    def forward(q, k, v, scale, backend, keep_probs, no_reverse):
        return RUNNERS[backend].forward(q, k, v, scale, keep_probs)

    @staticmethod
    def setup_context(ctx, inputs, output):  # required for torch.func (ANCHORS trap 9)
        q, k, v, scale, backend, _, no_reverse = inputs
        out, lse, probs = output
        ctx.mark_non_differentiable(lse, probs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v, out, lse, probs)
        ctx.scale, ctx.backend, ctx.no_reverse = scale, backend, no_reverse

    @staticmethod
    def backward(ctx, d_out, _d_lse, _d_probs):
        q, k, v, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if d_out is None or not any(need):
            return None, None, None, None, None, None, None
        dq, dk, dv = _backward(ctx.backend, q, k, v, out, lse, d_out, ctx.scale, need)
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _t_scale, _t_backend, _t_keep, _t_no_reverse):
        q, k, v, out, lse, probs = ctx.saved_tensors
        t_out = _jvp(ctx.backend, q, k, v, tq, tk, tv, ctx.scale, out, lse, probs, ctx.no_reverse)
        return t_out, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, scale, backend, keep_probs, no_reverse):
        """Fold the vmapped axis into the batch axis B: [V, B, ...] -> [V*B, ...]."""
        size = info.batch_size

        def fold(x, dim):
            x = x.movedim(dim, 0) if dim is not None else x.unsqueeze(0).expand(size, *x.shape)
            return x.reshape(size * x.shape[1], *x.shape[2:])

        outs = _Attention.apply(
            fold(q, in_dims[0]), fold(k, in_dims[1]), fold(v, in_dims[2]), scale, backend, keep_probs, no_reverse
        )
        return tuple(o.reshape(size, o.shape[0] // size, *o.shape[1:]) for o in outs), (0, 0, 0)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """softmax(q k^T * scale) v with forward, backward and forward-mode JVP.

    Args:
        q: [B, H, Lq, Dh]; k, v: [B, H, Lk, Dh] (same dtype and device; Dh <= 256).
        scale: softmax temperature, default 1/sqrt(Dh).
        backend: "auto" (cpu on CPU tensors; the reference on CUDA tensors until a GPU run has
            verified the kernels), "cpu", "triton", "cuda", "reference".
    Returns:
        [B, H, Lq, Dh] in the dtype of q (computed with fp32 softmax and accumulation).

    Example:
        >>> q = k = v = torch.randn(2, 4, 64, 32)
        >>> o, t_o = torch.func.jvp(lambda q: attention(q, k, v), (q,), (torch.ones_like(q),))
    """
    scale, name = _check_inputs(q, k, v, scale, backend)
    keep = False
    no_reverse = False
    if name == "cpu" and compat.forward_ad_active():
        no_reverse = not _reverse_mode_possible(q, k, v)
        itemsize = 8 if q.dtype == torch.float64 else 4
        keep = no_reverse and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * itemsize <= PROBS_BUDGET_BYTES
    return _Attention.apply(q, k, v, scale, name, keep, no_reverse)[0]


def attention_and_jvp(q, k, v, tq, tk, tv, *, scale: float | None = None, backend: str = "auto"):
    """``(O, tO)`` in one fused pass, without autograd (online softmax with the three accumulators
    P V, P tV, (P * tS) V and the running rowsum of P * tS). Tangents may be None (zero)."""
    scale, name = _check_inputs(q, k, v, scale, backend)
    for tname, t, p in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t is not None and (t.shape != p.shape or t.dtype != p.dtype or t.device != p.device):
            raise ValueError(
                f"{tname}: expected shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device}; "
                f"got {tuple(t.shape)}, {t.dtype}, {t.device}"
            )
    with torch.no_grad():
        return RUNNERS[name].forward_jvp(q, k, v, tq, tk, tv, scale)
