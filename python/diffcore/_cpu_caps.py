"""What this CPU can do, and the screening precision the CPU knn / empirical_denoise paths use.

The two ops screen with a fast Gram product and re-score the survivors exactly. The fastest
screening GEMM depends on the machine, not on its name: with native bf16 matrix instructions
(AVX-512-BF16, AMX) torch's bf16 matmul runs 2-3x faster than fp32; without them (AVX2 only: most
laptops and cloud x86 machines) the same call falls back to slow emulation (under 1 GFLOP/s against
150 for fp32 on a Zen 3). The float choice (``precision``: empirical_denoise, and knn where int8
is not used) is made once per process from a capability query:

- ``/proc/cpuinfo`` flags ``avx512_bf16`` or ``amx_bf16`` (the hardware),
- ``torch.backends.cpu.get_cpu_capability()`` (what ATen dispatches to; ``ATEN_CPU_CAPABILITY``
  lowers it) must be ``AVX512``,
- ``ONEDNN_MAX_CPU_ISA`` (oneDNN runs torch's bf16 matmul) must not cap below ``AVX512_CORE_BF16``,
- ``torch.backends.mkldnn.is_available()``.

knn screens with an exact integer GEMM (``torch._int_mm``, int8 x int8 -> int32; 2x torch's fp32
GEMM rate with AVX2, 1.9x its bf16 rate with AVX-512-VNNI, both measured on one core) wherever a
probe finds it exact at the value ranges the screen uses (:func:`int8_gemm_levels`): int8 sums are
exact in any order, so only the rounding of the inputs enters knn's bound. With AVX-512-VNNI both
operands take 8 bits (+-127); oneDNN's AVX2 kernel adds the u8 x s8 pairs in saturating 16-bit
lanes, so there the training rows take 7 bits (+-63), which the probe finds exact.

``DIFFCORE_CPU_SCREEN=auto|int8|bf16|fp32`` forces it (any other value is an error naming the
variable; ``int8`` forces knn's screen, empirical_denoise keeps the automatic float choice).
``diffcore info`` prints the choice and why.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

SCREEN_VAR = "DIFFCORE_CPU_SCREEN"
SCREEN_VALUES = ("auto", "int8", "bf16", "fp32")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# ONEDNN_MAX_CPU_ISA values that still allow native bf16 (oneDNN's names; DEFAULT/ALL: no cap).
_ONEDNN_BF16_ISAS = {
    "DEFAULT",
    "ALL",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX_FP16",
}


@dataclass(frozen=True)
class CpuCaps:
    """The facts the screening choice rests on."""

    torch_capability: str  # torch.backends.cpu.get_cpu_capability()
    bf16_flags: tuple[str, ...]  # those of BF16_FLAGS that /proc/cpuinfo lists
    onednn_max_isa: str | None  # ONEDNN_MAX_CPU_ISA, upper-cased, None when unset
    mkl_instructions: str | None  # MKL_ENABLE_INSTRUCTIONS (recorded: it caps torch's fp32 GEMM)
    mkldnn: bool  # torch.backends.mkldnn.is_available()

    @property
    def kind(self) -> str:
        """Short name of the CPU kind for benchmark baselines: 'bf16' or 'avx2' / the capability."""
        return "bf16" if self.native_bf16_reason() is None else self.torch_capability.lower()

    def native_bf16_reason(self) -> str | None:
        """None when bf16 matmul is native here, else why not."""
        if not self.bf16_flags:
            return "the CPU has no avx512_bf16 / amx_bf16 (/proc/cpuinfo)"
        if self.torch_capability != "AVX512":
            return f"torch CPU capability is {self.torch_capability} (ATEN_CPU_CAPABILITY caps it below AVX512)"
        if self.onednn_max_isa is not None and self.onednn_max_isa not in _ONEDNN_BF16_ISAS:
            return f"ONEDNN_MAX_CPU_ISA={self.onednn_max_isa} caps oneDNN below AVX512_CORE_BF16"
        if not self.mkldnn:
            return "torch was built without oneDNN (mkldnn), which runs its native bf16 matmul"
        return None

    def as_dict(self) -> dict:
        return {
            "torch_capability": self.torch_capability,
            "bf16_flags": list(self.bf16_flags),
            "onednn_max_isa": self.onednn_max_isa,
            "mkl_instructions": self.mkl_instructions,
            "mkldnn": self.mkldnn,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class ScreenChoice:
    """The screening precisions and why they were chosen: ``precision`` (``bf16`` or ``fp32``:
    empirical_denoise) and ``knn_precision`` (``int8``, ``bf16`` or ``fp32``), with
    ``int8_levels`` the largest magnitude of the int8 training rows (127 or 63; None without int8)."""

    precision: str
    reason: str
    caps: CpuCaps
    knn_precision: str = ""
    knn_reason: str = ""
    int8_levels: int | None = None

    def __post_init__(self):
        if not self.knn_precision:  # knn follows the float choice
            object.__setattr__(self, "knn_precision", self.precision)
            object.__setattr__(self, "knn_reason", self.reason)

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "reason": self.reason,
            "knn_precision": self.knn_precision,
            "knn_reason": self.knn_reason,
            "int8_levels": self.int8_levels,
            "caps": self.caps.as_dict(),
        }


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def read_caps() -> CpuCaps:
    """Query the machine and the environment (not cached; see :func:`cpu_caps`)."""
    flags = _cpuinfo_flags()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() or None
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper() or None
    return CpuCaps(
        torch.backends.cpu.get_cpu_capability(),
        tuple(f for f in BF16_FLAGS if f in flags),
        isa,
        mkl,
        bool(torch.backends.mkldnn.is_available()),
    )


def choose_screen(value: str | None, caps: CpuCaps, bf16_probe=lambda: True, int8_probe=lambda: None) -> ScreenChoice:
    """The choice for a value of DIFFCORE_CPU_SCREEN (None or '' = auto) on a machine with ``caps``;
    ``bf16_probe()`` (run only where auto would pick bf16) says whether torch's bf16 matmul meets
    the bound's contract (:func:`bf16_matmul_accumulates_in_fp32`); ``int8_probe()`` (run for auto
    and int8) gives the int8 levels at which torch's int8 GEMM is exact, or None
    (:func:`int8_gemm_levels`)."""
    value = (value or "auto").strip().lower() or "auto"
    if value not in SCREEN_VALUES:
        raise ValueError(f"{SCREEN_VAR}: expected one of {', '.join(SCREEN_VALUES)}, got {value!r}")
    if value in ("bf16", "fp32"):
        return ScreenChoice(value, f"forced by {SCREEN_VAR}={value}", caps)
    float_choice = _choose_float_screen(caps, bf16_probe)
    levels = int8_probe()
    if levels is None:
        if value == "int8":
            raise ValueError(
                f"{SCREEN_VAR}=int8: torch's int8 GEMM (torch._int_mm) is not exact on this machine "
                "at any range the screen can use (probe failed); use auto, bf16 or fp32"
            )
        return float_choice
    why = f"forced by {SCREEN_VAR}=int8" if value == "int8" else "torch's int8 GEMM is exact here"
    return ScreenChoice(
        float_choice.precision,
        float_choice.reason,
        caps,
        "int8",
        f"{why} (probed; training rows at +-{levels})",
        levels,
    )


def _choose_float_screen(caps: CpuCaps, bf16_probe) -> ScreenChoice:
    why_not = caps.native_bf16_reason()
    if why_not is None and not bf16_probe():
        why_not = "torch's bf16 matmul does not accumulate in fp32 here (probe failed)"
    if why_not is None:
        return ScreenChoice(
            "bf16", f"native bf16 matmul ({', '.join(caps.bf16_flags)}, torch {caps.torch_capability})", caps
        )
    return ScreenChoice("fp32", f"no native bf16 matmul: {why_not}", caps)


@functools.lru_cache(maxsize=1)
def cpu_caps() -> CpuCaps:
    """This process's capabilities (queried once)."""
    return read_caps()


@functools.lru_cache(maxsize=1)
def screen_choice() -> ScreenChoice:
    """This process's screening precision (decided once, on first use)."""
    return choose_screen(os.environ.get(SCREEN_VAR), cpu_caps(), bf16_matmul_accumulates_in_fp32, int8_gemm_levels)


@functools.lru_cache(maxsize=1)
def bf16_matmul_accumulates_in_fp32() -> bool:
    """Whether torch's CPU bf16 matmul meets the contract the screening bound assumes: products of
    bf16 inputs accumulated in fp32, the output rounded to bf16 once.

    Probe: rows of +-1 (plus exact multiples of 1/64) whose partial sums climb to about D / 2 and
    cancel back to about 0. fp32 accumulation stays within gamma_D |q| |y| (about 1 here); any bf16
    rounding of a partial sum on the way is off by several units.
    """
    g = torch.Generator().manual_seed(0)
    dim = 4096
    signs = torch.ones(dim)
    signs[dim // 2 :] = -1
    q = (signs + torch.randint(-8, 8, (16, dim), generator=g) / 64).bfloat16()  # exact in bf16
    y = (1 + torch.randint(-8, 8, (24, dim), generator=g) / 64).bfloat16()
    exact = q.double() @ y.double().t()
    got = (q @ y.t()).double()
    unit = 2.0**-24
    gamma = dim * unit / (1 - dim * unit)
    bound = gamma * q.double().norm(dim=1)[:, None] * y.double().norm(dim=1)[None, :] + 2.0**-8 * got.abs()
    return bool(((got - exact).abs() <= bound).all())


INT8_LEVELS = (127, 63)  # tried in this order: the most precise exact one is used


@functools.lru_cache(maxsize=1)
def int8_gemm_levels() -> int | None:
    """The largest magnitude L in INT8_LEVELS (127, then 63) at which ``torch._int_mm(a, b.t())``
    is exact for ``a`` in [-127, 127] and ``b`` in [-L, L], or None (no such L, or no _int_mm).

    Integer sums are exact in any order as long as nothing saturates: the probe puts every
    operand at its extreme magnitudes, with equal and alternating signs (where pairwise 16-bit
    saturation, as in AVX2's u8 x s8 multiply-add, shows at once), and random values.
    """
    from diffcore.ops import _torch_compat

    if not _torch_compat.has_int_mm():
        return None
    for levels in INT8_LEVELS:
        try:
            # two shapes: oneDNN may pick different kernels for small and for tile-sized products
            if all(_int_mm_exact(levels, *shape) for shape in ((32, 40, 512), (192, 640, 1536))):
                return levels
        except RuntimeError:
            return None
    return None


def _int_mm_exact(levels: int, rows_a: int, rows_b: int, dim: int) -> bool:
    g = torch.Generator().manual_seed(levels)
    alternating = torch.ones(dim)
    alternating[1::2] = -1
    extremes_a = torch.stack(
        [
            torch.full((dim,), 127.0),
            torch.full((dim,), -127.0),
            127 * alternating,
            -127 * alternating,
            torch.full((dim,), -1.0),
        ]
    )
    extremes_b = levels * torch.stack([torch.ones(dim), -torch.ones(dim), alternating, -alternating])
    a = torch.cat([extremes_a, torch.randint(-127, 128, (rows_a - 5, dim), generator=g).float()])
    b = torch.cat([extremes_b, torch.randint(-levels, levels + 1, (rows_b - 4, dim), generator=g).float()])
    from diffcore.ops._torch_compat import int_mm

    got = int_mm(a.to(torch.int8), b.to(torch.int8).t())
    return torch.equal(got.double(), a.double() @ b.double().t())


@contextlib.contextmanager
def fp32_matmul_at_full_precision():
    """fp32 matmuls inside run in fp32 arithmetic (the screening bounds are proven for it):
    ``torch.set_float32_matmul_precision('medium'/'high')`` would let oneDNN use bf16 inside."""
    saved = torch.get_float32_matmul_precision()
    if saved != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if saved != "highest":
            torch.set_float32_matmul_precision(saved)


def screen_precision() -> str:
    """'bf16' or 'fp32': the precision of the CPU screening GEMMs of empirical_denoise."""
    return screen_choice().precision


def knn_screen_precision() -> str:
    """'int8', 'bf16' or 'fp32': the precision of the CPU screening GEMMs of knn."""
    return screen_choice().knn_precision
