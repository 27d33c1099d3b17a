"""95% intervals for headline numbers, and yes/no properties decided on them.

Every number a study reports as a result carries an :class:`Interval`:

- across training seeds when the preset trains three or more (:func:`seed_interval`: mean and a
  Student-t interval of the mean);
- by bootstrap over samples or noise seeds otherwise (:func:`bootstrap_interval`, percentile
  bootstrap of any statistic, resampling rows with a fixed generator so the interval is
  reproducible);
- for a fraction of n yes/no outcomes (GL, RP, memorized share, attack success) by the Wilson score
  interval (:func:`wilson_interval`), which stays inside [0, 1] and is not degenerate at 0 or n.

Properties ("the curve dips", "A is larger than B") are decided on intervals, never on point
estimates: :func:`clearly_below` holds only when the upper end of one interval lies below the lower
end of the other, so a property that holds is one the sampling error cannot explain.

Intervals are JSON-able through :meth:`Interval.as_dict` (``{"value", "low", "high", "level",
"method", "n"}``) so results.json records the numbers behind every decision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95
"""The coverage of every interval the studies report."""

BOOTSTRAP_RESAMPLES = 2000
"""Bootstrap resamples; the interval's ends move by well under its width between generators."""


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``level``.

    ``method`` names how it was made (``"seeds-t"``, ``"bootstrap"``, ``"wilson"``, ``"exact"``)
    and ``n`` the number of independent units behind it (seeds, samples, outcomes).
    """

    value: float
    low: float
    high: float
    level: float = LEVEL
    method: str = "exact"
    n: int = 1

    def __post_init__(self) -> None:
        if not (self.low <= self.value <= self.high) and all(
            math.isfinite(v) for v in (self.low, self.value, self.high)
        ):
            raise ValueError(f"interval [{self.low}, {self.high}] does not hold its value {self.value}")

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict:
        """``{"value", "low", "high", "level", "method", "n"}``, in that order (results.json's form)."""
        return dataclasses.asdict(self)


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name}: no values")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: non-finite values")
    return arr


def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile (two-sided ``p`` coverage) by bisection on the regularized beta CDF."""
    # The t CDF via the incomplete beta function, evaluated with a continued fraction (Numerical
    # Recipes' betacf), is more code than needed: df is small (seeds), so integrate the density.
    if df <= 0:
        raise ValueError("df must be positive")
    target = 0.5 + p / 2.0
    coef = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t: float) -> float:
        # Simpson's rule on [0, t] of the t density, 2000 panels: error far below 1e-8 for t < 100.
        n = 2000
        h = t / n
        xs = np.linspace(0.0, t, n + 1)
        ys = coef * (1.0 + xs * xs / df) ** (-(df + 1) / 2)
        return 0.5 + h / 3.0 * float(ys[0] + ys[-1] + 4 * ys[1:-1:2].sum() + 2 * ys[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < target:
        hi *= 2.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def seed_interval(values: Sequence[float] | np.ndarray, *, level: float = LEVEL) -> Interval:
    """Mean over independent runs (training seeds) with a Student-t interval of the mean.

    Needs at least two values; the studies use it when a preset trains three or more seeds.
    """
    arr = _as_1d(values, "values")
    n = arr.size
    if n < 2:
        raise ValueError("seed_interval needs at least two values (train three or more seeds)")
    mean = float(arr.mean())
    sem = float(arr.std(ddof=1)) / math.sqrt(n)
    half = _t_quantile(level, n - 1) * sem
    return Interval(mean, mean - half, mean + half, level, "seeds-t", n)


def wilson_interval(successes: int, n: int, *, level: float = LEVEL) -> Interval:
    """Wilson score interval of a fraction ``successes / n`` (value: the plain fraction)."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    z = _normal_quantile(0.5 + level / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)), level, "wilson", n)


def _normal_quantile(q: float) -> float:
    """Standard normal quantile by bisection on erf (exact to ~1e-12)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] | None = None,
    *,
    level: float = LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over rows of ``values``.

    ``values`` is ``[n]`` or ``[n, ...]`` (rows are resampled together, e.g. paired measurements
    ``[n, 2]``); ``statistic`` maps a resample of the same shape to a float. The generator is
    seeded, so the same data give the same interval.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError("values: no rows")
    if not np.all(np.isfinite(arr)):
        raise ValueError("values: non-finite values")
    if resamples < 100:
        raise ValueError("resamples must be at least 100")
    stat = statistic if statistic is not None else (lambda a: float(np.mean(a)))
    n = arr.shape[0]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples, dtype=np.float64)
    for i in range(resamples):
        draws[i] = stat(arr[rng.integers(0, n, size=n)])
    value = float(stat(arr))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return Interval(value, float(min(low, value)), float(max(high, value)), level, "bootstrap", n)


def ratio_interval(
    numerator: Sequence[float] | np.ndarray, denominator: Sequence[float] | np.ndarray, *, level: float = LEVEL
) -> Interval:
    """Ratio of the geometric means of two independent samples of positive values, with a Welch
    t interval computed on their logarithms and mapped back (method ``"welch-log"``).

    For repeated measurements of a cost, e.g. the CPU-seconds per training image of each stretch of
    two training runs: ``value = exp(mean log a - mean log b)``. Welch's degrees of freedom are
    rounded down (a wider, conservative interval). Needs at least two values on each side; ``n``
    records the smaller count.
    """
    a, b = _as_1d(numerator, "numerator"), _as_1d(denominator, "denominator")
    if a.size < 2 or b.size < 2:
        raise ValueError(f"ratio_interval needs at least two values on each side, got {a.size} and {b.size}")
    if np.any(a <= 0) or np.any(b <= 0):
        raise ValueError("ratio_interval: values must be positive")
    la, lb = np.log(a), np.log(b)
    va, vb = float(la.var(ddof=1)) / a.size, float(lb.var(ddof=1)) / b.size
    centre, se = float(la.mean() - lb.mean()), math.sqrt(va + vb)
    half = 0.0  # no spread on either side: the interval is the point
    if se > 0.0:
        df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
        half = _t_quantile(level, max(1, int(df))) * se
    n = min(a.size, b.size)
    return Interval(math.exp(centre), math.exp(centre - half), math.exp(centre + half), level, "welch-log", n)


def interval_of(values: Sequence[float] | np.ndarray, *, seeds: bool, level: float = LEVEL) -> Interval:
    """The studies' rule: :func:`seed_interval` across 3+ training seeds, else the bootstrap."""
    arr = _as_1d(values, "values")
    if seeds and arr.size >= 3:
        return seed_interval(arr, level=level)
    return bootstrap_interval(arr, level=level)


def clearly_below(a: Interval, b: Interval) -> bool:
    """True when ``a`` lies below ``b`` beyond sampling error: ``a.high < b.low``."""
    return a.high < b.low


def clearly_above(a: Interval, b: Interval) -> bool:
    """True when ``a`` lies above ``b`` beyond sampling error: ``a.low > b.high``."""
    return a.low > b.high


def dips(curve: Sequence[Interval]) -> dict:
    """Decide whether a curve of intervals dips: its minimum lies clearly below both ends.

    Returns ``{"holds", "at", "min", "first", "last"}`` (the index of the minimum point estimate
    and the three intervals as dicts), the record a study writes for the claim.
    """
    if len(curve) < 3:
        raise ValueError("a dip needs at least three points")
    at = int(np.argmin([c.value for c in curve]))
    holds = 0 < at < len(curve) - 1 and clearly_below(curve[at], curve[0]) and clearly_below(curve[at], curve[-1])
    return {
        "holds": bool(holds),
        "at": at,
        "min": curve[at].as_dict(),
        "first": curve[0].as_dict(),
        "last": curve[-1].as_dict(),
    }


def claim(holds: bool, **numbers) -> dict:
    """One claim's record for results.json: ``{"holds": bool, ...numbers}``; intervals as dicts."""
    out: dict = {"holds": bool(holds)}
    for key, value in numbers.items():
        out[key] = value.as_dict() if isinstance(value, Interval) else value
    return out


def bootstrap_sums(
    rows: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    level: float = LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap of a statistic of column sums, vectorized over resamples.

    ``rows`` is ``[n, k]`` (or ``[n]``): per-unit additive terms (e.g. per noisy image the squared
    norms ``|D - D_ref|^2`` and ``|D_ref|^2``); ``statistic`` maps sums ``[R, k]`` to ``[R]``
    (e.g. ``sqrt(s[:, 0] / s[:, 1])``, a relative Frobenius distance; ``s / n`` for a mean, n is
    fixed). Resamples draw rows with replacement as multinomial counts, so ratios of sums (which
    :func:`bootstrap_interval` would recompute row by row) cost one matrix product per block.
    """
    return bootstrap_sums_each(rows, {"": statistic}, level=level, resamples=resamples, seed=seed)[""]


def bootstrap_sums_each(
    rows: Sequence[float] | np.ndarray,
    statistics: dict[str, Callable[[np.ndarray], np.ndarray]],
    *,
    level: float = LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Interval]:
    """:func:`bootstrap_sums` of several statistics of the same rows, on the same resamples
    (so differences between them are paired): ``{name: Interval}``."""
    arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"rows: expected [n, k] with n >= 1, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("rows: non-finite values")
    if resamples < 100:
        raise ValueError("resamples must be at least 100")
    n = arr.shape[0]
    rng = np.random.default_rng(seed)
    sums = []
    block = max(1, min(resamples, 2_000_000 // n))  # bound the [block, n] count matrix
    for start in range(0, resamples, block):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(block, resamples - start))
        sums.append(counts.astype(np.float64) @ arr)
    resampled, full = np.concatenate(sums), arr.sum(axis=0, keepdims=True)
    alpha = (1.0 - level) / 2.0
    out = {}
    for name, statistic in statistics.items():
        draws = np.asarray(statistic(resampled), dtype=np.float64).reshape(-1)
        value = float(np.asarray(statistic(full)).reshape(-1)[0])
        low, high = np.quantile(draws[np.isfinite(draws)], [alpha, 1.0 - alpha])
        out[name] = Interval(value, float(min(low, value)), float(max(high, value)), level, "bootstrap", n)
    return out


def fraction_interval(successes: Sequence[int] | np.ndarray, n: int, *, level: float = LEVEL) -> Interval:
    """A fraction's interval by the studies' rule: Wilson for one run's ``successes`` of ``n``,
    :func:`seed_interval` of the per-run fractions for 3+ training seeds, and Wilson of the pooled
    counts for two (labelled ``"wilson-pooled"``: it omits the between-seed spread)."""
    counts = [int(s) for s in np.asarray(successes).reshape(-1)]
    if not counts:
        raise ValueError("successes: no runs")
    if len(counts) >= 3:
        return seed_interval([s / n for s in counts], level=level)
    pooled = wilson_interval(sum(counts), n * len(counts), level=level)
    if len(counts) == 1:
        return pooled
    return dataclasses.replace(pooled, method="wilson-pooled")


def flat(name: str, interval: Interval) -> dict:
    """``{name: value, name_low: low, name_high: high}``: an interval as flat CSV-friendly columns."""
    return {name: interval.value, f"{name}_low": interval.low, f"{name}_high": interval.high}
