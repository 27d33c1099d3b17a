"""CPU host code of the empirical denoiser (``diffcore.ops.empirical_denoise``): torch GEMM tiles
and the fused C++ work between them (csrc/empirical_denoise/empirical_denoise.cpp).

Also the logit tolerances and the GEMM error bounds (proven, and the measured fp32 coefficient the
Triton runner shares; docs/design.md, Numerics; the op's docstring in ``_empirical_denoise.py`` explains
the method). The screening precision (bf16 or fp32) is the process's choice, diffcore._cpu_caps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from diffcore._checks import MAX_MAGNITUDE, refuse_magnitude
from diffcore._cpu_caps import bf16_matmul_accumulates_in_fp32, fp32_matmul_at_full_precision, screen_precision
from diffcore._ext import dtype_name, extension

# Logit tolerances shared by the fast backends (docs/design.md, Numerics).
# A pair whose logit upper bound lies BAND below the running lower bound of the max weighs less than
# exp(-BAND) ~ 1e-26 of the largest weight: it is dropped.
BAND = 60.0
# A pair that may carry weight is re-scored exactly when its logit error bound exceeds this: a
# relative weight error of at most about RESCORE_TOL by the bound.
RESCORE_TOL = 1e-5
# Queries whose float64 distance sums could move a logit difference by more than this take the path
# with relative (double-double) logits: needs_relative_logits.
TINY_LOGIT_TOL = 1e-6
FP32_UNIT_ROUNDOFF = 2.0**-24
FP64_UNIT_ROUNDOFF = 2.0**-53
SCREEN_MIN_DIM = 256  # below this the candidate screening pass does not pay
NO_BUDGET = -1  # rescore_budget value: re-score every pair that needs it
COUNT_ONLY = -3  # rescore_budget value: only count the pairs that would be re-scored
# Candidate pairs kept per row by the screening pass (16 bytes each): at least SCREEN_CANDIDATES,
# more while all lists together stay under SCREEN_LIST_BYTES. Before a query meets its nearest
# training points every pair within BAND of the best so far is a candidate (a few % of the rows at
# sigma ~ 1, D = 3072); a list that overflows costs that query a second screening pass.
SCREEN_CANDIDATES = 256
SCREEN_LIST_BYTES = 4 << 20
SCREEN_CANDIDATES_MAX = 4096


def screen_candidates(batch: int) -> int:
    """Length of each query's candidate list for a batch of ``batch`` queries."""
    return int(max(SCREEN_CANDIDATES, min(SCREEN_CANDIDATES_MAX, SCREEN_LIST_BYTES // (16 * batch))))


def gamma(terms: int, unit: float) -> float:
    """``gamma_n = n u / (1 - n u)``: the worst-case relative error of a dot product of ``n`` terms
    in floating point with unit roundoff ``u``, whatever the summation order (Higham, Accuracy and
    Stability of Numerical Algorithms, Eq. 3.5): ``|fl(x.y) - x.y| <= gamma_n |x|.|y| <= gamma_n |x||y|``."""
    nu = terms * unit
    if nu >= 0.5:
        raise ValueError(f"dim: {terms} terms is too many for the unit roundoff {unit:g} (n u >= 1/2)")
    return nu / (1.0 - nu)


def fp32_gemm_error_bound(dim: int) -> float:
    """``k`` in ``|G - x.y| <= k |x| |y|`` for an fp32 GEMM over ``dim`` terms, proven for any
    summation order the BLAS may use: ``gamma_{dim+1}`` (the one more rounding covers the fp32
    decoding of uint8 rows, u8 / 127.5 - 1; fp32 rows are exact)."""
    return gamma(dim + 1, FP32_UNIT_ROUNDOFF)


def fp64_gemm_error_bound(dim: int) -> float:
    """As :func:`fp32_gemm_error_bound`, for a float64 GEMM of float32 (or uint8-decoded) rows."""
    return gamma(dim + 1, FP64_UNIT_ROUNDOFF)


def measured_fp32_gemm_error_coefficient(dim: int) -> float:
    """``k`` in ``|G - x.y| <= k |x| |y|`` as MEASURED for torch's blocked fp32 GEMM, not worst case:
    at dim 3072 at most 1.6 u |x||y| for x close to y, 0.44 u for noise-dominated x, 0.06 u on
    average; 2 u here, with a margin growing like a random walk beyond dim 4096. The CPU path uses it
    only where the proven :func:`fp32_gemm_error_bound` is too loose to be useful: dense tiles (large
    sigma, most pairs carry weight), whose accuracy is therefore measured, not proven."""
    return max(2.0, 2.0 * math.sqrt(dim / 4096.0)) * FP32_UNIT_ROUNDOFF


def logit_rounding_coefficient(dim: int) -> float:
    """``f`` in ``|fl(l) - l| <= f (|x| + |y|)^2 / (2 sigma^2)``: the float64 rounding of a logit
    computed from ``|x|^2 + |y|^2 - 2 x.y`` (or from an exact float64 distance sum of ``dim`` terms):
    ``gamma_{dim+4}`` with u = 2^-53. Negligible beside the GEMM error for data in [-1, 1]; it rules
    at tiny sigma and for huge values (:func:`needs_relative_logits`)."""
    return gamma(dim + 4, FP64_UNIT_ROUNDOFF)


def needs_relative_logits(logz: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """Queries [B] bool whose streamed logits (absolute, ``-|x - y|^2 / (2 sigma^2)`` from float64
    distance sums) may be off by more than TINY_LOGIT_TOL against each other: every pair that
    carries weight has ``|l| <= |logz| + log N + BAND``, and two such sums round by at most
    ``2 f |l|`` (:func:`logit_rounding_coefficient`). Tiny sigma (exact ties summed in different
    orders: sigma 1e-6 at D = 3072) or huge values; those queries are recomputed by the screening
    path, whose final step takes logits relative to the best candidate, in double-double where
    needed, as the float64 reference does."""
    reach = logz.abs() + math.log(rows) + BAND
    return ~(2.0 * logit_rounding_coefficient(dim) * reach <= TINY_LOGIT_TOL)  # NaN logz: recompute too


def bf16_gemm_error_coefficient(dim: int) -> float:
    """``k`` in ``|G~ - x.y| <= k |x| |y|`` for a bf16 GEMM (inputs rounded to bf16, fp32
    accumulation, result rounded to bf16), by Cauchy-Schwarz on ``sum |x_k y_k|``: input rounding
    ``2 u + u^2`` (u = 2^-9; uint8 rows are decoded in fp32 first, 2^-23 more), worst-case fp32
    accumulation ``dim * 2^-24``, output rounding ``u``, with 1% to spare."""
    unit = 2.0**-9
    return 1.01 * (3 * unit + unit * unit + 2.0**-23 + dim * FP32_UNIT_ROUNDOFF * (1 + 3 * unit))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def cpu_tile_rows(batch: int, rows: int, dim: int, train_dtype: torch.dtype, screen: bool = False) -> int:
    """Training rows per tile on the CPU: the [B, T] weight tile stays under 2 MiB, the [T, D]
    bf16 screening buffer (``screen``) under 4 MiB, the [T, D] fp32 decode buffer of uint8 / non-fp32
    training sets under 8 MiB; at least 64 rows so that the GEMM stays efficient, at most N; a
    multiple of 64 (MKL's fp32 GEMM ran 25-30% slower on 2730-row tiles than on 2688, measured)."""
    tile = max(64, (2 << 20) // (4 * batch))
    if screen:
        tile = min(tile, max(64, (4 << 20) // (2 * dim)))
    if train_dtype != torch.float32:
        tile = min(tile, max(64, (8 << 20) // (4 * dim)))
    return int(min(rows, tile // 64 * 64, 4096))


@dataclass
class _Queries:
    """Per-query state of the CPU path: fp32 rows, norms, 1/(2 sigma^2), running log-sum-exp."""

    x: torch.Tensor  # [B, D] float32
    x_sqnorm: torch.Tensor  # [B] float64
    inv2s2: torch.Tensor  # [B] float64
    run_max: torch.Tensor  # [B] float64, max of the logits used so far
    run_max_lower: torch.Tensor  # [B] float64, lower bound of the largest logit of the whole set
    run_sum: torch.Tensor  # [B] float64, sum of exp(l - run_max)
    scale: torch.Tensor  # [B] float32, exp(old max - new max) of the last tile
    acc: torch.Tensor | None  # [B, D] float32, sum of exp(l - run_max) y (created by _stream)

    @classmethod
    def create(cls, x: torch.Tensor, inv2s2: torch.Tensor, threads: int, lower: torch.Tensor | None = None):
        batch, dim = x.shape
        x_sqnorm = torch.empty(batch, dtype=torch.float64)
        extension().empirical_denoise_row_sqnorms(
            y_ptr=x.data_ptr(),
            dtype="float32",
            rows=batch,
            dim=dim,
            ld=dim,
            out_ptr=x_sqnorm.data_ptr(),
            threads=threads,
        )
        lower = torch.full((batch,), -math.inf, dtype=torch.float64) if lower is None else lower.clone()
        return cls(
            x,
            x_sqnorm,
            inv2s2.contiguous(),
            torch.full((batch,), -math.inf, dtype=torch.float64),
            lower,
            torch.zeros(batch, dtype=torch.float64),
            torch.empty(batch, dtype=torch.float32),
            None,
        )

    def state(self, threads: int) -> dict:
        """The running state as keyword arguments of ``_C.empirical_denoise_tile_update``."""
        return dict(
            m_ptr=self.run_max.data_ptr(),
            mlow_ptr=self.run_max_lower.data_ptr(),
            s_ptr=self.run_sum.data_ptr(),
            scale_ptr=self.scale.data_ptr(),
            threads=threads,
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.acc is None:
            raise RuntimeError("empirical_denoise: the accumulator was never created (no training tile ran)")
        return self.acc.div_(self.run_sum.to(torch.float32)[:, None]), self.run_max + torch.log(self.run_sum)


@dataclass
class _TrainSet:
    """Training rows [N, D] (float32 or uint8), their float64 squared norms, and the tiling."""

    y: torch.Tensor
    y_sqnorm: torch.Tensor
    tile: int

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.y.dtype)

    def tiles(self):
        for start in range(0, self.y.shape[0], self.tile):
            yield start, self.y[start : start + self.tile]


def _tile_inputs(queries: _Queries, data: _TrainSet, start: int, y_tile: torch.Tensor) -> dict:
    """The query and training-tile arguments of ``_C.empirical_denoise_tile_update``, by name."""
    dim = queries.x.shape[1]
    return dict(
        x_ptr=queries.x.data_ptr(),
        x_ld=dim,
        dim=dim,
        xn2_ptr=queries.x_sqnorm.data_ptr(),
        inv2s2_ptr=queries.inv2s2.data_ptr(),
        y_ptr=y_tile.data_ptr(),
        y_dtype=data.dtype_name,
        y_ld=dim,
        yn2_ptr=data.y_sqnorm[start:].data_ptr(),
        rounding_coef=logit_rounding_coefficient(dim),
    )


def run(x, train, sigma64, tile_rows: int | None = None, screen: bool = True, small: bool = True):
    """CPU backend: x [B, ...] float, train [N, ...], sigma64 [B] -> (out [B, D] float32, logz [B]
    float64); see docs/empirical_denoise.md.

    Small sigma (D >= 256): one screening pass (bf16 or fp32 GEMMs, diffcore._cpu_caps) collects
    each query's candidates, re-scored exactly (``_screen``); queries whose candidate list
    overflowed get a second screening pass with the global lower bound of their max logit.
    Otherwise (dense weights), or when that fails too: ``_stream`` with fp32 (then fp64) Gram tiles
    and a running log-sum-exp. Small rows and training sets (``uses_small_path``: the digits) take
    one C++ call instead (``_run_small``: an fp32 screen with exact re-scoring where few pairs carry
    weight, else a float64 Gram; ``small=False`` or ``tile_rows`` turn it off). Queries
    whose logits need more than float64 sums (``needs_relative_logits``) are redone by the
    screening path with relative logits."""
    threads = torch.get_num_threads()
    precision = screen_precision()
    if precision == "bf16" and not bf16_matmul_accumulates_in_fp32():
        raise RuntimeError(
            "empirical_denoise: DIFFCORE_CPU_SCREEN=bf16, but torch's bf16 matmul does not accumulate "
            "in fp32 on this machine (probe failed), so the screening bound would not hold; use "
            "DIFFCORE_CPU_SCREEN=fp32 or auto"
        )
    xr = _rows(x).to(torch.float32).contiguous()
    dim = xr.shape[1]
    y = _rows(train)
    if y.dtype not in (torch.float32, torch.uint8):
        y = y.to(torch.float32)  # float16/bfloat16/float64 training sets: one fp32 copy
    y = y.contiguous()
    inv2s2 = 0.5 / sigma64.square()
    if small and tile_rows is None and uses_small_path(y.shape[0], dim):
        out, logz, redo, _ = _run_small(xr, y, inv2s2, threads)
        if redo is None:
            return out, logz
        y_sqnorm = _row_sqnorms(y, threads)
    else:
        y_sqnorm = _row_sqnorms(y, threads)
        check_train_magnitude(y, y_sqnorm)
        out, logz, streamed = _run_rows(
            xr,
            inv2s2,
            y,
            y_sqnorm,
            train.dtype,
            tile_rows,
            screen and dim >= SCREEN_MIN_DIM,
            threads,
            precision,
            exact=False,
        )
        redo = streamed & needs_relative_logits(logz, y.shape[0], dim)
    if bool(redo.any()):  # tiny sigma or huge values: again with logits relative to the best row
        out[redo], logz[redo], _ = _run_rows(
            xr[redo], inv2s2[redo], y, y_sqnorm, train.dtype, tile_rows, True, threads, precision, exact=True
        )
    return out, logz


# The one-call path for small problems (csrc/empirical_denoise/small_dim.cpp): rows of at most
# SMALL_MAX_DIM values and training sets of at most SMALL_MAX_ELEMENTS values (its transposed
# float32 copy, and for uint8 a decoded one, at most 2 MiB each, stay in cache). Below
# SMALL_PARALLEL_MIN_WORK multiply-adds (B N D; the digits up to B = 291) it runs on one thread.
# Measured on the shared 2-vCPU machine at load 6-14 (bench/baselines/MEASUREMENTS.md,
# 2026-12-06): the 2-thread split was slower at every digits size (B = 16: 0.36 ms on one thread
# against 9.2 ms on two; B = 256: 3.6 against 12 ms; B = 1797: 45 against 53 ms); on a quiet
# machine it pays at B = 1797, so the split is kept for the largest calls only.
SMALL_MAX_DIM = 256
SMALL_MAX_ELEMENTS = 1 << 19
SMALL_PARALLEL_MIN_WORK = 1 << 25
# The small path's screen (fp32 Gram with a proven bound, exact re-scoring of the survivors) is tried
# for a query whose band in squared distance, 2 sigma^2 BAND, is at most SMALL_SCREEN_RATIO times
# the training set's spread (mean |y - mean y|^2): a prediction that few pairs survive. A query with
# more than small_screen_max_kept(N) survivors takes the float64 Gram after all (correct either
# way; only the time differs). Chosen by measurement on the digits, B = 256 (docs/empirical_denoise.md).
SMALL_SCREEN_RATIO = 0.5


def small_screen_max_kept(rows: int) -> int:
    """Survivors of the small path's screen above which a query takes the float64 Gram instead."""
    return max(16, rows // 12)


def uses_small_path(rows: int, dim: int) -> bool:
    """Whether a training set of ``rows`` x ``dim`` takes the one-call small path."""
    return dim <= SMALL_MAX_DIM and rows * dim <= SMALL_MAX_ELEMENTS


def float64_gram_error_bound(dim: int, train_dtype: torch.dtype) -> float:
    """``k`` in ``|G - x.y| <= k |x| |y|`` for the small path's float64 Gram of fp32 rows: every
    product exact, ``dim - 1`` roundings, ``gamma_dim`` (u = 2^-53); uint8 rows are read as their
    float32 roundings, one more ``2^-24``."""
    return gamma(dim, FP64_UNIT_ROUNDOFF) + (FP32_UNIT_ROUNDOFF if train_dtype == torch.uint8 else 0.0)


def _row_sqnorms(y: torch.Tensor, threads: int) -> torch.Tensor:
    """|y_i|^2 [N] float64 of float32 / uint8 rows [N, D] (uint8 as u8 / 127.5 - 1)."""
    y_sqnorm = torch.empty(y.shape[0], dtype=torch.float64)
    extension().empirical_denoise_row_sqnorms(
        y_ptr=y.data_ptr(),
        dtype=dtype_name(y.dtype),
        rows=y.shape[0],
        dim=y.shape[1],
        ld=y.shape[1],
        out_ptr=y_sqnorm.data_ptr(),
        threads=threads,
    )
    return y_sqnorm


@dataclass
class SmallStats:
    """What the small path did: queries finished by the screen, their surviving pairs in all, and
    those of them finished by the first, partial screen (a quarter of the columns)."""

    screened: int
    kept: int
    partial: int


def _run_small(xr: torch.Tensor, y: torch.Tensor, inv2s2: torch.Tensor, threads: int):
    """The small path in one C++ call: (out [B, D] float32, logz [B] float64, redo [B] bool or None:
    the rows that need relative logits, needs_relative_logits, computed there; SmallStats). Refuses
    training values above MAX_MAGNITUDE and NaN / Inf, naming ``train``."""
    batch, dim = xr.shape
    out = torch.empty(batch, dim, dtype=torch.float32)
    logz = torch.empty(batch, dtype=torch.float64)
    redo = torch.empty(batch, dtype=torch.uint8)
    inv2s2 = inv2s2.contiguous()
    largest, flagged, screened, kept, partial = extension().empirical_denoise_small_dim(
        x_ptr=xr.data_ptr(),
        y_ptr=y.data_ptr(),
        y_dtype=dtype_name(y.dtype),
        batch=batch,
        rows=y.shape[0],
        dim=dim,
        inv2s2_ptr=inv2s2.data_ptr(),
        gemm_err_coef=float64_gram_error_bound(dim, y.dtype),
        fp32_err_coef=fp32_gemm_error_bound(dim),
        rounding_coef=logit_rounding_coefficient(dim),
        rescore_tol=RESCORE_TOL,
        band=BAND,
        tiny_tol=TINY_LOGIT_TOL,
        screen_ratio=SMALL_SCREEN_RATIO,
        screen_max_kept=small_screen_max_kept(y.shape[0]),
        out_ptr=out.data_ptr(),
        logz_ptr=logz.data_ptr(),
        redo_ptr=redo.data_ptr(),
        parallel_min_work=SMALL_PARALLEL_MIN_WORK,
        threads=threads,
    )
    refuse_magnitude("train", largest, y)
    return out, logz, (redo.bool() if flagged else None), SmallStats(screened, kept, partial)


def check_train_magnitude(y: torch.Tensor, y_sqnorm: torch.Tensor) -> None:
    """Refuse training values of magnitude above MAX_MAGNITUDE, from the float64 squared norms the
    path computes anyway (an element scan only when a norm is that large; NaN / Inf are left to the
    op's check of the result, which names them)."""
    largest_norm = float(y_sqnorm.max())
    if largest_norm > MAX_MAGNITUDE**2 and y.dtype != torch.uint8:
        refuse_magnitude("train", float(y.abs().max()))


def _run_rows(xr, inv2s2, y, y_sqnorm, train_dtype, tile_rows, screen, threads, precision, exact):
    """The queries xr [B, D] against the training rows y: screening (``screen``) then streaming for
    what screening leaves. Returns (out [B, D] float32, logz [B] float64, streamed [B] bool: the rows
    finished by the streaming pass). ``exact`` (queries that need relative logits,
    needs_relative_logits): never stream; rows whose candidate lists overflow twice (thousands of
    pairs within the band at tiny sigma, or huge values) are computed by the float64 reference."""
    batch, dim = xr.shape
    data = _TrainSet(
        y, y_sqnorm, tile_rows or cpu_tile_rows(batch, y.shape[0], dim, train_dtype, screen and precision == "bf16")
    )
    queries = _Queries.create(xr, inv2s2, threads)
    if not screen:
        _stream(queries, data, threads, screen=None)
        return (*queries.result(), torch.ones(batch, dtype=torch.bool))

    out = torch.empty(batch, dim, dtype=torch.float32)
    logz = torch.empty(batch, dtype=torch.float64)
    todo = torch.arange(batch)
    dense = False
    for _attempt in range(2):
        finished = _screen(queries, data, threads, out, logz, todo, precision, probe_dense=not exact)
        if finished is None:  # dense weights: screening cannot help; larger fp32 tiles
            dense = True
            data = _TrainSet(y, y_sqnorm, tile_rows or cpu_tile_rows(batch, y.shape[0], dim, train_dtype, False))
            break
        todo = todo[~finished]
        if todo.numel() == 0:
            return out, logz, torch.zeros(batch, dtype=torch.bool)
        # again for the rows whose candidates overflowed, now knowing their global lower bound
        queries = _Queries.create(xr[todo], queries.inv2s2[~finished], threads, queries.run_max_lower[~finished])
    if exact:
        from diffcore.ref.empirical_denoise import empirical_denoise_ref

        sigma = (0.5 / inv2s2[todo]).sqrt()
        rest_out, rest_logz = empirical_denoise_ref(xr[todo].double(), y, sigma)
        out[todo], logz[todo] = rest_out.float(), rest_logz
        return out, logz, torch.zeros(batch, dtype=torch.bool)
    _stream(queries, data, threads, screen=None if dense else precision)
    rest_out, rest_logz = queries.result()
    out[todo], logz[todo] = rest_out, rest_logz
    streamed = torch.zeros(batch, dtype=torch.bool)
    streamed[todo] = True
    return out, logz, streamed


def _screen(
    queries: _Queries,
    data: _TrainSet,
    threads: int,
    out: torch.Tensor,
    logz: torch.Tensor,
    rows: torch.Tensor,
    precision: str,
    probe_dense: bool = True,
) -> torch.Tensor | None:
    """Screening pass (bf16 or fp32 Gram tiles: ``precision``): raise each query's lower bound of
    its max logit and collect candidate pairs; finish (exact re-scoring into out[rows], logz[rows])
    the queries whose list did not overflow. Returns the finished mask over ``rows``, or None when
    the first rows already keep nearly all pairs (dense weights)."""
    ext = extension()
    batch, dim = queries.x.shape
    cap = screen_candidates(batch)
    cand_index = torch.empty(batch, cap, dtype=torch.int64)
    cand_upper = torch.empty(batch, cap, dtype=torch.float64)
    cand_count = torch.zeros(batch, dtype=torch.int64)
    gram_of = _ScreenGram(queries.x, data.tile, threads, precision)
    coef = gram_of.error_bound
    if probe_dense and _looks_dense(queries, data, gram_of, threads):
        return None
    # the running lower bounds of the max logits and the candidate lists, as both C++ steps take them
    lists: dict[str, Any] = dict(
        band=BAND,
        mlow_ptr=queries.run_max_lower.data_ptr(),
        cand_index_ptr=cand_index.data_ptr(),
        cand_upper_ptr=cand_upper.data_ptr(),
        cand_count_ptr=cand_count.data_ptr(),
        cap=cap,
        threads=threads,
    )
    for start, y_tile in data.tiles():
        count = y_tile.shape[0]
        gram = gram_of.gram(y_tile)
        ext.empirical_denoise_screen_collect(
            g_ptr=gram.data_ptr(),
            g_dtype=gram_of.dtype_name,
            g_ld=count,
            batch=batch,
            tile=count,
            start=start,
            xn2_ptr=queries.x_sqnorm.data_ptr(),
            inv2s2_ptr=queries.inv2s2.data_ptr(),
            yn2_ptr=data.y_sqnorm[start:].data_ptr(),
            gemm_err_coef=coef,
            rounding_coef=logit_rounding_coefficient(dim),
            **lists,
        )
    finished = cand_count <= cap
    if bool(finished.any()):  # exact re-scoring, written straight into out[rows], logz[rows]
        row_map = rows.to(torch.int64).contiguous()
        ext.empirical_denoise_screen_finalize(
            x_ptr=queries.x.data_ptr(),
            x_ld=dim,
            batch=batch,
            dim=dim,
            inv2s2_ptr=queries.inv2s2.data_ptr(),
            y_ptr=data.y.data_ptr(),
            y_dtype=data.dtype_name,
            y_ld=dim,
            row_map_ptr=row_map.data_ptr(),
            out_ptr=out.data_ptr(),
            logz_ptr=logz.data_ptr(),
            **lists,
        )
    return finished


DENSE_PROBE_ROWS = 256


def _looks_dense(queries: _Queries, data: _TrainSet, gram_of: _ScreenGram, threads: int) -> bool:
    """Whether the first DENSE_PROBE_ROWS training rows already keep more than 90% of their pairs
    (dense weights, large sigma: screening cannot help). Not 1/2: before a query meets its nearest
    points, many pairs look alike. A small probe, so that a dense case wastes little GEMM work."""
    batch = queries.x.shape[0]
    y_probe = data.y[: min(DENSE_PROBE_ROWS, data.tile)]
    count = y_probe.shape[0]
    gram = gram_of.gram(y_probe)
    wanted = extension().empirical_denoise_tile_update(
        g_ptr=gram.data_ptr(),
        g_dtype=gram_of.dtype_name,
        g_ld=count,
        p_ptr=gram.data_ptr(),
        batch=batch,
        tile=count,
        **_tile_inputs(queries, data, 0, y_probe),
        gemm_err_coef=gram_of.error_bound,
        rescore_tol=RESCORE_TOL,
        band=BAND,
        rescore_budget=COUNT_ONLY,
        **queries.state(threads),
    )[1]
    return wanted * 10 > 9 * batch * count


def _stream(queries: _Queries, data: _TrainSet, threads: int, screen: str | None) -> None:
    """Streaming pass over the training tiles with a running log-sum-exp. The Gram precision goes
    bf16 (``screen == "bf16"``: candidates only, each re-scored exactly) -> fp32 -> fp64, moving on
    for good when a tile would need too many exact re-scorings. An fp32 tile uses the proven bound;
    where that would re-score too many pairs (dense weights: most pairs carry weight) it uses the
    measured coefficient if that clears the tile (large sigma: accuracy measured, not proven), and
    so do the later tiles of the pass (they are dense too); else the rest of the pass uses float64
    Gram tiles (mid sigma at image sizes; proven)."""
    ext = extension()
    batch, dim = queries.x.shape
    queries.acc = torch.zeros(batch, dim, dtype=torch.float32)
    g_buffer = torch.empty(batch * data.tile, dtype=torch.float32)  # fp32 Gram tile, then the weights P
    convert_buffer = _LazyBuffer(data.tile * dim, torch.float32) if data.y.dtype == torch.uint8 else None
    mode = "bf16" if screen == "bf16" else "fp32"
    screen_gram = _ScreenGram(queries.x, data.tile, threads, "bf16") if mode == "bf16" else None
    fp32_coefficients: tuple[float, ...] = (fp32_gemm_error_bound(dim), measured_fp32_gemm_error_coefficient(dim))
    precise_gram: _PreciseGram | None = None
    state = queries.state(threads)
    for start, y_tile in data.tiles():
        count = y_tile.shape[0]
        p = g_buffer[: batch * count].view(batch, count)
        common = dict(
            p_ptr=p.data_ptr(),
            batch=batch,
            tile=count,
            **_tile_inputs(queries, data, start, y_tile),
            rescore_tol=RESCORE_TOL,
            band=BAND,
            **state,
        )
        y_float = None
        nonzero = -1
        if mode == "bf16":
            assert screen_gram is not None  # made above whenever the mode is bf16
            gram = screen_gram.gram(y_tile)
            nonzero, _ = ext.empirical_denoise_tile_update(
                g_ptr=gram.data_ptr(),
                g_dtype="bfloat16",
                g_ld=count,
                **common,
                gemm_err_coef=screen_gram.error_bound,
                rescore_budget=batch * count // 64,
            )
            if nonzero < 0:
                mode, screen_gram = "fp32", None
        if mode == "fp32":
            y_float = _tile_as_float32(y_tile, convert_buffer)
            with fp32_matmul_at_full_precision():
                torch.mm(queries.x, y_float.t(), out=p)
            for index, coefficient in enumerate(fp32_coefficients):  # proven first; measured: dense tiles
                nonzero, _ = ext.empirical_denoise_tile_update(
                    g_ptr=p.data_ptr(),
                    g_dtype="float32",
                    g_ld=count,
                    **common,
                    gemm_err_coef=coefficient,
                    rescore_budget=batch * count // 16,
                )
                if nonzero >= 0:
                    fp32_coefficients = fp32_coefficients[index:]
                    break
            if nonzero < 0:  # most pairs carry weight AND need exact logits (mid sigma, large D)
                mode, precise_gram = "fp64", _PreciseGram(queries.x, data.tile)
        if mode == "fp64":
            assert precise_gram is not None  # made when the mode changes to fp64
            gram = precise_gram.gram(y_tile)
            nonzero, _ = ext.empirical_denoise_tile_update(
                g_ptr=gram.data_ptr(),
                g_dtype="float64",
                g_ld=count,
                **common,
                gemm_err_coef=fp64_gemm_error_bound(dim),
                rescore_budget=NO_BUDGET,
            )
        if nonzero * 16 < batch * count:  # few weights (small sigma): skip the second GEMM
            ext.empirical_denoise_sparse_accumulate(
                p_ptr=p.data_ptr(),
                p_ld=count,
                batch=batch,
                tile=count,
                scale_ptr=queries.scale.data_ptr(),
                y_ptr=y_tile.data_ptr(),
                y_dtype=data.dtype_name,
                y_ld=dim,
                dim=dim,
                acc_ptr=queries.acc.data_ptr(),
                acc_ld=dim,
                threads=threads,
            )
        else:
            if y_float is None:
                y_float = _tile_as_float32(y_tile, convert_buffer)
            queries.acc.mul_(queries.scale[:, None]).addmm_(p, y_float)


class _LazyBuffer:
    """A flat buffer allocated on first use (the uint8 -> fp32 tile buffer is only needed when a
    tile leaves the bf16 screening)."""

    def __init__(self, numel: int, dtype: torch.dtype):
        self.numel, self.dtype = numel, dtype
        self.tensor: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = torch.empty(self.numel, dtype=self.dtype)
        return self.tensor


def _tile_as_float32(y_tile: torch.Tensor, convert_buffer: _LazyBuffer | None) -> torch.Tensor:
    """A training tile [T, D] as float32: a view for float32 rows, else u8 / 127.5 - 1 in the buffer."""
    if convert_buffer is None:
        return y_tile
    count, dim = y_tile.shape
    out = convert_buffer.get()[: count * dim].view(count, dim)
    extension().empirical_denoise_decode_rows(
        src_ptr=y_tile.data_ptr(),
        src_dtype="uint8",
        rows=count,
        dim=dim,
        dst_ptr=out.data_ptr(),
        dst_dtype="float32",
        threads=torch.get_num_threads(),
    )
    return out


class _ScreenGram:
    """x . y from the screening GEMM of ``precision``: bf16 (bf16 inputs, fp32 accumulation, bf16
    result; 2-3x faster than fp32 where bf16 matmul is native) or fp32. Used to find the few pairs
    that carry weight at small sigma (each then re-scored exactly). A tile not already in that dtype
    is decoded into one reused [T, D] buffer, each value rounded once from its exact value (uint8
    included). ``error_bound``: k in |G - x.y| <= k |x| |y|."""

    def __init__(self, xr: torch.Tensor, tile: int, threads: int, precision: str):
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.dtype_name = dtype_name(self.dtype)
        dim = xr.shape[1]
        self.error_bound = bf16_gemm_error_coefficient(dim) if precision == "bf16" else fp32_gemm_error_bound(dim)
        self.x = xr.to(self.dtype)
        self.buffer = _LazyBuffer(tile * dim, self.dtype)
        self.out = torch.empty(xr.shape[0] * tile, dtype=self.dtype)
        self.threads = threads

    def gram(self, y_tile: torch.Tensor) -> torch.Tensor:
        count, dim = y_tile.shape
        if y_tile.dtype == self.dtype:
            y_screen = y_tile
        else:
            y_screen = self.buffer.get()[: count * dim].view(count, dim)
            extension().empirical_denoise_decode_rows(
                src_ptr=y_tile.data_ptr(),
                src_dtype=dtype_name(y_tile.dtype),
                rows=count,
                dim=dim,
                dst_ptr=y_screen.data_ptr(),
                dst_dtype=self.dtype_name,
                threads=self.threads,
            )
        out = self.out[: self.x.shape[0] * count].view(self.x.shape[0], count)
        with fp32_matmul_at_full_precision():
            return torch.mm(self.x, y_screen.t(), out=out)


class _PreciseGram:
    """x . y in float64 for one tile at a time, converting the tile in chunks of rows so that the
    float64 copy stays under 4 MiB. Used where most pairs carry weight and the fp32 bound is too
    loose to keep their logits (mid sigma at image sizes): cheaper than exact re-scoring."""

    def __init__(self, xr: torch.Tensor, tile: int):
        self.x64 = xr.to(torch.float64)
        self.buffer = torch.empty(xr.shape[0] * tile, dtype=torch.float64)
        self.chunk = max(16, (4 << 20) // (8 * xr.shape[1]))

    def gram(self, y_tile: torch.Tensor) -> torch.Tensor:
        count = y_tile.shape[0]
        out = self.buffer[: self.x64.shape[0] * count].view(self.x64.shape[0], count)
        for c0 in range(0, count, self.chunk):
            block = y_tile[c0 : c0 + self.chunk].to(torch.float64)
            if y_tile.dtype == torch.uint8:
                block.div_(127.5).sub_(1.0)
            out[:, c0 : c0 + block.shape[0]] = self.x64 @ block.t()
        return out
