"""Fused sampler step: one elementwise pass per solver update, for every backend.

``x_next = c_x * x + c_denoised * denoised + c_extra * extra + c_noise * noise``

Every update of ``diffcore.sampler`` (Euler, Heun's correction, DPM-Solver++ 2M, DDIM with or
without eta, EDM churn) has this form with per-step scalar coefficients that depend only on the
schedule: the formulas are here (``euler_coefficients`` ... ``churn_coefficients``), tested against
the textbook form of each update in ``diffcore.ref.sampler_step``. The table of coefficients is
computed once per schedule on the host (``step_coefficients``), so a step on the GPU reads four
host scalars: no device-to-host synchronization, and a trajectory can be captured as a CUDA graph.

Backends: ``reference`` (torch, float64 math), ``cpu`` (C++, OpenMP, bitwise deterministic,
float32/float64; host code in ``_sampler_step_cpu.py``), ``cuda`` (CUDA C++, launched by
``_sampler_step_cuda.py``), ``triton`` (fp32 math; float32/float16/bfloat16). No GPU kernel has run
on a GPU yet, so ``auto`` takes ``cpu`` on CPU tensors and the reference on CUDA tensors, and the
reference for a dtype the CPU kernel lacks (float16 and bfloat16). ``RUNNERS`` maps a backend name
to its step function.

Non-finite check: pass ``finite_flag`` (an int32 tensor of shape [1] on the tensors' device,
initialized to a large value, e.g. ``new_finite_flag``): when ``denoised`` or the result holds NaN
or Inf it is lowered to ``step``, on the device, without synchronizing. Read it once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffcore import _checks
from diffcore._backend import OpBackends
from diffcore._ext import dtype_name
from diffcore.ops import _sampler_step_cpu as _cpu, _sampler_step_cuda as _cuda

# Column order of a coefficient row / table.
C_X, C_DENOISED, C_EXTRA, C_NOISE = 0, 1, 2, 3
KINDS = ("euler", "heun", "dpmpp_2m", "ddim", "churn")
NO_BAD_STEP = 2**31 - 1

BACKENDS = OpBackends(
    "sampler_step",
    implemented=("reference", "cpu", "cuda", "triton"),
    # cuda: neither the CUDA C++ kernel nor the Triton kernel has run on a GPU yet (Triton only in
    # the interpreter): auto takes the reference there until a GPU run matches it (docs/sampler.md).
    auto_order={"cpu": ("cpu", "reference"), "cuda": ("reference",)},
)
_DTYPES = {
    "reference": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def step_coefficients(kind: str, sigmas, *, eta: float = 0.0) -> torch.Tensor:
    """Coefficient table of ``kind`` on the grid ``sigmas`` (n+1 values): float64 CPU [n, 4] with
    columns (c_x, c_denoised, c_extra, c_noise); row i steps from sigmas[i] to sigmas[i+1]."""
    if kind not in ("euler", "heun", "dpmpp_2m", "ddim"):
        raise ValueError(f"kind: expected euler, heun, dpmpp_2m or ddim, got {kind!r}")
    return coefficient_table(kind, sigmas, eta=eta)


# ---------------------------------------------------------------- coefficient formulas (VE/EDM: x = x0 + sigma n)
def euler_coefficients(sigma: float, sigma_next: float) -> tuple[float, float, float, float]:
    """Euler step of the PF-ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (EDM Eq. 3 with
    sigma(t) = t; EDM Alg. 1 line 5): ``x_next = x + (sigma_next - sigma) * (x - D) / sigma``
    = ``(sigma_next/sigma) x + (1 - sigma_next/sigma) D``. First order. Identical to DDIM with
    eta = 0 in VE variables."""
    ratio = sigma_next / sigma
    return (ratio, 1.0 - ratio, 0.0, 0.0)


def heun_coefficients(sigma: float, sigma_next: float) -> tuple[float, float, float, float]:
    """Heun's 2nd-order correction (EDM Alg. 1 lines 7-8), written in ``x``, ``D = D(x; sigma)``
    and ``D' = D(x_pred; sigma_next)`` where ``x_pred`` is the Euler predictor:

        x_next = x + h/2 * ((x - D)/sigma + (x_pred - D')/sigma_next),  h = sigma_next - sigma
               = (sigma_next/sigma) x + (h/(2 sigma_next) - h/sigma) D - h/(2 sigma_next) D'

    (substituting ``x_pred = (sigma_next/sigma) x + (1 - sigma_next/sigma) D``). Needs
    ``sigma_next > 0``: EDM takes a plain Euler step into sigma = 0.
    """
    if sigma_next == 0.0:
        raise ValueError("heun correction needs sigma_next > 0 (the last step into 0 is an Euler step)")
    h = sigma_next - sigma
    half_over_next = h / (2.0 * sigma_next)
    return (sigma_next / sigma, half_over_next - h / sigma, -half_over_next, 0.0)


def dpmpp_2m_coefficients(
    sigma: float, sigma_next: float, sigma_prev: float | None
) -> tuple[float, float, float, float]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in VE variables, ``t = -log sigma``,
    ``h = t_next - t``:

        x_next = (sigma_next/sigma) x - expm1(-h) * ((1 + 1/(2r)) D - 1/(2r) D_prev),
        r = h_prev / h,  h_prev = t - t_prev

    Second order (multistep). The first step (no ``sigma_prev``) and the final step into
    ``sigma_next = 0`` are first order: ``x_next = (sigma_next/sigma) x + (1 - sigma_next/sigma) D``
    (ANCHORS trap 8: a second-order step into 0 is ill-defined, h = inf).
    """
    ratio = sigma_next / sigma
    if sigma_next == 0.0 or sigma_prev is None:
        return (ratio, 1.0 - ratio, 0.0, 0.0)
    h = math.log(sigma) - math.log(sigma_next)
    h_prev = math.log(sigma_prev) - math.log(sigma)
    r = h_prev / h
    one_minus_ratio = -math.expm1(-h)  # = 1 - sigma_next/sigma, without cancellation
    return (ratio, one_minus_ratio * (1.0 + 1.0 / (2.0 * r)), -one_minus_ratio / (2.0 * r), 0.0)


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of a DDIM step with stochasticity ``eta`` in VE variables.

    DDIM (Song et al. 2021, Eq. 12) with ``abar = 1/(1+sigma^2)`` gives, after dividing by
    ``sqrt(abar_next)``, fresh-noise std ``sigma_up = eta * sigma_next * sqrt(sigma^2 -
    sigma_next^2) / sigma`` and deterministic part ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``.
    eta = 1 is DDPM's ancestral step; eta = 0 gives sigma_up = 0 (deterministic DDIM = Euler).
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    up = eta * sigma_next * math.sqrt(max(sigma * sigma - sigma_next * sigma_next, 0.0)) / sigma
    up = min(up, sigma_next)
    return math.sqrt(max(sigma_next * sigma_next - up * up, 0.0)), up


def ddim_coefficients(sigma: float, sigma_next: float, eta: float = 0.0) -> tuple[float, float, float, float]:
    """DDIM step in VE variables: ``x_next = D + sigma_down * (x - D)/sigma + sigma_up * z``
    (see ``ancestral_split``). First order; deterministic for eta = 0."""
    down, up = ancestral_split(sigma, sigma_next, eta)
    ratio = down / sigma
    return (ratio, 1.0 - ratio, 0.0, up)


def churn_coefficients(sigma: float, sigma_hat: float, s_noise: float = 1.0) -> tuple[float, float, float, float]:
    """EDM Alg. 2 lines 5-6: ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) * S_noise * z``."""
    return (1.0, 0.0, 0.0, math.sqrt(max(sigma_hat * sigma_hat - sigma * sigma, 0.0)) * s_noise)


def coefficient_table(kind: str, sigmas, *, eta: float = 0.0) -> torch.Tensor:
    """Coefficients of every step of ``kind`` on the grid ``sigmas`` (length n+1): float64 [n, 4].

    Row i updates from ``sigmas[i]`` to ``sigmas[i+1]``. ``heun`` rows are the correction step
    (the predictor uses the ``euler`` table); its row for a step into 0 is the Euler step.
    ``churn`` is not a grid step (it needs sigma_hat) and has no table here.
    """
    s = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).tolist()]
    rows = []
    for i in range(len(s) - 1):
        if kind == "euler":
            rows.append(euler_coefficients(s[i], s[i + 1]))
        elif kind == "heun":
            rows.append(euler_coefficients(s[i], s[i + 1]) if s[i + 1] == 0.0 else heun_coefficients(s[i], s[i + 1]))
        elif kind == "dpmpp_2m":
            rows.append(dpmpp_2m_coefficients(s[i], s[i + 1], s[i - 1] if i > 0 else None))
        elif kind == "ddim":
            rows.append(ddim_coefficients(s[i], s[i + 1], eta))
        else:
            raise ValueError(f"kind: expected one of euler, heun, dpmpp_2m, ddim for a table, got {kind!r}")
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 4)


def new_finite_flag(device) -> torch.Tensor:
    """An int32 [1] flag for ``finite_flag``: holds ``NO_BAD_STEP`` until a step sees NaN/Inf."""
    return torch.full((1,), NO_BAD_STEP, dtype=torch.int32, device=device)


def _coefficient_row(coefficients, step) -> tuple[float, float, float, float]:
    if isinstance(coefficients, torch.Tensor):
        if coefficients.dim() == 2:
            if coefficients.shape[1] != 4:
                raise ValueError(f"coefficients: expected a table of shape [steps, 4], got {tuple(coefficients.shape)}")
            if step is None:
                raise ValueError("step: required when coefficients is a [steps, 4] table")
            if not 0 <= step < coefficients.shape[0]:
                raise ValueError(f"step: expected 0 <= step < {coefficients.shape[0]}, got {step}")
            coefficients = coefficients[step]
        if coefficients.shape != (4,):
            raise ValueError(
                f"coefficients: expected 4 values or a [steps, 4] table, got shape {tuple(coefficients.shape)}"
            )
        row = tuple(float(v) for v in coefficients.detach().cpu().tolist())
    elif isinstance(coefficients, Sequence) and len(coefficients) == 4:
        row = tuple(float(v) for v in coefficients)
    else:
        raise TypeError("coefficients: expected 4 numbers, a tensor [4] or a table [steps, 4]")
    if not all(map(lambda v: v == v and abs(v) != float("inf"), row)):
        raise ValueError(f"coefficients: contains NaN or Inf: {row}")
    c_x, c_denoised, c_extra, c_noise = row
    return c_x, c_denoised, c_extra, c_noise


def _run_reference(x, denoised, extra, noise, out, row, step, flag):
    from diffcore.ref.sampler_step import sampler_step_ref

    result = sampler_step_ref(x, denoised, row, extra, noise)
    out.copy_(result)
    if flag is not None:
        bad = ~(torch.isfinite(denoised).all() & torch.isfinite(out).all())
        flag.copy_(torch.where(bad, torch.clamp(flag, max=step), flag))
    return out


def _run_triton(x, denoised, extra, noise, out, row, step, flag):
    from diffcore.kernels.sampler_step import sampler_step_triton

    return sampler_step_triton(x, denoised, extra, noise, out, row, step, flag)


# Backend name -> run(x, denoised, extra, noise, out, row, step, flag) -> out.
RUNNERS = {"reference": _run_reference, "cpu": _cpu.run, "cuda": _cuda.run, "triton": _run_triton}


def step_runner(backend: str, device: torch.device, dtype: torch.dtype):
    """The unchecked step function of a resolved backend, for loops that validated their tensors
    once (the sampler): ``run(x, denoised, extra, noise, out, row, step, flag) -> out`` on
    contiguous tensors of one shape, dtype and device. Returns ``(name, run)``."""
    name = BACKENDS.resolve(backend, torch.device(device))
    if (backend or "auto").lower() == "auto" and dtype not in _DTYPES[name]:
        name = "reference"  # auto: the kernel lacks this dtype (float16/bfloat16 on the CPU)
    if dtype not in _DTYPES[name]:
        names = ", ".join(dtype_name(d) for d in _DTYPES[name])
        raise TypeError(f"sampler_step: backend {name!r} supports {names}; got {dtype_name(dtype)}")
    return name, RUNNERS[name]


def bound_step_runner(backend: str, like: torch.Tensor, flag: torch.Tensor | None):
    """A step function bound to tensors shaped like ``like`` and to ``flag``, with the per-call
    work hoisted out (the sampler's hot path): ``run(x, denoised, extra, noise, out, row, step)
    -> bool``, True when NaN/Inf is *known* now (CPU: at once; CUDA: never, the flag is deferred).
    No validation: the caller checked shapes, dtypes, devices and contiguity. Returns
    ``(name, run)``."""
    name, run, _ = bound_step(backend, like, flag)
    return name, run


def bound_step(backend: str, like: torch.Tensor, flag: torch.Tensor | None):
    """``bound_step_runner`` plus, on the ``cpu`` backend, the positional C++ kernel it calls
    (``_sampler_step_cpu.bound_kernel``: ``kernel(x_ptr, denoised_ptr, extra_ptr, noise_ptr,
    out_ptr, c_x, c_denoised, c_extra, c_noise, step) -> int``, > 0 on NaN/Inf), for a loop that
    calls it without the runner's Python frame. Returns ``(name, run, kernel)``; ``kernel`` is None
    on every other backend."""
    name, runner = step_runner(backend, like.device, like.dtype)
    if name == "cpu":
        kernel = _cpu.bound_kernel(like, flag)
        return name, _cpu.bound_runner(like, flag, kernel), kernel
    flag_host = flag.numpy() if flag is not None and like.device.type == "cpu" else None

    def run(x, denoised, extra, noise, out, row, step):
        runner(x, denoised, extra, noise, out, row, step, flag)
        return flag_host is not None and int(flag_host[0]) != NO_BAD_STEP

    return name, run, None


class _SamplerStepFunction(torch.autograd.Function):
    """Autograd of the affine step: each input's gradient (and tangent) is its coefficient."""

    @staticmethod
    def forward(x, denoised, extra, noise, row, step, runner):
        out = torch.empty_like(x)
        return runner(x, denoised, extra, noise, out, row, step, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.row = inputs[4]

    @staticmethod
    def backward(ctx, grad):
        row = ctx.row
        need = ctx.needs_input_grad
        return (
            grad * row[0] if need[0] else None,
            grad * row[1] if need[1] else None,
            grad * row[2] if need[2] else None,
            grad * row[3] if need[3] else None,
            None,
            None,
            None,
        )

    @staticmethod
    def jvp(ctx, tx, td, te, tz, *_):
        row = ctx.row
        out = None
        for coefficient, tangent in zip(row, (tx, td, te, tz)):
            if tangent is not None and coefficient != 0.0:
                out = tangent * coefficient if out is None else out + tangent * coefficient
        return out


def sampler_step(
    kind: str,
    x: torch.Tensor,
    denoised: torch.Tensor,
    coefficients,
    *,
    step: int | None = None,
    extra: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    finite_flag: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One fused solver update ``c_x x + c_denoised denoised + c_extra extra + c_noise noise``.

    Args:
        kind: which update the coefficients encode: ``euler``, ``heun`` (correction; ``extra`` =
            D(x_pred; sigma_next)), ``dpmpp_2m`` (``extra`` = previous denoised), ``ddim``,
            ``churn`` (EDM Alg. 2 line 6; ``noise`` required). Used for validation.
        x, denoised: state and denoiser output [B, ...], same shape, dtype and device.
        coefficients: 4 numbers, a tensor [4], or a table [steps, 4] from ``step_coefficients``
            together with ``step``.
        step: row of the table; also the value written to ``finite_flag``.
        extra, noise: [B, ...] tensors, required when their coefficient is non-zero.
        out: result buffer (may be ``x`` itself: the update is elementwise).
        finite_flag: optional int32 [1] on the device, lowered to ``step`` when ``denoised`` or the
            result contains NaN/Inf (no host synchronization).
        backend: ``auto``, ``reference``, ``cpu``, ``cuda`` or ``triton``.
    Returns:
        the next state [B, ...] in x's dtype.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    _checks.check_tensor("x", x)
    _checks.check_tensor("denoised", denoised)
    if denoised.shape != x.shape:
        raise ValueError(f"denoised: expected shape {tuple(x.shape)} (as x), got {tuple(denoised.shape)}")
    row = _coefficient_row(coefficients, step)
    step_index = 0 if step is None else int(step)
    named = {"x": x, "denoised": denoised}
    for name, tensor, coefficient in (("extra", extra, row[2]), ("noise", noise, row[3]), ("out", out, None)):
        if tensor is None:
            if coefficient:
                raise ValueError(
                    f"{name}: required for kind {kind!r} when its coefficient is non-zero ({coefficient:g})"
                )
            continue
        _checks.check_tensor(name, tensor)
        if tensor.shape != x.shape:
            raise ValueError(f"{name}: expected shape {tuple(x.shape)} (as x), got {tuple(tensor.shape)}")
        named[name] = tensor
    if kind == "heun" and extra is None:
        raise ValueError("extra: kind 'heun' needs the denoised value at the Euler predictor")
    for name, tensor in named.items():
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {dtype_name(x.dtype)} (as x), got {dtype_name(tensor.dtype)}")
    device = _checks.check_same_device(**named)
    if finite_flag is not None:
        _checks.check_tensor("finite_flag", finite_flag, dtypes=(torch.int32,))
        if finite_flag.shape != (1,) or finite_flag.device != device:
            raise ValueError(f"finite_flag: expected an int32 tensor of shape [1] on {device}")
    _, runner = step_runner(backend, device, x.dtype)
    inputs = [t.contiguous() if t is not None else None for t in (x, denoised, extra, noise)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        result = _SamplerStepFunction.apply(*inputs, row, step_index, runner)
        if out is not None:
            raise ValueError("out: not supported when an input requires grad")
        return result
    if out is not None and out.is_contiguous():
        target = out
    else:
        target = torch.empty_like(x, memory_format=torch.contiguous_format)
    runner(*inputs, target, row, step_index, finite_flag)
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target
