"""The small path's screen (csrc/empirical_denoise/small_dim.cpp, screen_query; issue 34): an fp32
Gram with a proven error bound drops the pairs more than BAND logits below a query's largest, and
the survivors are re-scored exactly. Every case is checked against the float64 reference, and
against the path actually taken (``_run_small``'s SmallStats)."""

from __future__ import annotations

import pytest
import torch

from diffcore.ops import _empirical_denoise_cpu as ed_cpu
from diffcore.ref.empirical_denoise import empirical_denoise_ref
from tests.ops.test_empirical_denoise import (
    check_against_reference,
    make_case,
    row_rel_error,
    small_path_on_one_and_two_threads,
)


def screen_stats(x: torch.Tensor, train: torch.Tensor, sigma) -> ed_cpu.SmallStats:
    """How many queries the small path finished by the screen, and their survivors in all."""
    sigma64 = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]).contiguous()
    return ed_cpu._run_small(x.contiguous(), train.contiguous(), 0.5 / sigma64.square(), 1)[3]


@pytest.mark.parametrize("train_dtype", [torch.float32, torch.uint8], ids=["f32", "u8"])
@pytest.mark.parametrize("sigma", [1e-5, 0.002, 0.01, 0.05])
@pytest.mark.parametrize("batch,rows,dim", [(1, 300, 64), (5, 1797, 64), (37, 700, 64), (7, 200, 45), (3, 150, 256)])
def test_screen_matches_reference(train_dtype, sigma, batch, rows, dim):
    """Small sigma, odd batch sizes (a short last block of 4), uint8 and float32 training sets; at
    sigma 1e-5 the queries go on to the relative-logit path (needs_relative_logits) afterwards."""
    x, train = make_case(batch, rows, dim, sigma, train_dtype, seed=batch + rows)
    stats = screen_stats(x, train, sigma)
    assert stats.screened == batch and batch <= stats.kept <= 2 * batch
    check_against_reference(x, train, sigma, "cpu")


def test_screen_keeps_every_pair_within_the_band():
    """Training rows at squared distances d0 + 2 sigma^2 t from the query, t = 0 ... 70 (weights
    e^-t): dropping any row with t <= 12 would move the output by more than the tolerance, and
    every row with t <= 60 must survive the screen (rows beyond 2 T + 2 sigma^2 BAND may go)."""
    gen = torch.Generator().manual_seed(4)
    dim, sigma = 64, 0.01
    base = torch.rand(dim, generator=gen, dtype=torch.float64) * 2 - 1
    steps = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 30.0, 59.0, 61.0, 70.0], dtype=torch.float64)
    radii = (0.01 + 2 * sigma**2 * steps).sqrt()
    graded = base.repeat(len(steps), 1)
    graded[torch.arange(len(steps)), torch.arange(len(steps))] += radii  # one axis each: |y - base|^2 = r^2
    far = torch.rand(300, dim, generator=gen, dtype=torch.float64) * 2 - 1
    train = torch.cat([far[:100], graded, far[100:]]).float()
    x = base.float()[None].repeat(3, 1)
    stats = screen_stats(x, train, sigma)
    assert stats.screened == 3 and stats.kept >= 3 * 10  # t = 0 ... 59 at least
    check_against_reference(x, train, sigma, "cpu")


def test_screen_ties_near_ties_and_duplicates():
    """An exact tie (the midpoint of two rows on a 2^-10 grid), a near tie (distances equal to 1e-6
    relative) and a duplicated row (weighs twice) at small sigma."""
    gen = torch.Generator().manual_seed(9)
    train = torch.randint(-1024, 1024, (400, 64), generator=gen).float() / 1024
    train[50] = train[10]
    mid = (train[3] + train[4]) / 2  # exact in fp32
    x = torch.stack([mid, mid + 1e-6 * (train[3] - train[4]), train[10] + 0.001, train[50] - 0.002, mid])
    for sigma in (1e-5, 0.002, 0.01, 0.05):
        assert screen_stats(x, train, sigma).screened == 5
        check_against_reference(x, train, sigma, "cpu")
    out = ed_cpu.run(x[:1], train, torch.full((1,), 0.01, dtype=torch.float64))[0]
    assert row_rel_error(out, mid[None]) <= 1e-6


def test_screen_per_row_sigma_and_far_queries():
    """Screened and dense queries in one block of 4 (per-row sigma), and queries far from every row."""
    x, train = make_case(9, 1797, 64, 0.01, torch.uint8, seed=3)
    x = torch.cat([x, torch.randn(4, 64, generator=torch.Generator().manual_seed(5)) * 5])
    sigma = torch.tensor(
        [0.01, 1.0, 0.003, 80.0, 0.05, 0.01, 3.0, 1e-4, 0.02, 0.01, 1.0, 0.002, 80.0], dtype=torch.float64
    )
    stats = screen_stats(x, train, sigma)
    assert 8 <= stats.screened <= 9  # the small sigmas (a far query may have many pairs within the band)
    check_against_reference(x, train, sigma, "cpu")


def test_screen_falls_back_when_too_many_pairs_survive(monkeypatch):
    """A screen predicted wrongly (forced at sigma 1, where every pair carries weight) or a survivor
    cap of one (a duplicated nearest row): those queries take the float64 Gram, same results."""
    x, train = make_case(6, 500, 64, 1.0, torch.float32, seed=7)
    monkeypatch.setattr(ed_cpu, "SMALL_SCREEN_RATIO", 1e9)
    assert screen_stats(x, train, 1.0).screened == 0
    check_against_reference(x, train, 1.0, "cpu")
    monkeypatch.setattr(ed_cpu, "small_screen_max_kept", lambda rows: 1)
    train[7] = train[3]
    x = train[[3, 3, 9]] + 0.001
    assert screen_stats(x, train, 0.01).screened == 1  # row 9 has one survivor, rows 3 two
    check_against_reference(x, train, 0.01, "cpu")


def test_screen_is_bit_identical_for_one_and_two_threads(monkeypatch):
    x, train = make_case(37, 1797, 64, 0.01, torch.uint8, seed=2)
    sigma64 = torch.full((37,), 0.01, dtype=torch.float64)
    sigma64[::5] = 1.0  # dense queries in some blocks
    one, two = small_path_on_one_and_two_threads(monkeypatch, x, train, sigma64)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    ref_out, _ = empirical_denoise_ref(x, train, sigma64)
    assert row_rel_error(one[0], ref_out) <= 1e-5


def test_second_screen_over_every_column(monkeypatch):
    """Queries whose first screen (a quarter of the columns) keeps too many rows are finished by the
    second (every column) when that keeps few enough: the digits at sigma 0.1, at most 3 survivors."""
    from diffcore.data.digits import load_digits

    train = load_digits(as_uint8=True)[0].reshape(-1, 64)[::3].contiguous()
    gen = torch.Generator().manual_seed(11)
    x = (train[:16].double() / 127.5 - 1 + 0.1 * torch.randn(16, 64, generator=gen, dtype=torch.float64)).float()
    monkeypatch.setattr(ed_cpu, "small_screen_max_kept", lambda rows: 3)
    stats = screen_stats(x, train, 0.1)
    assert 0 < stats.partial < stats.screened
    check_against_reference(x, train, 0.1, "cpu")


@pytest.mark.parametrize("magnitude", [1e3, 1e8, 1e15])
def test_screen_huge_queries(magnitude):
    """Queries far out (|x| up to MAX_MAGNITUDE): the screen's bound grows with |x| |y|, so it keeps
    more rows or gives way; either way the result is the reference's."""
    gen = torch.Generator().manual_seed(8)
    train = torch.rand(300, 64, generator=gen) * 2 - 1
    x = train[:5] * magnitude + torch.rand(5, 64, generator=gen)
    for sigma in (1e-3, 0.01):
        check_against_reference(x, train, sigma, "cpu")
