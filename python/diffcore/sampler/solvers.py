"""Probability-flow ODE solvers (and their stochastic variants) for any denoiser ``D(x, sigma)``.

Convention (EDM, VE): ``x = x0 + sigma * n``; the PF-ODE is ``dx/dsigma = (x - D(x; sigma)) /
sigma`` (EDM Eq. 3 with sigma(t) = t, s(t) = 1). Every solver has the signature
``sample_<name>(denoiser, x, sigmas, *, callback=None, progress=False, ...)``; ``x`` is the
initial state at ``sigmas[0]`` (noise already scaled by sigmas[0]) and ``sigmas`` is strictly
descending and ends in 0 (``require_zero_end=False`` allows stopping at a positive sigma).

Each update is one fused elementwise kernel (``diffcore.ops.sampler_step``) whose coefficients
are computed once per schedule in float64 on the host, so the loop never synchronizes with a GPU.

Common keyword arguments:
    callback: called after every step with a dict ``i, sigma, sigma_next, sigma_hat, x`` (the state
        at sigma_hat, before the update), ``denoised``, ``x_next``.
    progress: tqdm progress bar (also governed by DIFFCORE_PROGRESS).
    state_dtype: dtype of the integrated state and of the update arithmetic; default x's dtype.
        ``torch.float64`` integrates in float64 (NVlabs/edm style) while the denoiser is still
        called with x's dtype (its output is cast to the state dtype).
    backend: backend of the fused step. ``auto``: the C++ kernel on CPU tensors; on CUDA tensors the
        torch reference until the Triton and CUDA kernels have matched it in a run on a GPU (the
        README's backend table; docs/design.md, "Backends and auto").
    check_finite: detect NaN/Inf in the denoiser output or the state (default True). On the CPU
        the check is fused into the step kernel and raises at once; on CUDA it is deferred (a
        device flag written by the kernel, read once at the end), so the loop never syncs.
    capture: CUDA only; run the trajectory as a CUDA graph (see ``capture_trajectory``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from diffcore import _checks, _env
from diffcore.ops import steps as coef
from diffcore.ops.steps import NO_BAD_STEP, bound_step, new_finite_flag

logger = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The [B] sigma tensors of recent grids on the CPU, shared between trajectories (building
# 50 of them costs about 60 us, 1.2 us a step at 16x3x32x32, as much as the rest of the loop's
# Python). Key: (grid values, B, dtype); value: (table [n, B], its rows, the table's version). The
# rows are views of the table and share its version counter, so an in-place write by a denoiser into
# any of them is seen and the entry rebuilt; so is a row that was made to require grad. The table is
# always a normal tensor (made outside inference mode, so that it has a version counter and can be
# used in and out of inference mode). Values are the same bits as freshly built ones: only the
# allocation is saved.
_SIGMA_ROWS: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, ...], int]] = {}
_SIGMA_ROWS_ENTRIES = 8  # grids kept (oldest dropped first)
_SIGMA_ROWS_MAX_ELEMENTS = 1 << 20  # a table above this many values is not kept


def _shared_sigma_rows(values: tuple[float, ...], batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``[B]`` CPU tensors of ``dtype``, one per value (each value rounded from float64, as
    ``torch.tensor(values, dtype=float64).to(dtype)``), rows of one table; reused from an earlier
    call with the same values, batch and dtype while nobody wrote into them."""
    key = (values, batch, dtype)
    entry = _SIGMA_ROWS.get(key)
    if entry is not None:
        table, rows, version = entry
        if table._version == version and not any(row.requires_grad for row in rows):
            return rows
    with torch.inference_mode(False):
        table = torch.tensor(values, dtype=torch.float64).to(dtype).view(-1, 1).repeat(1, batch)
        rows = table.unbind(0)
    if table.numel() <= _SIGMA_ROWS_MAX_ELEMENTS:
        while len(_SIGMA_ROWS) >= _SIGMA_ROWS_ENTRIES:
            _SIGMA_ROWS.pop(next(iter(_SIGMA_ROWS)), None)
        _SIGMA_ROWS[key] = (table, rows, table._version)
    return rows


def sigma_list(sigmas, *, descending: bool = True, require_zero_end: bool = True) -> list[float]:
    """Validate a sigma grid and return it as Python floats (float64).

    Descending grids must be strictly decreasing, finite, positive except an optional final 0
    (required when ``require_zero_end``). Ascending grids (inversion) must be strictly
    increasing and positive.
    """
    if isinstance(sigmas, torch.Tensor):
        values = sigmas.detach().to("cpu", torch.float64).reshape(-1).tolist()
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas: expected a 1-d tensor, got shape {tuple(sigmas.shape)}")
    else:
        values = [float(v) for v in sigmas]
    if len(values) < 2:
        raise ValueError(f"sigmas: expected at least 2 values (one step), got {len(values)}")
    for i, v in enumerate(values):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"sigmas: expected finite values >= 0, got sigmas[{i}] = {v!r}")
    for i in range(len(values) - 1):
        a, b = values[i], values[i + 1]
        if descending and not a > b:
            raise ValueError(
                f"sigmas: expected strictly descending values, got sigmas[{i}] = {a:g} <= sigmas[{i + 1}] = {b:g}"
            )
        if not descending and not a < b:
            raise ValueError(
                f"sigmas: expected strictly ascending values, got sigmas[{i}] = {a:g} >= sigmas[{i + 1}] = {b:g}"
            )
    if descending:
        if values[-2] == 0.0:
            raise ValueError("sigmas: only the final value may be 0")
        if require_zero_end and values[-1] != 0.0:
            raise ValueError(
                f"sigmas: the final value must be 0 (got {values[-1]:g}); append 0 or pass "
                "require_zero_end=False to stop at a positive sigma"
            )
    elif values[0] <= 0.0:
        raise ValueError(f"sigmas: an ascending grid must start at sigma > 0, got {values[0]:g}")
    return values


class _Loop:
    """What every solver loop shares: validation, denoiser calls, fused steps, checks, callback."""

    def __init__(
        self,
        name: str,
        denoiser: Denoiser,
        x: torch.Tensor,
        sigmas: list[float],
        *,
        state_dtype,
        backend: str,
        check_finite: bool,
        callback,
        progress: bool,
        model_dtype=None,
    ):
        if not callable(denoiser):
            raise TypeError(f"denoiser: expected a callable D(x, sigma), got {type(denoiser).__name__}")
        _checks.check_tensor("x", x, min_ndim=1)
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        if callback is not None and not callable(callback):
            raise TypeError("callback: expected a callable taking a dict, or None")
        self.name, self.denoiser, self.sigmas = name, denoiser, sigmas
        self.model_dtype = model_dtype or x.dtype
        self.state_dtype = state_dtype or x.dtype
        self.device = x.device
        self.batch = x.shape[0]
        self.callback, self.progress = callback, progress
        # NaN/Inf in x itself is caught by the first step (the kernel checks its output).
        self.flag = new_finite_flag(x.device) if check_finite else None
        self.deferred = self.flag is not None and x.device.type != "cpu"
        like = x if x.dtype == self.state_dtype else x[:1].to(self.state_dtype).expand(x.shape)
        # kernel: the positional C++ step on the cpu backend (None elsewhere), for _run_euler_cpu
        self.backend, self.run, self.kernel = bound_step(backend, like, self.flag)
        self._sigma_vectors: dict[float, torch.Tensor] = {}
        self._device_checked = False

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        """x in the state dtype, contiguous; no copy when it already is. The loops never write
        into the state they were given at step 0 (the caller's tensor), only into their own
        buffers from step 1 on."""
        return x.detach().to(self.state_dtype).contiguous()

    def sigma_vector(self, sigma: float) -> torch.Tensor:
        """The denoiser's sigma argument: a [B] tensor of x's dtype on x's device (cached)."""
        vec = self._sigma_vectors.get(sigma)
        if vec is None:
            vec = torch.full((self.batch,), sigma, dtype=self.model_dtype, device=self.device)
            self._sigma_vectors[sigma] = vec
        return vec

    def sigma_vectors(self, values) -> list[torch.Tensor | None]:
        """[B] sigma tensors for many values at once (one allocation, contiguous rows); None for 0."""
        missing = [v for v in dict.fromkeys(values) if v > 0 and v not in self._sigma_vectors]
        if missing and self.device.type == "cpu":
            self._sigma_vectors.update(zip(missing, _shared_sigma_rows(tuple(missing), self.batch, self.model_dtype)))
        elif missing:
            table = torch.tensor(missing, dtype=torch.float64).to(self.model_dtype).view(-1, 1)
            rows = table.repeat(1, self.batch).to(self.device).unbind(0)
            self._sigma_vectors.update(zip(missing, rows))
        return [self._sigma_vectors[v] if v > 0 else None for v in values]

    def prepare_sigmas(self, values) -> None:
        """Allocate the [B] sigma tensors up front (before a CUDA-graph capture)."""
        self.sigma_vectors(values)

    def steps(self):
        n = len(self.sigmas) - 1
        if _env.progress_enabled(self.progress):
            from tqdm.auto import tqdm

            return tqdm(range(n), desc=self.name, leave=False)
        return range(n)

    def denoise(self, x: torch.Tensor, sigma: float, step: int, sigma_vec: torch.Tensor | None = None) -> torch.Tensor:
        """``D(x; sigma)`` checked (shape; device on the first call) and cast to the state dtype.
        The hot path of every step: kept to a few attribute reads."""
        inp = x if x.dtype is self.model_dtype else x.to(self.model_dtype)
        out = self.denoiser(inp, self.sigma_vector(sigma) if sigma_vec is None else sigma_vec)
        return self.checked_output(out, x, sigma, step)

    def checked_output(self, out, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        """The denoiser's output ``out`` for state ``x`` checked (type, shape; device on the first
        call) and made a contiguous tensor of the state dtype that does not alias ``x``."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"denoiser: expected a tensor, got {type(out).__name__} at step {step} (sigma {sigma:g})")
        if out.shape != x.shape:
            raise ValueError(
                f"denoiser: returned shape {tuple(out.shape)}, expected {tuple(x.shape)} (as x) at "
                f"step {step} (sigma {sigma:g})"
            )
        if not self._device_checked:
            if out.device != x.device:
                raise ValueError(f"denoiser: returned a tensor on {out.device}, expected {x.device} at step {step}")
            self._device_checked = True
        if out.dtype is not self.state_dtype:
            out = out.to(self.state_dtype)
        elif out.data_ptr() == x.data_ptr():
            out = out.clone()  # the denoiser handed back its input: the state is updated in place
        return out if out.is_contiguous() else out.contiguous()

    def reused_buffer_error(self, i: int, what: str) -> ValueError:
        return ValueError(
            f"denoiser: returned the same output buffer for {what} at step {i}; {self.name} needs both outputs, "
            "so the denoiser must not overwrite its previous result (return a new tensor, e.g. out.clone())"
        )

    def step(self, x, denoised, row, i, *, extra=None, noise=None, out=None, sigma_from=None, sigma_to=None):
        """One fused update; raises at once on the CPU when NaN/Inf appeared."""
        if out is None:
            out = torch.empty_like(x)
        if self.run(x, denoised, extra, noise, out, row, i):
            raise self.nonfinite_error(i, sigma_from, sigma_to)
        return out

    def nonfinite_error(self, i: int, sigma_from=None, sigma_to=None) -> FloatingPointError:
        sigma_from = self.sigmas[i] if sigma_from is None else sigma_from
        sigma_to = self.sigmas[i + 1] if sigma_to is None else sigma_to
        return FloatingPointError(
            f"{self.name}: NaN or Inf in the denoiser output or the state at step {i} (sigma {sigma_from:g} -> "
            f"{sigma_to:g}); check the denoiser at this noise level"
        )

    def report(self, i, sigma, sigma_next, sigma_hat, x, denoised, x_next) -> None:
        if self.callback is not None:
            self.callback(
                {
                    "i": i,
                    "sigma": sigma,
                    "sigma_next": sigma_next,
                    "sigma_hat": sigma_hat,
                    "x": x,
                    "denoised": denoised,
                    "x_next": x_next,
                }
            )

    @property
    def in_place(self) -> bool:
        """Update the state in place (from step 1 on) unless a callback may keep references to it."""
        return self.callback is None

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Raise for a deferred (GPU) non-finite flag: the loop's only host synchronization."""
        if self.deferred and self.flag is not None:
            bad = int(self.flag.item())
            if bad != NO_BAD_STEP:
                raise self.nonfinite_error(bad)
        return x


def _churn_sigmas(sigmas: list[float], s_churn: float, s_tmin: float, s_tmax: float) -> list[float]:
    """EDM Alg. 2 line 4: gamma_i = min(S_churn/N, sqrt(2) - 1) for S_tmin <= sigma_i <= S_tmax;
    sigma_hat_i = sigma_i (1 + gamma_i)."""
    n = len(sigmas) - 1
    gamma = min(s_churn / n, math.sqrt(2.0) - 1.0) if s_churn > 0 else 0.0
    return [s * (1.0 + gamma) if (gamma > 0 and s_tmin <= s <= s_tmax) else s for s in sigmas[:-1]]


def _noise_like(generator, x: torch.Tensor) -> torch.Tensor:
    """Standard normal noise like x: per-sample (``SeededNoise``), a torch.Generator, or global."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    if hasattr(generator, "randn_like"):
        return generator.randn_like(x)
    raise TypeError("generator: expected None, a torch.Generator or a diffcore.sampler.SeededNoise")


# --- loops -----------------------------------------------------------------------------------------


def _run_euler(loop: _Loop, x: torch.Tensor) -> torch.Tensor:
    s = loop.sigmas
    rows = [coef.euler_coefficients(s[i], s[i + 1]) for i in range(len(s) - 1)]
    vectors = loop.sigma_vectors(s[:-1])
    if loop.kernel is not None and loop.callback is None:
        return _run_euler_cpu(loop, x, rows, vectors)
    return _run_one_call_per_step(loop, x, rows, vectors)  # EDM Alg. 1 line 5


def _run_euler_cpu(loop: _Loop, x: torch.Tensor, rows, vectors) -> torch.Tensor:
    """``_run_euler`` on the C++ step without a callback (the common CPU case), with the per-step
    Python cut to what can change from step to step: the same kernel with the same coefficients on
    the same buffers, so the same bits. Hoisted, as invariant over the loop: the state's shape,
    dtype and data pointer (the state is updated in place from step 1 on, after step 0 wrote into a
    new buffer) and whether it must be cast for the denoiser. Every denoiser output is still checked
    (``_Loop.checked_output`` whenever it is not a contiguous tensor of the state's shape and dtype,
    and at step 0, which also checks its device) and copied when it aliases the state."""
    kernel, denoiser, checking = loop.kernel, loop.denoiser, loop.flag is not None
    assert kernel is not None
    shape, state_dtype, s = x.shape, loop.state_dtype, loop.sigmas
    model_dtype = loop.model_dtype if loop.model_dtype is not state_dtype else None
    out = torch.empty_like(x)  # step 0 never writes into the caller's tensor
    x_ptr, out_ptr = x.data_ptr(), out.data_ptr()
    for i in loop.steps():
        denoised = denoiser(x if model_dtype is None else x.to(model_dtype), vectors[i])
        if (
            i == 0
            or not isinstance(denoised, torch.Tensor)
            or denoised.dtype is not state_dtype
            or denoised.shape != shape
            or not denoised.is_contiguous()
        ):
            denoised = loop.checked_output(denoised, x, s[i], i)
        denoised_ptr = denoised.data_ptr()
        if denoised_ptr == x_ptr:  # the denoiser handed back its input: the state is updated in place
            denoised = denoised.clone()
            denoised_ptr = denoised.data_ptr()
        c_x, c_denoised, _, _ = rows[i]
        if kernel(x_ptr, denoised_ptr, 0, 0, out_ptr, c_x, c_denoised, 0.0, 0.0, i) and checking:  # EDM Alg. 1 line 5
            raise loop.nonfinite_error(i)
        if i == 0:
            x, x_ptr = out, out_ptr
    return x


def _run_heun(
    loop: _Loop, x: torch.Tensor, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, generator=None
) -> torch.Tensor:
    s = loop.sigmas
    n = len(s) - 1
    hats = _churn_sigmas(s, s_churn, s_tmin, s_tmax)
    predictor = [coef.euler_coefficients(hats[i], s[i + 1]) for i in range(n)]
    corrector = [coef.heun_coefficients(hats[i], s[i + 1]) if s[i + 1] > 0 else None for i in range(n)]
    hat_vectors = loop.sigma_vectors(hats)
    next_vectors = loop.sigma_vectors(s[1:])
    denoise, run, in_place, callback = loop.denoise, loop.run, loop.in_place, loop.callback
    x_pred = torch.empty_like(x)
    for i in loop.steps():
        sigma_hat = hats[i]
        if sigma_hat != s[i]:  # EDM Alg. 2 lines 5-6: churn, x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z
            noise = _noise_like(generator, x)
            x = loop.step(
                x,
                x,
                coef.churn_coefficients(s[i], sigma_hat, s_noise),
                i,
                noise=noise,
                out=x if (in_place and i > 0) else None,
                sigma_from=s[i],
                sigma_to=sigma_hat,
            )
        denoised = denoise(x, sigma_hat, i, hat_vectors[i])  # Alg. 1 line 4
        x_next = x if (in_place and i > 0) else torch.empty_like(x)
        if corrector[i] is None:  # Alg. 1 line 6
            if run(x, denoised, None, None, x_next, predictor[i], i):  # Alg. 1 line 5
                raise loop.nonfinite_error(i, sigma_hat)
        else:
            if run(x, denoised, None, None, x_pred, predictor[i], i):  # Alg. 1 line 5
                raise loop.nonfinite_error(i, sigma_hat)
            denoised_pred = denoise(x_pred, s[i + 1], i, next_vectors[i])  # Alg. 1 line 7
            if denoised_pred.data_ptr() == denoised.data_ptr():
                raise loop.reused_buffer_error(i, "D(x; sigma) and D(x_pred; sigma_next)")
            if run(x, denoised, denoised_pred, None, x_next, corrector[i], i):  # Alg. 1 line 8
                raise loop.nonfinite_error(i, sigma_hat)
        if callback is not None:
            loop.report(i, s[i], s[i + 1], sigma_hat, x, denoised, x_next)
        x = x_next
    return x


def _run_dpmpp_2m(loop: _Loop, x: torch.Tensor) -> torch.Tensor:
    s = loop.sigmas
    rows = [coef.dpmpp_2m_coefficients(s[i], s[i + 1], s[i - 1] if i > 0 else None) for i in range(len(s) - 1)]
    return _run_one_call_per_step(loop, x, rows, loop.sigma_vectors(s[:-1]))  # DPM-Solver++ Alg. 2


def _run_ddim(loop: _Loop, x: torch.Tensor, *, eta=0.0, generator=None) -> torch.Tensor:
    s = loop.sigmas
    rows = [coef.ddim_coefficients(s[i], s[i + 1], eta) for i in range(len(s) - 1)]
    return _run_one_call_per_step(loop, x, rows, loop.sigma_vectors(s[:-1]), generator)  # DDIM Eq. 12 (VE)


def _run_one_call_per_step(loop: _Loop, x: torch.Tensor, rows, vectors, generator=None) -> torch.Tensor:
    """The loop of the solvers that call the denoiser once per step (Euler, DPM-Solver++(2M), DDIM):
    step i is ``x_next = c_x x + c_denoised D(x; s_i) + c_extra D_prev + c_noise z`` with ``rows[i]``;
    the previous step's denoiser output is passed only where ``c_extra != 0`` (and kept only by a
    multistep table), fresh noise ``z`` (drawn from ``generator``) only where ``c_noise != 0``."""
    s = loop.sigmas
    denoise, run, in_place, callback = loop.denoise, loop.run, loop.in_place, loop.callback
    multistep = any(row[coef.C_EXTRA] != 0.0 for row in rows)
    previous = None
    for i in loop.steps():
        denoised = denoise(x, s[i], i, vectors[i])
        extra = previous if rows[i][coef.C_EXTRA] != 0.0 else None
        if extra is not None and extra.data_ptr() == denoised.data_ptr():
            raise loop.reused_buffer_error(i, "this step and the previous one")
        noise = _noise_like(generator, x) if rows[i][coef.C_NOISE] != 0.0 else None
        x_next = x if (in_place and i > 0) else torch.empty_like(x)
        if run(x, denoised, extra, noise, x_next, rows[i], i):
            raise loop.nonfinite_error(i)
        if callback is not None:
            loop.report(i, s[i], s[i + 1], s[i], x, denoised, x_next)
        previous, x = (denoised if multistep else None), x_next
    return x


_LOOPS = {"euler": _run_euler, "heun": _run_heun, "dpmpp_2m": _run_dpmpp_2m, "ddim": _run_ddim}


def _solve(
    name: str,
    denoiser,
    x,
    sigmas,
    *,
    callback,
    progress,
    state_dtype,
    backend,
    check_finite,
    capture,
    require_zero_end=True,
    descending=True,
    model_dtype=None,
    **options,
) -> torch.Tensor:
    values = sigma_list(sigmas, descending=descending, require_zero_end=require_zero_end)
    loop = _Loop(
        f"sample_{name}",
        denoiser,
        x,
        values,
        state_dtype=state_dtype,
        backend=backend,
        check_finite=check_finite,
        callback=callback,
        progress=progress,
        model_dtype=model_dtype,
    )
    body = _LOOPS[name]
    if capture:
        from diffcore.sampler.capture import CapturedTrajectory

        _check_capturable(loop, options)
        return CapturedTrajectory(loop, lambda state: body(loop, state, **options), x).run(x)
    return loop.finish(body(loop, loop.initial_state(x), **options))


def _loop_options(callback, progress, state_dtype, backend, check_finite, capture, require_zero_end) -> dict:
    """The keyword arguments every public solver forwards unchanged to ``_solve``."""
    return {
        "callback": callback,
        "progress": progress,
        "state_dtype": state_dtype,
        "backend": backend,
        "check_finite": check_finite,
        "capture": capture,
        "require_zero_end": require_zero_end,
    }


def _check_capturable(loop: _Loop, options: dict) -> None:
    if loop.device.type != "cuda":
        raise ValueError(f"capture: CUDA graphs need CUDA tensors, got x on {loop.device}")
    if loop.callback is not None:
        raise ValueError("capture: a callback cannot run inside a CUDA graph; pass callback=None")
    if options.get("s_churn", 0.0) or options.get("eta", 0.0):
        raise ValueError(
            "capture: needs a deterministic trajectory (S_churn = 0, eta = 0): per-sample noise is drawn on the host"
        )


def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    callback=None,
    progress: bool = False,
    state_dtype: torch.dtype | None = None,
    backend: str = "auto",
    check_finite: bool = True,
    require_zero_end: bool = True,
    capture: bool = False,
) -> torch.Tensor:
    """Euler's method on the PF-ODE (first order; one denoiser call per step).

    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i; sigma_i)) / sigma_i``  (EDM Alg. 1
    line 5). Global error O(h): about 1/steps.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> x0_hat [B, ...]``.
        x: initial state [B, ...] at sigmas[0] (e.g. ``sigmas[0] * noise``).
        sigmas: strictly descending grid ending in 0, length steps + 1.
    Returns:
        the state at sigmas[-1], [B, ...] in the state dtype.
    """
    return _solve(
        "euler",
        denoiser,
        x,
        sigmas,
        **_loop_options(callback, progress, state_dtype, backend, check_finite, capture, require_zero_end),
    )


def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    callback=None,
    progress: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator=None,
    state_dtype: torch.dtype | None = None,
    backend: str = "auto",
    check_finite: bool = True,
    require_zero_end: bool = True,
    capture: bool = False,
) -> torch.Tensor:
    """Heun's 2nd-order method, EDM Algorithm 1 (deterministic, S_churn = 0, the default) or
    Algorithm 2 (stochastic churn).

    Per step: ``d = (x - D(x; s))/s``; ``x' = x + (s' - s) d`` (line 5); if s' > 0:
    ``d' = (x' - D(x'; s'))/s'``, ``x_next = x + (s' - s)(d + d')/2`` (lines 7-8), else
    ``x_next = x'`` (the last step into 0 is Euler). Global error O(h^2); 2 denoiser calls per
    step except the last (EDM: 18 steps = 35 calls).

    Churn (Alg. 2 lines 4-6): ``gamma = min(S_churn/N, sqrt(2)-1)`` where S_tmin <= s <= S_tmax,
    ``s_hat = s (1 + gamma)``, ``x_hat = x + sqrt(s_hat^2 - s^2) S_noise z``; the step then runs
    from s_hat. ``generator``: a ``SeededNoise`` (per-sample streams, batch-invariant), a
    ``torch.Generator`` or None (global RNG).
    """
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: expected a finite value >= 0, got {value!r}")
    return _solve(
        "heun",
        denoiser,
        x,
        sigmas,
        **_loop_options(callback, progress, state_dtype, backend, check_finite, capture, require_zero_end),
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        generator=generator,
    )


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    callback=None,
    progress: bool = False,
    state_dtype: torch.dtype | None = None,
    backend: str = "auto",
    check_finite: bool = True,
    require_zero_end: bool = True,
    capture: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep, one denoiser call per step.

    With ``t = -log sigma``, ``h = t_{i+1} - t_i``, ``r = h_{i-1}/h``:
    ``x_{i+1} = (s_{i+1}/s_i) x_i - expm1(-h) ((1 + 1/(2r)) D_i - D_{i-1}/(2r))``.
    The first step and the final step into sigma = 0 are first order (``x_{i+1} = D_i`` for the
    last; ANCHORS trap 8). Global error O(h^2).
    """
    return _solve(
        "dpmpp_2m",
        denoiser,
        x,
        sigmas,
        **_loop_options(callback, progress, state_dtype, backend, check_finite, capture, require_zero_end),
    )


def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    callback=None,
    progress: bool = False,
    eta: float = 0.0,
    generator=None,
    state_dtype: torch.dtype | None = None,
    backend: str = "auto",
    check_finite: bool = True,
    require_zero_end: bool = True,
    capture: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) in VE variables, first order.

    ``eps = (x - D)/s``; ``x_next = D + s_down eps + s_up z`` with
    ``s_up = eta s' sqrt(s^2 - s'^2)/s`` and ``s_down = sqrt(s'^2 - s_up^2)`` (the VP formula
    divided by sqrt(abar_next), abar = 1/(1+s^2)). eta = 0 is deterministic and equals Euler;
    eta = 1 is DDPM's ancestral sampler. On the sigmas of a VP schedule (``vp_sigmas``) with a
    ``VPDenoiser`` this is diffusers' DDIMScheduler. ``generator`` as in ``sample_heun``.
    """
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a finite value >= 0, got {eta!r}")
    return _solve(
        "ddim",
        denoiser,
        x,
        sigmas,
        **_loop_options(callback, progress, state_dtype, backend, check_finite, capture, require_zero_end),
        eta=eta,
        generator=generator,
    )


SOLVERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m, "ddim": sample_ddim}
