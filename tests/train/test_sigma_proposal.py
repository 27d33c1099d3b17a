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
