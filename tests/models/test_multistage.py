"""Multi-stage UNet: one stage is the single UNet; mixed batches equal per-stage batches; wrappers."""

from __future__ import annotations

import pytest
import torch

from diffcore.models import EDMPrecond, MultiStageUNet, UNet, VPPrecond, multistage_denoiser
from diffcore.train import build_model
from tests.helpers import TINY_UNET_FIELDS

TINY = TINY_UNET_FIELDS
# The registry's spec of a small two-stage model (diffcore.train.build_model).
MULTISTAGE_SPEC = {
    "name": "multistage",
    "preset": "ddpmpp-digits-light",
    "sigma_boundaries": [1.0],
    "decoder_channels": [16, 8],
}


@pytest.fixture
def tiny_multistage(randomize):
    """``tiny_multistage(decoder_channels, label_boundaries)``: float64 eval model, O(1) random weights."""

    def make(decoder_channels=(8, 16, 4), label_boundaries=(-0.3, 0.4), seed=0):
        torch.manual_seed(seed)
        net = MultiStageUNet(decoder_channels=decoder_channels, label_boundaries=label_boundaries, **TINY)
        return randomize(net, seed).double().eval()

    return make


def test_one_stage_equals_the_single_unet_with_the_same_weights(randomize):
    single = randomize(UNet(**TINY), 3).double().eval()
    multi = MultiStageUNet(decoder_channels=(TINY["model_channels"],), **TINY).double().eval()
    state = {
        k.replace("dec.", "decoders.0.", 1) if k.startswith("dec.") else k: v for k, v in single.state_dict().items()
    }
    state["label_boundaries"] = multi.label_boundaries
    multi.load_state_dict(state, strict=True)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    labels = torch.linspace(-2, 2, 5, dtype=torch.float64)
    assert torch.equal(multi(x, labels), single(x, labels))


def test_mixed_stage_batch_equals_per_stage_batches(tiny_multistage):
    net = tiny_multistage()
    x = torch.randn(9, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([-1.0, 0.5, 0.0, -0.3, 2.0, 0.4, -0.9, 0.1, 1.0], dtype=torch.float64)
    stage = net.stage_of(labels)
    assert stage.tolist() == [0, 2, 1, 1, 2, 2, 0, 1, 2]  # a label equal to a boundary goes up
    mixed = net(x, labels)
    for s in range(3):
        rows = (stage == s).nonzero().squeeze(1)
        torch.testing.assert_close(mixed[rows], net(x[rows], labels[rows]), rtol=1e-12, atol=1e-12)
    # decoders differ: the same input through another stage gives another output
    moved = net(x[:1], torch.tensor([0.0], dtype=torch.float64))
    assert not torch.allclose(moved, mixed[:1])


def test_gradients_reach_the_shared_encoder_and_only_the_used_decoders(tiny_multistage):
    net = tiny_multistage()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    net(x, torch.tensor([-1.0, -0.5, 1.0, 2.0], dtype=torch.float64)).square().sum().backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("enc."))
    assert all(g is not None for n, g in grads.items() if n.startswith(("decoders.0.", "decoders.2.")))
    assert all(g is None for n, g in grads.items() if n.startswith("decoders.1."))


def test_decoder_widths_and_parameter_counts(tiny_multistage):
    net = tiny_multistage(decoder_channels=(16, 8, 4))
    counts = net.stage_parameter_counts()
    assert counts[0] > counts[1] > counts[2]
    assert net.decoders[2]["8x8_block1"].out_channels == 4
    total = sum(p.numel() for p in net.parameters())
    shared = total - sum(p.numel() for d in net.decoders for p in d.parameters())
    assert counts[1] == shared + sum(p.numel() for p in net.decoders[1].parameters())


def test_precond_wrapper_routes_by_sigma():
    denoiser = multistage_denoiser("ddpmpp-digits-light", sigma_boundaries=(0.5, 5.0), decoder_channels=(16, 8, 4))
    assert isinstance(denoiser, EDMPrecond)
    net = denoiser.model
    torch.testing.assert_close(net.label_boundaries, torch.log(torch.tensor([0.5, 5.0], dtype=torch.float64)) / 4)
    sigma = torch.tensor([0.1, 0.5, 4.9, 5.0, 80.0], dtype=torch.float64)  # float64: exact at the boundaries
    c_noise = denoiser.coefficients(sigma)[3]
    assert net.stage_of(c_noise).tolist() == [0, 1, 1, 2, 2]
    out = denoiser(torch.randn(5, 1, 8, 8), sigma.float())
    assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    vp = multistage_denoiser("ddpmpp-digits-light", precond="vp", sigma_boundaries=(1.0,), decoder_channels=(8, 8))
    assert isinstance(vp, VPPrecond)
    assert vp.model.stage_of(vp.coefficients(torch.tensor([0.9, 1.1]))[3]).tolist() == [0, 1]


def test_registry_builds_it_and_state_dicts_round_trip():
    a, b = build_model(MULTISTAGE_SPEC), build_model(MULTISTAGE_SPEC)
    b.load_state_dict(a.state_dict())
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 1.0, 3.0])
    assert torch.equal(a(x, sigma), b(x, sigma))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(decoder_channels=()), "decoder_channels"),
        (dict(decoder_channels=(8, 0)), "decoder_channels"),
        (dict(decoder_channels=(8, 8), label_boundaries=()), "label_boundaries"),
        (dict(decoder_channels=(8, 8, 8), label_boundaries=(1.0, 0.0)), "label_boundaries"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiStageUNet(**TINY, **kwargs)
    with pytest.raises(ValueError, match="sigma_boundaries"):
        multistage_denoiser("ddpmpp-digits-light", sigma_boundaries=(2.0, 1.0), decoder_channels=(8, 8, 8))
    with pytest.raises(ValueError, match="precond"):
        multistage_denoiser("ddpmpp-digits-light", precond="x", sigma_boundaries=(1.0,), decoder_channels=(8, 8))


def test_separate_stage_unets_route_each_stage_to_its_own_unet_and_share_nothing(randomize):
    from diffcore.models import SeparateStageUNets

    torch.manual_seed(0)
    net = randomize(SeparateStageUNets(widths=(8, 4), label_boundaries=(0.0,), **TINY), 1).double().eval()
    assert [u.config.model_channels for u in net.stages] == [8, 4]
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([-1.0, 0.5, 0.0, -0.3, 2.0, -2.0], dtype=torch.float64)
    out = net(x, labels)
    stage = net.stage_of(labels)
    for s in range(2):  # each row equals its stage's UNet alone
        rows = (stage == s).nonzero().squeeze(1)
        torch.testing.assert_close(out[rows], net.stages[s](x[rows], labels[rows]), rtol=1e-12, atol=1e-12)
    net.zero_grad()
    net(x[:1], labels[:1]).square().sum().backward()  # a stage-0 row: no gradient reaches UNet 1
    assert all(p.grad is None for p in net.stages[1].parameters())
    assert net.stage_parameter_counts() == [sum(p.numel() for p in u.parameters()) for u in net.stages]
    with pytest.raises(ValueError, match="label_boundaries"):
        SeparateStageUNets(widths=(8, 4), label_boundaries=(), **TINY)
    # the same stage checks as MultiStageUNet: finite, strictly increasing boundaries
    for bad in ((1.0, 0.0), (0.0, 0.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="label_boundaries: expected finite, strictly increasing"):
            SeparateStageUNets(widths=(8, 4, 4), label_boundaries=bad, **TINY)
    with pytest.raises(ValueError, match="widths"):
        SeparateStageUNets(widths=(), **TINY)


def test_registry_builds_separate_stage_models():
    denoiser = build_model({**MULTISTAGE_SPEC, "shared_encoder": False})
    assert type(denoiser.model).__name__ == "SeparateStageUNets"
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert denoiser.model.stage_of(denoiser.coefficients(sigma)[3]).tolist() == [0, 1]
