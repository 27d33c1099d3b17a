"""Top singular subspaces of a denoiser's Jacobian from batched JVPs and VJPs.

For a denoiser ``D(x, sigma)`` (docs/design.md, Denoiser) and a batch of points ``x`` [B, ...], each point b
has its own Jacobian ``J_b = dD(x)_b / dx_b`` (d x d, d = prod(shape[1:])). Denoisers act on the
rows of a batch independently, so ONE forward-mode JVP with a tangent [B, ...] returns ``J_b t_b`` for
every point at once, and ONE VJP returns ``J_b^T c_b``; ``torch.func.vmap`` then batches the k probe
vectors of a block method on top (``probes="vmap"``), or the probes are folded into the batch
(``probes="batch"``: x repeated k times), or looped (``probes="loop"``).

Operators (optional masks, docs/papers.md section 5): with an output mask ``M_out`` (region of interest)
and an input mask ``M_in`` (diagonal weights, usually 0/1), the analysed operator is
``A = M_out J M_in``. Singular triplets satisfy ``A v = s u`` and ``A^T u = s v``; ``U`` lives in
output space, ``V`` in input space.

Methods:
- ``subspace``: block subspace iteration on ``A^T A`` with ``k + oversample`` vectors: ``Y = A V``
  (JVPs), ``Q = qr(Y)``, ``Z = A^T Q`` (VJPs), ``svd(Z) = R S P^T`` gives ``A ~ (Q P) S R^T`` (the
  Rayleigh-Ritz step), ``V <- R``; stop when the residual ``max_i |A v_i - s_i u_i| / s_1`` or the
  subspace change ``sin(largest principal angle between successive top-k V)`` is at most ``tol``.
- ``randomized``: randomized SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1) with ``oversample``
  extra vectors and ``iters`` power iterations (re-orthonormalized each half step).
- ``lanczos``: Golub-Kahan-Lanczos bidiagonalization with full (twice-applied Gram-Schmidt)
  reorthogonalization, one vector per step, up to ``iters`` steps; breakdowns (an invariant
  subspace, e.g. a low-rank masked operator) restart from a random vector orthogonal to the basis.
  Residual estimate ``beta_m |P[m, i]|`` (exact for the ``A^T`` side, since ``A V_m = U_m B_m``).

Every method reports residuals ``|A v_i - s_i u_i| / s_1`` computed with an explicit final JVP.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from diffcore._checks import check_positive_int, check_tensor, sigma_per_row

log = logging.getLogger(__name__)
METHODS = ("subspace", "randomized", "lanczos")
PROBE_MODES = ("vmap", "batch", "loop")
DEFAULT_ITERS = {"subspace": 100, "randomized": 2}


@dataclass
class JacobianSubspace:
    """Top-k singular triplets of ``A = M_out J M_in`` at each point of a batch.

    Attributes:
        singular_values: [B, k], descending.
        U: left singular vectors [B, k, *shape] (output space, unit norm, orthogonal).
        V: right singular vectors [B, k, *shape] (input space).
        residuals: [B, k], ``|A v_i - s_i u_i| / s_1`` (s_1 the top singular value).
        iterations: [B] int64, iteration (subspace: rounds; randomized: power iterations; lanczos:
            Krylov steps) at which the point met ``tol``, or the last one run.
        converged: [B] bool.
        method: the method that produced it.
        jvp_passes, vjp_passes: operator applications, counted in blocks of one probe per point.
    """

    singular_values: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    residuals: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    method: str
    jvp_passes: int = 0
    vjp_passes: int = 0


# --------------------------------------------------------------------------- the operator
class JacobianOperator:
    """``A = M_out J M_in`` of ``denoiser`` at the points ``x`` [B, ...], applied to blocks of vectors.

    Vectors are flat: ``matvec(V)`` takes ``V`` [B, d, m] (m probe columns per point) and returns
    ``A V`` [B, d, m]; ``rmatvec(U)`` returns ``A^T U``. Counts the applications.

    The products are derivatives with respect to x only and run under ``torch.no_grad()`` (the
    ``torch.func`` transforms ignore an outer no_grad, so the JVPs and VJPs are unaffected): with a
    trained network, whose parameters require grad, they would otherwise each record an autograd
    graph back to the parameters, holding every activation of every probe for as long as any result
    derived from them lives (a randomized SVD's blocks chain them all: 1.7 GB for 2 points and k = 32
    on the 16x16 digits UNet, growing with B k).
    """

    def __init__(self, denoiser, x: torch.Tensor, sigma, *, mask=None, input_mask=None, probes: str = "vmap"):
        check_tensor("x", x, min_ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
        if probes not in PROBE_MODES:
            raise ValueError(f"probes: expected one of {', '.join(PROBE_MODES)}, got {probes!r}")
        self.denoiser, self.probes = denoiser, probes
        self.x = x.detach()
        # linear algebra runs in float32 for half inputs (no QR/SVD in half), else in x's dtype
        self.dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        self.batch, self.shape = x.shape[0], tuple(x.shape[1:])
        self.dim = math.prod(self.shape)
        self.sigma = sigma_per_row("sigma", sigma, self.batch, x.device).to(x.dtype)
        self.out_mask = _flat_mask("mask", mask, x)
        self.in_mask = _flat_mask("input_mask", input_mask, x)
        self.jvp_passes = self.vjp_passes = 0
        self._vjp_fn = None
        self._folded_vjp: dict[int, object] = {}
        with torch.no_grad():
            out = denoiser(self.x, self.sigma)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(
                f"denoiser: expected an output of shape {tuple(x.shape)}, got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        _check_finite_output(out, "denoiser output D(x, sigma)")
        self.output = out.detach()

    # the function of x only (sigma fixed per point)
    def _f(self, x):
        return self.denoiser(x, self.sigma)

    def _f_folded(self, m: int):
        sigma = self.sigma.repeat(m)
        return lambda x: self.denoiser(x, sigma)

    def _to_probes(self, block: torch.Tensor) -> torch.Tensor:
        """[B, d, m] -> [m, B, *shape]."""
        return block.permute(2, 0, 1).reshape(block.shape[2], self.batch, *self.shape)

    def _from_probes(self, probes: torch.Tensor) -> torch.Tensor:
        """[m, B, *shape] -> [B, d, m]."""
        return probes.reshape(probes.shape[0], self.batch, self.dim).permute(1, 2, 0)

    def _masked_probes(self, block: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, d, m] (times ``mask`` [B, d] when given) -> [m, B, *shape] in the input's dtype."""
        if mask is not None:
            block = block * mask[:, :, None]
        return self._to_probes(block.to(self.x.dtype))

    def _folded(self, m: int) -> torch.Tensor:
        """The input repeated for ``m`` probes folded into the batch: [m * B, *shape]."""
        return self.x.repeat(m, *([1] * len(self.shape)))

    def _finished(self, out: torch.Tensor, what: str, mask: torch.Tensor | None) -> torch.Tensor:
        """[m, B, *shape] -> [B, d, m] in the operator's dtype, checked finite (``what`` names the
        product), times ``mask`` [B, d] when given."""
        out = self._from_probes(out).to(self.dtype)
        _check_finite_output(out, what)
        return out * mask[:, :, None] if mask is not None else out

    def matvec(self, block: torch.Tensor) -> torch.Tensor:
        """``A V`` for V [B, d, m] (forward-mode JVPs)."""
        with torch.no_grad():  # d/dx only: no graph back to the parameters (class docstring)
            return self._matvec(block)

    def rmatvec(self, block: torch.Tensor) -> torch.Tensor:
        """``A^T U`` for U [B, d, m] (reverse-mode VJPs; the forward pass is recorded once)."""
        with torch.no_grad():
            return self._rmatvec(block)

    def _matvec(self, block: torch.Tensor) -> torch.Tensor:
        m = block.shape[2]
        tangents = self._masked_probes(block, self.in_mask)
        if self.probes == "vmap":
            out = torch.func.vmap(lambda t: torch.func.jvp(self._f, (self.x,), (t,))[1])(tangents)
        elif self.probes == "batch":
            folded = tangents.reshape(m * self.batch, *self.shape)
            out = torch.func.jvp(self._f_folded(m), (self._folded(m),), (folded,))[1]
            out = out.reshape(m, self.batch, *self.shape)
        else:
            out = torch.stack([torch.func.jvp(self._f, (self.x,), (t,))[1] for t in tangents])
        self.jvp_passes += m
        return self._finished(out, "denoiser Jacobian-vector product", self.out_mask)

    def _rmatvec(self, block: torch.Tensor) -> torch.Tensor:
        m = block.shape[2]
        cotangents = self._masked_probes(block, self.out_mask)
        if self.probes == "batch":
            if m not in self._folded_vjp:
                self._folded_vjp = {m: torch.func.vjp(self._f_folded(m), self._folded(m))[1]}
            out = self._folded_vjp[m](cotangents.reshape(m * self.batch, *self.shape))[0]
            out = out.reshape(m, self.batch, *self.shape)
        else:
            if self._vjp_fn is None:
                self._vjp_fn = torch.func.vjp(self._f, self.x)[1]
            if self.probes == "vmap":
                out = torch.func.vmap(lambda c: self._vjp_fn(c)[0])(cotangents)
            else:
                out = torch.stack([self._vjp_fn(c)[0] for c in cotangents])
        self.vjp_passes += m
        return self._finished(out, "denoiser vector-Jacobian product", self.in_mask)

    def random_block(self, m: int, generator: torch.Generator, *, space: str = "input") -> torch.Tensor:
        """Gaussian [B, d, m] drawn on the CPU (same seed, same numbers on every device), masked."""
        block = torch.randn(self.batch, self.dim, m, generator=generator, dtype=torch.float64)
        block = block.to(device=self.x.device, dtype=self.dtype)
        mask = self.in_mask if space == "input" else self.out_mask
        return block * mask[:, :, None] if mask is not None else block


def _flat_mask(name: str, mask, x: torch.Tensor):
    """A mask of shape x.shape[1:] (shared) or x.shape (per point) as [B, d] in x's dtype, or None."""
    if mask is None:
        return None
    check_tensor(name, mask)
    if tuple(mask.shape) == tuple(x.shape[1:]):
        mask = mask.expand(x.shape)
    elif tuple(mask.shape) != tuple(x.shape):
        raise ValueError(
            f"{name}: expected shape {tuple(x.shape[1:])} or {tuple(x.shape)} (like x), got {tuple(mask.shape)}"
        )
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    flat = mask.to(device=x.device, dtype=dtype).reshape(x.shape[0], -1)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return flat


def _check_finite_output(value: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"denoiser: {what} contains NaN or Inf")


# --------------------------------------------------------------------------- public API
def jacobian_subspace(
    denoiser,
    x: torch.Tensor,
    sigma,
    k: int,
    *,
    mask=None,
    input_mask=None,
    method: str = "subspace",
    iters: int | None = None,
    tol: float = 1e-4,
    oversample: int | None = None,
    seed: int = 0,
    probes: str = "vmap",
) -> JacobianSubspace:
    """Top-``k`` singular values and vectors of ``J = dD/dx`` (optionally ``M_out J M_in``) at each
    point of ``x`` [B, ...].

    Args:
        denoiser: callable ``D(x, sigma)`` (eval mode; pure torch ops so torch.func transforms apply).
        x: points [B, ...]; sigma: float or [B].
        k: number of singular triplets, 1 <= k <= d.
        mask: output mask (region of interest), shape ``x.shape[1:]`` or ``x.shape``.
        input_mask: input mask, same shapes.
        method: ``"subspace"`` (default), ``"randomized"`` or ``"lanczos"`` (see the module docstring).
        iters: rounds (subspace, default 100), power iterations (randomized, default 2) or the largest
            Krylov dimension (lanczos, default ``min(d, 4 k + 40)``).
        tol: relative residual (and subspace-change) tolerance.
        oversample: extra probe vectors (subspace: default 4; randomized: default 10; unused by lanczos).
        seed: seed of the random start (drawn on the CPU: the same on every device).
        probes: how probe blocks are batched: ``"vmap"``, ``"batch"`` (fold into the batch) or ``"loop"``.
    Returns:
        :class:`JacobianSubspace` with ``U``, ``V`` of shape [B, k, *x.shape[1:]].
    Raises:
        ValueError for k > d, masks of the wrong shape, an unknown method; FloatingPointError when
        the denoiser or its derivatives are not finite.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    check_positive_int("k", k)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol: expected a number >= 0, got {tol!r}")
    op = JacobianOperator(denoiser, x, sigma, mask=mask, input_mask=input_mask, probes=probes)
    if k > op.dim:
        raise ValueError(f"k: {k} exceeds the dimension d = {op.dim} of the Jacobian")
    generator = torch.Generator().manual_seed(seed)
    if method == "subspace":
        iters = DEFAULT_ITERS["subspace"] if iters is None else iters
        check_positive_int("iters", iters)
        result = _subspace_iteration(op, k, iters, tol, 4 if oversample is None else oversample, generator)
    elif method == "randomized":
        iters = DEFAULT_ITERS["randomized"] if iters is None else iters
        check_positive_int("iters", iters, minimum=0)
        result = _randomized_svd(op, k, iters, tol, 10 if oversample is None else oversample, generator)
    else:
        iters = min(op.dim, 4 * k + 40) if iters is None else iters
        check_positive_int("iters", iters, minimum=k)
        result = _lanczos(op, k, min(iters, op.dim), tol, generator)
    packaged = _package(op, result, method)
    if not bool(packaged.converged.all()):
        log.warning(
            "jacobian_subspace(%s, k=%d): %d of %d points not converged to tol=%g (max residual %.3g)",
            method,
            k,
            int((~packaged.converged).sum()),
            op.batch,
            tol,
            float(packaged.residuals.max()),
        )
    return packaged


def jacobian_full(denoiser, x: torch.Tensor, sigma, *, mode: str = "fwd", chunk_size: int = 32) -> torch.Tensor:
    """The full Jacobian ``J[b, i, j] = dD(x)_{b,i} / dx_{b,j}`` [B, d, d] (small d: the reference).

    ``mode="fwd"``: JVPs with the basis vectors e_j (columns), ``"rev"``: VJPs with e_i (rows),
    ``chunk_size`` basis vectors at a time under vmap; each pass serves the whole batch.
    """
    if mode not in ("fwd", "rev"):
        raise ValueError(f"mode: expected 'fwd' or 'rev', got {mode!r}")
    check_positive_int("chunk_size", chunk_size)
    op = JacobianOperator(denoiser, x, sigma)
    d = op.dim
    jac = torch.empty(op.batch, d, d, dtype=op.dtype, device=x.device)
    for start in range(0, d, chunk_size):
        stop = min(d, start + chunk_size)
        basis = torch.zeros(op.batch, d, stop - start, dtype=op.dtype, device=x.device)
        basis[:, torch.arange(start, stop), torch.arange(stop - start)] = 1
        if mode == "fwd":
            jac[:, :, start:stop] = op.matvec(basis)
        else:
            jac[:, start:stop, :] = op.rmatvec(basis).transpose(1, 2)
    return jac


# --------------------------------------------------------------------------- methods
def _orthonormal(block: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(block)[0]


def _ritz(op: JacobianOperator, q_left: torch.Tensor):
    """Rayleigh-Ritz from an orthonormal left block Q [B, d, l]: Z = A^T Q, svd(Z) = R S P^T, so
    Q^T A = P S R^T and A ~ (Q P) S R^T. Returns (S [B, l], U = Q P [B, d, l], V = R [B, d, l])."""
    z = op.rmatvec(q_left)
    r, s, ph = torch.linalg.svd(z, full_matrices=False)
    return s, q_left @ ph.transpose(1, 2), r


def _residuals(av: torch.Tensor, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """|A v_i - s_i u_i| / s_1 [B, k] from A V [B, d, k]."""
    scale = s[:, :1].clamp_min(torch.finfo(s.dtype).tiny)
    return (av - u * s[:, None, :]).norm(dim=1) / scale


def _subspace_change(v_old: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """sin of the largest principal angle between span(v_old) and span(v_new) [B], computed as
    ``|| v_new - v_old v_old^T v_new ||_2`` (accurate for small angles, unlike sqrt(1 - cos^2))."""
    rest = v_new - v_old @ (v_old.transpose(1, 2) @ v_new)
    return torch.linalg.matrix_norm(rest, ord=2).clamp(0, 1)


def _subspace_iteration(op, k, iters, tol, oversample, generator):
    width = min(op.dim, k + max(0, oversample))
    v = _orthonormal(op.random_block(width, generator))
    av = op.matvec(v)
    s = u = None
    iterations = torch.full((op.batch,), iters, dtype=torch.int64)
    converged = torch.zeros(op.batch, dtype=torch.bool)
    residuals = None
    for it in range(1, iters + 1):
        s, u, v_new = _ritz(op, _orthonormal(av))
        av = op.matvec(v_new)  # the next round's JVPs double as the residual check
        residuals = _residuals(av[:, :, :k], s[:, :k], u[:, :, :k])
        change = _subspace_change(v[:, :, :k], v_new[:, :, :k])
        v = v_new
        now = ((residuals.max(dim=1).values <= tol) | (change <= tol)).cpu()
        iterations = torch.where(now & ~converged, torch.tensor(it), iterations)
        converged |= now
        if bool(converged.all()):
            break
    return s[:, :k], u[:, :, :k], v[:, :, :k], residuals, iterations, converged


def _randomized_svd(op, k, power_iters, tol, oversample, generator):
    width = min(op.dim, k + max(0, oversample))
    y = op.matvec(op.random_block(width, generator))
    for _ in range(power_iters):
        z = _orthonormal(op.rmatvec(_orthonormal(y)))
        y = op.matvec(z)
    s, u, v = _ritz(op, _orthonormal(y))
    s, u, v = s[:, :k], u[:, :, :k], v[:, :, :k]
    residuals = _residuals(op.matvec(v), s, u)
    converged = (residuals.max(dim=1).values <= tol).cpu()
    iterations = torch.full((op.batch,), power_iters, dtype=torch.int64)
    return s, u, v, residuals, iterations, converged


def _reorthogonalize(vec: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from vec [B, d] its components in the columns of basis [B, d, m] (twice: CGS2)."""
    for _ in range(2):
        vec = vec - (basis @ (basis.transpose(1, 2) @ vec[:, :, None]))[:, :, 0]
    return vec


def _normalize_or_restart(vec, basis, op, generator, space, threshold):
    """Normalize vec [B, d]; rows whose norm is under threshold [B] are replaced by a random unit
    vector orthogonal to basis (a breakdown: the Krylov space became invariant) and get norm 0."""
    norm = vec.norm(dim=1)
    broken = norm <= threshold
    if bool(broken.any()):
        fresh = _reorthogonalize(op.random_block(1, generator, space=space)[:, :, 0], basis)
        fresh = fresh / fresh.norm(dim=1, keepdim=True).clamp_min(torch.finfo(vec.dtype).tiny)
        vec = torch.where(broken[:, None], fresh, vec)
        norm = torch.where(broken, torch.zeros_like(norm), norm)
    safe = torch.where(broken, torch.ones_like(norm), norm)
    return torch.where(broken[:, None], vec, vec / safe[:, None]), norm


def _lanczos(op, k, max_steps, tol, generator):
    eps = torch.finfo(op.dtype).eps
    v = op.random_block(1, generator)[:, :, 0]
    v = v / v.norm(dim=1, keepdim=True)
    vs = v[:, :, None]  # [B, d, m]
    p = op.matvec(vs)[:, :, 0]
    scale = p.norm(dim=1).clamp_min(torch.finfo(p.dtype).tiny)
    u, alpha = _normalize_or_restart(p, p.new_zeros(op.batch, op.dim, 0), op, generator, "output", 100 * eps * scale)
    us, alphas, betas = u[:, :, None], [alpha], []
    iterations = torch.full((op.batch,), max_steps, dtype=torch.int64)
    converged = torch.zeros(op.batch, dtype=torch.bool)
    best = None
    for m in range(1, max_steps + 1):
        r = _reorthogonalize(op.rmatvec(us[:, :, -1:])[:, :, 0] - alphas[-1][:, None] * vs[:, :, -1], vs)
        beta = r.norm(dim=1)
        if m >= k:
            bidiag = torch.diag_embed(torch.stack(alphas, dim=1))
            if betas:
                bidiag = bidiag + torch.diag_embed(torch.stack(betas, dim=1), offset=1)
            pl, s, qh = torch.linalg.svd(bidiag)
            est = beta[:, None] * pl[:, -1, :k].abs() / s[:, :1].clamp_min(torch.finfo(s.dtype).tiny)
            best = (s[:, :k], us @ pl[:, :, :k], vs @ qh.transpose(1, 2)[:, :, :k])
            now = (est.max(dim=1).values <= tol).cpu()
            iterations = torch.where(now & ~converged, torch.tensor(m), iterations)
            converged |= now
            if bool(converged.all()) or m == max_steps:
                break
        scale = torch.maximum(scale, torch.stack(alphas, 1).max(dim=1).values)
        v, beta = _normalize_or_restart(r, vs, op, generator, "input", 100 * eps * scale)
        vs = torch.cat([vs, v[:, :, None]], dim=2)
        betas.append(beta)
        p = _reorthogonalize(op.matvec(v[:, :, None])[:, :, 0] - beta[:, None] * us[:, :, -1], us)
        u, alpha = _normalize_or_restart(p, us, op, generator, "output", 100 * eps * scale)
        us = torch.cat([us, u[:, :, None]], dim=2)
        alphas.append(alpha)
    s, u, v = best
    residuals = _residuals(op.matvec(v), s, u)
    return s, u, v, residuals, iterations, converged


def _fix_signs(u: torch.Tensor, v: torch.Tensor):
    """Make the largest-magnitude entry of each right vector positive (deterministic signs)."""
    idx = v.abs().argmax(dim=1, keepdim=True)  # [B, 1, k]
    sign = torch.sign(torch.gather(v, 1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, v * sign


def _package(op: JacobianOperator, result, method: str) -> JacobianSubspace:
    s, u, v, residuals, iterations, converged = result
    u, v = _fix_signs(u, v)
    k = s.shape[1]
    as_rows = lambda block: block.transpose(1, 2).reshape(op.batch, k, *op.shape)  # noqa: E731
    return JacobianSubspace(
        singular_values=s,
        U=as_rows(u),
        V=as_rows(v),
        residuals=residuals,
        iterations=iterations,
        converged=converged,
        method=method,
        jvp_passes=op.jvp_passes,
        vjp_passes=op.vjp_passes,
    )
