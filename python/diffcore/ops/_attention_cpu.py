"""The ``cpu`` backend of attention: batched torch matrix products over chunks of the score matrix.

Shapes: q [B, H, Lq, Dh], k and v [B, H, Lk, Dh]; internally flattened to [B*H, L, Dh]. The scores
are never formed whole: each step takes a chunk of heads (and, for long sequences, of query rows)
holding about ``SCORE_CHUNK_ELEMENTS`` scores, so that the softmax and the products on it run in
cache and memory stays O(chunk * Lk). Matrix products go to torch's BLAS (bmm / baddbmm), which on
this kind of machine runs near peak; the rest is a few in-place passes over the chunk.

Equations (see ``diffcore.ref.attention``): S = q k^T * scale, P = softmax(S) = exp(S - lse),
O = P v; tO = P tv + (P * tS) v - rowsum(P * tS) * O with tS = (tq k^T + q tk^T) * scale;
backward as FlashAttention-2 (recompute P from the saved row log-sum-exp ``lse``).
float16/bfloat16 inputs are computed in float32; float64 stays float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from diffcore import _env
from diffcore.ref.attention import compute_dtype

# scores per chunk (fp32: 1 MiB), chosen by measurement on a 2-core EPYC (256K..1M equally good,
# 16K clearly worse)
SCORE_CHUNK_ELEMENTS = 1 << 18


def flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, L, D] -> contiguous [B*H, L, D] in ``dtype``."""
    return x.to(dtype).reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def chunks(bh: int, lq: int, lk: int) -> Iterator[tuple[slice, slice]]:
    """(head slice, query-row slice) pairs covering [bh, lq], each with ~SCORE_CHUNK_ELEMENTS scores."""
    rows = max(1, SCORE_CHUNK_ELEMENTS // lk)
    if rows >= lq:
        step = max(1, rows // lq)
        for h in range(0, bh, step):
            yield slice(h, min(h + step, bh)), slice(0, lq)
    else:
        for h in range(bh):
            for i in range(0, lq, rows):
                yield slice(h, h + 1), slice(i, min(i + rows, lq))


def chunk_shape(bh: int, lq: int, lk: int) -> tuple[int, int, int]:
    """The largest (heads, rows, keys) block that ``chunks`` yields."""
    rows = max(1, SCORE_CHUNK_ELEMENTS // lk)
    return (min(bh, max(1, rows // lq)), lq, lk) if rows >= lq else (1, min(rows, lq), lk)


class Workspace:
    """Reused score-sized buffers: fresh 1 MiB temporaries per chunk cost page faults (torch's CPU
    allocator does not cache), measured at ~2 ms each on a contended 2-core machine."""

    def __init__(self, n: int, shape: tuple[int, int, int], like: torch.Tensor):
        self.buffers = [like.new_empty(shape) for _ in range(n)]

    def get(self, i: int, hs: slice, rs: slice) -> torch.Tensor:
        return self.buffers[i][: hs.stop - hs.start, : rs.stop - rs.start]


def run_chunks(bh: int, lq: int, lk: int, body, n_buffers: int, like: torch.Tensor) -> None:
    """Call ``body(hs, rs, workspace)`` for every chunk of ``chunks(bh, lq, lk)``.

    With T = torch.get_num_threads() > 1, the heads are split into T contiguous ranges, one Python
    thread each, and torch runs single-threaded meanwhile (restored afterwards): each worker then
    streams through its own chunks with no OpenMP barrier per small op, which on a busy machine
    costs more than the work itself. All chunks of a head go to one worker, so bodies may
    accumulate per head (the backward's dK, dV).
    """
    shape = chunk_shape(bh, lq, lk)
    todo = list(chunks(bh, lq, lk))
    threads = min(torch.get_num_threads(), bh)
    if threads <= 1 or len(todo) < 2:
        ws = Workspace(n_buffers, shape, like)
        for hs, rs in todo:
            body(hs, rs, ws)
        return
    groups: list[list[tuple[slice, slice]]] = [[] for _ in range(threads)]
    for hs, rs in todo:
        groups[hs.start * threads // bh].append((hs, rs))

    grad_enabled = torch.is_grad_enabled()  # thread-local: carry the caller's mode over

    def work(group):
        ws = Workspace(n_buffers, shape, like)
        with torch.set_grad_enabled(grad_enabled):
            for hs, rs in group:
                body(hs, rs, ws)

    with _env.torch_threads(1), ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(work, g) for g in groups if g]:
            f.result()


def _exp_rows(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: s <- exp(s - rowmax); returns (rowmax, rowsum of the result), each [.., L, 1]."""
    m = s.amax(dim=-1, keepdim=True)
    s.sub_(m).exp_()
    return m, s.sum(dim=-1, keepdim=True)


def forward(q, k, v, scale: float, keep_probs: bool = False):
    """``(O [B*H, Lq, Dh], lse [B*H, Lq], P [B*H, Lq, Lk] or None)`` in the compute dtype.

    ``keep_probs`` keeps the normalized probabilities (for a JVP that follows at once).
    """
    ct = compute_dtype(q.dtype)
    qs, kf, vf = flat(q, ct) * scale, flat(k, ct), flat(v, ct)
    bh, lq, lk = qs.shape[0], qs.shape[1], kf.shape[1]
    kt = kf.transpose(1, 2)
    out = qs.new_empty(bh, lq, vf.shape[-1])
    lse = qs.new_empty(bh, lq, 1)
    probs = qs.new_empty(bh, lq, lk) if keep_probs else None

    def body(hs, rs, ws):
        s = torch.bmm(qs[hs, rs], kt[hs], out=probs[hs, rs] if probs is not None else ws.get(0, hs, rs))
        m, l = _exp_rows(s)
        torch.bmm(s, vf[hs], out=out[hs, rs]).div_(l)
        torch.add(m, l.log(), out=lse[hs, rs])
        if keep_probs:
            s.div_(l)

    run_chunks(bh, lq, lk, body, 0 if keep_probs else 1, qs)
    return out, lse.squeeze(-1), probs


def _tangent_scores(qs, tqs, kt, tkt, hs, rs, out=None):
    """tS * scale-folded for one chunk: tq k^T * scale + q tk^T * scale (None when both are zero).

    With ``out`` (a workspace buffer) the result is written there and accumulated in place.
    """
    t_s = None
    if tqs is not None:
        t_s = torch.bmm(tqs[hs, rs], kt[hs], out=out)
    if tkt is not None:
        if t_s is None:
            t_s = torch.bmm(qs[hs, rs], tkt[hs], out=out)
        elif out is None:
            t_s = torch.baddbmm(t_s, qs[hs, rs], tkt[hs])
        else:
            t_s.baddbmm_(qs[hs, rs], tkt[hs])
    return t_s


def _flat_tangents(tq, tk, tv, ct, scale):
    tqs = flat(tq, ct) * scale if tq is not None else None
    tkt = flat(tk, ct).transpose(1, 2) if tk is not None else None
    tvf = flat(tv, ct) if tv is not None else None
    return tqs, tkt, tvf


def jvp(q, k, v, tq, tk, tv, scale: float, out: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """tO [B*H, Lq, Dh] from the saved output ``out`` and, if kept, the probabilities ``probs``
    (else P is recomputed chunkwise).

    Tangents may be None (zero). ``out``/``probs`` as returned by ``forward``. Written
    without in-place updates of autograd-visible tensors or ``out=``, so that it stays
    differentiable (``torch.func.jvp`` runs it with grad mode on).
    """
    ct = compute_dtype(q.dtype)
    qs, kf, vf = flat(q, ct) * scale, flat(k, ct), flat(v, ct)
    tqs, tkt, tvf = _flat_tangents(tq, tk, tv, ct, scale)
    bh, lq, lk = qs.shape[0], qs.shape[1], kf.shape[1]
    kt = kf.transpose(1, 2)
    per_head_chunk: list[list[torch.Tensor]] = []
    for hs, rs in chunks(bh, lq, lk):
        if probs is not None:
            p = probs[hs, rs]
        else:  # softmax, not exp(S - lse): lse is a non-differentiable output, and reverse mode
            # over this JVP must see P's dependence on q and k
            p = torch.softmax(torch.bmm(qs[hs, rs], kt[hs]), dim=-1)
        t_s = _tangent_scores(qs, tqs, kt, tkt, hs, rs)
        to = None
        if t_s is not None:
            p_ts = t_s * p
            to = torch.addcmul(torch.bmm(p_ts, vf[hs]), p_ts.sum(dim=-1, keepdim=True), out[hs, rs], value=-1.0)
        if tvf is not None:
            to = torch.bmm(p, tvf[hs]) if to is None else torch.baddbmm(to, p, tvf[hs])
        if to is None:  # every tangent is zero
            to = torch.zeros_like(out[hs, rs])
        if rs.start == 0:
            per_head_chunk.append([])
        per_head_chunk[-1].append(to)
    return torch.cat([torch.cat(rows, dim=1) for rows in per_head_chunk], dim=0)


def jvp_inplace(
    q, k, v, tq, tk, tv, scale: float, out: torch.Tensor, lse: torch.Tensor, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """As ``jvp``, with reused buffers and in-place updates (P from ``probs`` or exp(S - lse)).

    Not differentiable: for forward mode only (the caller makes sure no gradient flows back).
    """
    ct = compute_dtype(q.dtype)
    qs, kf, vf = flat(q, ct) * scale, flat(k, ct), flat(v, ct)
    tqs, tkt, tvf = _flat_tangents(tq, tk, tv, ct, scale)
    bh, lq, lk = qs.shape[0], qs.shape[1], kf.shape[1]
    kt = kf.transpose(1, 2)
    lse3 = lse.unsqueeze(-1)
    t_out = torch.empty_like(out)

    def body(hs, rs, ws):
        if probs is not None:
            p = probs[hs, rs]
        else:
            p = torch.bmm(qs[hs, rs], kt[hs], out=ws.get(0, hs, rs)).sub_(lse3[hs, rs]).exp_()
        to = t_out[hs, rs]
        t_s = _tangent_scores(qs, tqs, kt, tkt, hs, rs, out=ws.get(1, hs, rs))
        if t_s is not None:
            p_ts = t_s.mul_(p)
            torch.bmm(p_ts, vf[hs], out=to)
            to.addcmul_(p_ts.sum(dim=-1, keepdim=True), out[hs, rs], value=-1.0)
            if tvf is not None:
                to.baddbmm_(p, tvf[hs])
        elif tvf is not None:
            torch.bmm(p, tvf[hs], out=to)
        else:
            to.zero_()

    run_chunks(bh, lq, lk, body, 2, qs)
    return t_out


def forward_jvp(q, k, v, tq, tk, tv, scale: float):
    """``(O, tO, lse)`` in one pass (unnormalized exp, normalized at the end). [B*H, Lq, Dh] each."""
    ct = compute_dtype(q.dtype)
    qs, kf, vf = flat(q, ct) * scale, flat(k, ct), flat(v, ct)
    tqs, tkt, tvf = _flat_tangents(tq, tk, tv, ct, scale)
    bh, lq, lk = qs.shape[0], qs.shape[1], kf.shape[1]
    kt = kf.transpose(1, 2)
    out = qs.new_empty(bh, lq, vf.shape[-1])
    t_out = torch.zeros_like(out)
    lse = qs.new_empty(bh, lq, 1)

    def body(hs, rs, ws):
        s = torch.bmm(qs[hs, rs], kt[hs], out=ws.get(0, hs, rs))
        m, l = _exp_rows(s)  # s <- exp(S - m): P * l
        o = torch.bmm(s, vf[hs], out=out[hs, rs]).div_(l)
        torch.add(m, l.log(), out=lse[hs, rs])
        to = t_out[hs, rs]
        t_s = _tangent_scores(qs, tqs, kt, tkt, hs, rs, out=ws.get(1, hs, rs))
        if t_s is not None:
            p_ts = t_s.mul_(s)  # (forward_jvp runs under no_grad: in place is fine)
            torch.bmm(p_ts, vf[hs], out=to)
            to.addcmul_(p_ts.sum(dim=-1, keepdim=True), o, value=-1.0)
        if tvf is not None:
            to.baddbmm_(s, tvf[hs])
        to.div_(l)

    run_chunks(bh, lq, lk, body, 2, qs)
    return out, t_out, lse.squeeze(-1)


def backward(q, k, v, out, lse, d_out, scale: float, need=(True, True, True)):
    """``(dq, dk, dv)`` as [B*H, L, Dh] (None where ``need`` is False), recomputing P from ``lse``."""
    ct = compute_dtype(q.dtype)
    qs, kf, vf = flat(q, ct) * scale, flat(k, ct), flat(v, ct)
    dof = flat(d_out, ct)
    bh, lq, lk = qs.shape[0], qs.shape[1], kf.shape[1]
    kt, vt = kf.transpose(1, 2), vf.transpose(1, 2)
    lse3 = lse.unsqueeze(-1)
    delta = (dof * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
    dq = torch.empty_like(qs) if need[0] else None
    dk = torch.zeros_like(kf) if need[1] else None
    dv = torch.zeros_like(vf) if need[2] else None

    def body(hs, rs, ws):
        p = torch.bmm(qs[hs, rs], kt[hs], out=ws.get(0, hs, rs)).sub_(lse3[hs, rs]).exp_()
        do = dof[hs, rs]
        if dv is not None:
            dv[hs].baddbmm_(p.transpose(1, 2), do)
        if dq is None and dk is None:
            return
        ds = torch.bmm(do, vt[hs], out=ws.get(1, hs, rs)).sub_(delta[hs, rs]).mul_(p)  # dS = P * (dP - rowsum(dO * O))
        if dq is not None:
            torch.bmm(ds, kf[hs], out=dq[hs, rs]).mul_(scale)
        if dk is not None:
            dk[hs].baddbmm_(ds.transpose(1, 2), qs[hs, rs])  # qs already carries the scale

    run_chunks(bh, lq, lk, body, 2, qs)
    return dq, dk, dv
