"""EDMLoss's training noise proposal: EDM's lognormal mixed with a log-uniform share over a range."""

import math

import pytest
import torch

from diffcore.train.loss import EDMLoss, build_loss


def test_fraction_zero_draws_exactly_edms_levels():
    a = EDMLoss().sample_sigma(1000, torch.Generator().manual_seed(0), "cpu")
    b = EDMLoss(log_uniform_fraction=0.0).sample_sigma(1000, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(a, b)


def test_mixture_covers_the_range_in_the_stated_share():
    loss = build_loss("edm", {"log_uniform_fraction": 0.5, "log_uniform_range": [0.002, 80.0]})
    sigma = loss.sample_sigma(200_000, torch.Generator().manual_seed(1), "cpu").double()
    # above sigma 5: the lognormal gives P(ln s > ln 5) = 1 - Phi((ln 5 + 1.2) / 1.2) = 0.0073;
    # the log-uniform part ln(80/5) / ln(80/0.002) = 0.2614
    expect = 0.5 * (0.5 * math.erfc((math.log(5) + 1.2) / 1.2 / math.sqrt(2))) + 0.5 * math.log(16) / math.log(40000)
    got = float((sigma > 5).double().mean())
    se = math.sqrt(expect * (1 - expect) / sigma.numel())
    assert abs(got - expect) < 4 * se, (got, expect)
    # nothing log-uniform above the range: only the lognormal's tail, 0.5 P(ln s > ln 80) = 8e-7, goes there
    tail = 0.5 * 0.5 * math.erfc((math.log(80.001) + 1.2) / 1.2 / math.sqrt(2))
    assert float((sigma > 80.001).double().sum()) <= tail * sigma.numel() + 4 * math.sqrt(tail * sigma.numel()) + 1


@pytest.mark.parametrize(
    "options, match",
    [
        ({"log_uniform_fraction": 1.5}, "log_uniform_fraction"),
        ({"log_uniform_fraction": 0.2, "log_uniform_range": (5, 1)}, "log_uniform_range"),
        ({"log_uniform_range": "x"}, "log_uniform_range"),
    ],
)
def test_bad_proposal_is_refused(options, match):
    with pytest.raises(ValueError, match=match):
        EDMLoss(**options)


# one stage per batch (the multi-stage paper's EDMMultistageLoss; docs/papers.md section 9)
BOUNDS = (1.186, 3.516)


def _stage(sigma: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(sigma.double(), torch.tensor(BOUNDS, dtype=torch.float64), right=True)


def test_one_stage_per_batch_keeps_the_lognormal_marginal():
    loss = EDMLoss(stage_boundaries=BOUNDS)
    probabilities = loss.stage_probabilities()
    cdf = [0.5 * math.erfc(-((math.log(b) + 1.2) / 1.2) / math.sqrt(2)) for b in BOUNDS]
    assert probabilities == pytest.approx([cdf[0], cdf[1] - cdf[0], 1 - cdf[1]], abs=1e-12)
    gen = torch.Generator().manual_seed(3)
    batches = [loss.sample_sigma(16, gen, "cpu") for _ in range(3000)]
    stages = [_stage(b) for b in batches]
    assert all(bool((s == s[0]).all()) for s in stages)  # every batch inside one stage
    counts = torch.bincount(torch.stack([s[0] for s in stages]), minlength=3).double()
    for k, p in enumerate(probabilities):  # stage frequencies: within 4 binomial standard errors
        assert abs(float(counts[k]) / 3000 - p) < 4 * math.sqrt(p * (1 - p) / 3000) + 1e-9
    log_sigma = torch.cat(batches).double().log()  # the marginal: ln sigma ~ N(-1.2, 1.2^2)
    batch_means = torch.stack(batches).double().log().mean(1)  # batches are the independent units
    se = float(batch_means.std()) / math.sqrt(len(batches))
    assert abs(float(log_sigma.mean()) + 1.2) < 4 * se
    assert abs(float(log_sigma.std()) - 1.2) < 0.05


def test_stage_boundaries_off_draws_exactly_edms_levels_and_bad_ones_are_refused():
    a = EDMLoss(stage_boundaries=()).sample_sigma(100, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(a, EDMLoss().sample_sigma(100, torch.Generator().manual_seed(0), "cpu"))
    assert EDMLoss().stage_probabilities() == [1.0]
    for bad in ((2.0, 1.0), (0.0, 1.0), "x"):
        with pytest.raises(ValueError, match="stage_boundaries"):
            EDMLoss(stage_boundaries=bad)
    with pytest.raises(ValueError, match="stage_boundaries"):
        EDMLoss(stage_boundaries=BOUNDS, log_uniform_fraction=0.1)
