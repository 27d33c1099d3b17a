"""The interval machinery against known values and its decision rules."""

import math

import numpy as np
import pytest

from diffcore.metrics import intervals as iv


def test_t_quantile_matches_tables():
    # two-sided 95%: df=2 -> 4.303, df=4 -> 2.776, df=30 -> 2.042
    for df, expect in [(2, 4.3027), (4, 2.7764), (30, 2.0423)]:
        assert iv._t_quantile(0.95, df) == pytest.approx(expect, abs=2e-4)


def test_seed_interval_is_mean_plus_t_sem():
    vals = [1.0, 2.0, 3.0]
    got = iv.seed_interval(vals)
    half = 4.3027 * 1.0 / math.sqrt(3)
    assert got.value == pytest.approx(2.0)
    assert got.low == pytest.approx(2.0 - half, abs=1e-3) and got.high == pytest.approx(2.0 + half, abs=1e-3)
    assert got.method == "seeds-t" and got.n == 3
    with pytest.raises(ValueError, match="at least two"):
        iv.seed_interval([1.0])


def test_wilson_known_value_and_edges():
    got = iv.wilson_interval(5, 10)
    assert got.low == pytest.approx(0.2366, abs=1e-3) and got.high == pytest.approx(0.7634, abs=1e-3)
    zero = iv.wilson_interval(0, 20)
    assert zero.value == 0.0 and zero.low == 0.0 and zero.high > 0.1
    with pytest.raises(ValueError, match="successes"):
        iv.wilson_interval(11, 10)


def test_bootstrap_is_reproducible_and_covers_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, size=400)
    a, b = iv.bootstrap_interval(x), iv.bootstrap_interval(x)
    assert a == b
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert a.low < x.mean() < a.high
    assert a.half_width == pytest.approx(1.96 * se, rel=0.15)
    with pytest.raises(ValueError, match="non-finite"):
        iv.bootstrap_interval([1.0, float("nan")])


def test_ratio_interval_known_value_and_coverage():
    # Equal spreads, n = 3 each: Welch df = 4 exactly, so the half-width on the log scale is
    # t(0.95, 4) * sqrt(2 * var / 3).
    a, b = [2.0, 4.0, 8.0], [1.0, 2.0, 4.0]
    got = iv.ratio_interval(a, b)
    half = 2.7764 * math.sqrt(2 * math.log(2.0) ** 2 / 3)
    assert got.value == pytest.approx(2.0)
    assert got.low == pytest.approx(2.0 * math.exp(-half), rel=1e-3)
    assert got.high == pytest.approx(2.0 * math.exp(half), rel=1e-3)
    assert got.method == "welch-log" and got.n == 3
    # Log-normal costs with a true ratio of 1.1, four stretches a side: the interval covers it in
    # about 95% of draws (Welch with df rounded down errs wide).
    rng = np.random.default_rng(0)
    trials = 400
    covered = sum(
        iv.ratio_interval(1.1 * rng.lognormal(0, 0.05, 4), rng.lognormal(0, 0.08, 4)).contains(1.1)
        for _ in range(trials)
    )
    assert 0.92 * trials <= covered <= trials
    with pytest.raises(ValueError, match="at least two"):
        iv.ratio_interval([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        iv.ratio_interval([1.0, 0.0], [1.0, 2.0])


def test_decisions_on_intervals():
    lo, hi = iv.Interval(0.1, 0.05, 0.15), iv.Interval(0.3, 0.2, 0.4)
    overlap = iv.Interval(0.18, 0.1, 0.25)
    assert iv.clearly_below(lo, hi) and iv.clearly_above(hi, lo)
    assert not iv.clearly_below(overlap, hi)
    assert iv.dips([hi, lo, hi])["holds"]
    assert not iv.dips([hi, overlap, hi])["holds"]
    assert not iv.dips([lo, hi, hi])["holds"]  # minimum at an end is no dip
    rec = iv.claim(True, dip=lo, note="x")
    assert rec["holds"] is True and rec["dip"]["low"] == 0.05 and rec["note"] == "x"


def test_bootstrap_sums_matches_the_row_bootstrap_of_a_ratio():
    rng = np.random.default_rng(2)
    rows = np.stack([rng.gamma(2.0, 1.0, 300), rng.gamma(4.0, 1.0, 300)], axis=1)  # [n, 2]
    ratio = lambda s: np.sqrt(s[:, 0] / s[:, 1])  # noqa: E731
    fast = iv.bootstrap_sums(rows, ratio)
    slow = iv.bootstrap_interval(rows, lambda a: float(np.sqrt(a[:, 0].sum() / a[:, 1].sum())))
    assert fast.value == pytest.approx(math.sqrt(rows[:, 0].sum() / rows[:, 1].sum()))
    # the same estimator, different resampling draws: ends agree to a small share of the width
    assert abs(fast.low - slow.low) < 0.15 * (slow.high - slow.low)
    assert abs(fast.high - slow.high) < 0.15 * (slow.high - slow.low)
    assert fast == iv.bootstrap_sums(rows, ratio) and fast.method == "bootstrap" and fast.n == 300
    with pytest.raises(ValueError, match="rows"):
        iv.bootstrap_sums(np.zeros((0, 2)), ratio)


def test_fraction_interval_follows_the_seed_rule():
    one = iv.fraction_interval([30], 100)
    assert one == iv.wilson_interval(30, 100)
    two = iv.fraction_interval([30, 40], 100)
    assert two.method == "wilson-pooled" and two.value == pytest.approx(0.35) and two.n == 200
    three = iv.fraction_interval([30, 40, 50], 100)
    assert three.method == "seeds-t" and three.value == pytest.approx(0.4)
    assert iv.flat("gl", one) == {"gl": one.value, "gl_low": one.low, "gl_high": one.high}


def test_bootstrap_sums_each_pairs_the_statistics():
    rng = np.random.default_rng(3)
    a = rng.normal(1.0, 1.0, 200)
    rows = np.stack([a, a + 0.05 + rng.normal(0, 0.01, 200)], axis=1)
    got = iv.bootstrap_sums_each(
        rows, {"a": lambda s: s[:, 0] / 200, "b": lambda s: s[:, 1] / 200, "diff": lambda s: (s[:, 1] - s[:, 0]) / 200}
    )
    # unpaired, the two means overlap; paired on the same resamples, the difference is clearly > 0
    assert not iv.clearly_above(got["b"], got["a"]) and got["diff"].low > 0.04
    assert got["a"] == iv.bootstrap_sums(rows, lambda s: s[:, 0] / 200)
