"""DDPM++ UNet: shapes, layout, attention routing, conditioning, errors, autograd and torch.func."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.func import jvp, vmap

from diffcore import ops as attention_module  # the UNet calls diffcore.ops.attention
from diffcore.models import UNet, UNetConfig
from diffcore.models.layers import UNetBlock

# (resolution, channel_mult, attn_resolutions): the sizes the studies use, 28 = non-power of two.
SIZES = [
    (8, (1, 2), (8,)),
    (16, (1, 2, 2), (16,)),
    (28, (1, 2, 2), (14,)),
    (32, (2, 2, 2), (16,)),
    (64, (1, 2, 2, 2), (16,)),
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("res,mult,attn", SIZES, ids=[f"{s[0]}x{s[0]}" for s in SIZES])
def test_output_shape_per_resolution(tiny_unet, res, mult, attn, channels):
    net = tiny_unet(img_resolution=res, in_channels=channels, channel_mult=mult, attn_resolutions=attn)
    x = torch.randn(2, channels, res, res)
    out = net(x, torch.tensor([0.1, -0.3]))
    assert out.shape == (2, channels, res, res)
    assert torch.isfinite(out).all()


def test_resolutions_follow_input_size():
    assert UNetConfig(img_resolution=28, channel_mult=(1, 2, 2)).resolutions() == [28, 14, 7]
    assert UNetConfig(img_resolution=64, channel_mult=(1, 2, 2, 2)).resolutions() == [64, 32, 16, 8]


def test_out_channels_override(tiny_unet):
    net = tiny_unet(in_channels=1, out_channels=2)
    assert net(torch.randn(3, 1, 8, 8), torch.zeros(3)).shape == (3, 2, 8, 8)


def test_layout_matches_ddpmpp_cifar():
    """EDM's DDPM++ CIFAR layout (width reduced): 3 levels x 4 blocks; attention at 16x16 in the
    4 encoder blocks and the last decoder block there, plus the bottleneck's first block."""
    with torch.device("meta"):
        net = UNet(UNetConfig(model_channels=8))
    enc = list(net.enc)
    dec = [n for n in net.dec if "aux" not in n]
    assert enc == [
        "32x32_conv",
        *[f"32x32_block{i}" for i in range(4)],
        "16x16_down",
        *[f"16x16_block{i}" for i in range(4)],
        "8x8_down",
        *[f"8x8_block{i}" for i in range(4)],
    ]
    assert dec[:2] == ["8x8_in0", "8x8_in1"] and len(dec) == 2 + 5 + 1 + 5 + 1 + 5
    blocks = [(n, m) for n, m in [*net.enc.items(), *net.dec.items()] if isinstance(m, UNetBlock)]
    attending = [n for n, m in blocks if m.num_heads]
    assert attending == [*[f"16x16_block{i}" for i in range(4)], "8x8_in0", "16x16_block4"]
    assert {m.num_heads for _, m in blocks if m.num_heads} == {1}


def test_all_attention_goes_through_ops_attention(tiny_unet, monkeypatch):
    calls = []
    real = attention_module.attention

    def spy(q, k, v, *, scale=None, backend="auto"):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), scale))
        return real(q, k, v, scale=scale, backend=backend)

    monkeypatch.setattr(attention_module, "attention", spy)
    net = tiny_unet(img_resolution=16, channel_mult=(1, 2), attn_resolutions=(16,), channels_per_head=4, num_heads=None)
    net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    # enc block at 16 (8 ch -> 2 heads of 4), bottleneck in0 at 8 (16 ch -> 4 heads), dec last block at 16
    assert calls == [((2, 2, 256, 4),) * 3 + (0.5,), ((2, 4, 64, 4),) * 3 + (0.5,), ((2, 2, 256, 4),) * 3 + (0.5,)]


def test_single_head_uses_all_channels(tiny_unet, monkeypatch):
    shapes = []
    real = attention_module.attention
    monkeypatch.setattr(
        attention_module,
        "attention",
        lambda q, k, v, *, scale=None, backend="auto": shapes.append(q.shape) or real(q, k, v, scale=scale),
    )
    tiny_unet(attn_resolutions=())(torch.randn(1, 1, 8, 8), torch.zeros(1))
    assert shapes == [(1, 1, 16, 16)]  # only the bottleneck: one head, head dim = 16 channels


def test_eval_is_deterministic_and_dropout_acts_in_training(tiny_unet):
    net = tiny_unet(dropout=0.5)
    x, noise = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.4])
    assert torch.equal(net(x, noise), net(x, noise))
    net.train()
    torch.manual_seed(1)
    a = net(x, noise)
    b = net(x, noise)
    assert not torch.allclose(a, b)


def test_noise_labels_change_the_output(tiny_unet):
    net = tiny_unet()
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    out = net(x, torch.tensor([-1.0, 1.0]))
    assert (out[0] - out[1]).abs().max() > 1e-3


class TestClassConditioning:
    def test_integer_ids_equal_one_hot(self, tiny_unet):
        net = tiny_unet(label_dim=10)
        x, noise = torch.randn(3, 1, 8, 8), torch.zeros(3)
        ids = torch.tensor([0, 7, 3])
        torch.testing.assert_close(net(x, noise, ids), net(x, noise, torch.nn.functional.one_hot(ids, 10).float()))

    def test_labels_change_the_output_and_none_is_the_zero_label(self, tiny_unet):
        net = tiny_unet(label_dim=4)
        x, noise = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1), torch.zeros(2)
        out = net(x, noise, torch.tensor([1, 2]))
        assert (out[0] - out[1]).abs().max() > 1e-3
        torch.testing.assert_close(net(x, noise), net(x, noise, torch.zeros(2, 4)))

    def test_label_dropout_in_training_drops_whole_rows(self, tiny_unet):
        net = tiny_unet(label_dim=4, label_dropout=0.5).train()
        x = torch.randn(1, 1, 8, 8).expand(32, -1, -1, -1)
        noise, ids = torch.zeros(32), torch.full((32,), 2)
        torch.manual_seed(3)
        out = net(x, noise, ids)
        net.eval()
        kept, dropped = net(x[:1], noise[:1], ids[:1]), net(x[:1], noise[:1])
        is_kept = [(o - kept[0]).abs().max() < 1e-5 for o in out]
        is_dropped = [(o - dropped[0]).abs().max() < 1e-5 for o in out]
        assert all(k != d for k, d in zip(is_kept, is_dropped))
        assert 0 < sum(is_dropped) < 32

    def test_bad_labels_raise(self, tiny_unet):
        net = tiny_unet(label_dim=4)
        x, noise = torch.randn(2, 1, 8, 8), torch.zeros(2)
        with pytest.raises(ValueError, match="class_labels"):
            net(x, noise, torch.zeros(2, 5))
        with pytest.raises(ValueError, match="class_labels"):
            net(x, noise, torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="class_labels"):
            tiny_unet()(x, noise, torch.tensor([1, 2]))


def test_augment_labels_enter_the_embedding(tiny_unet):
    net = tiny_unet(augment_dim=9)
    x, noise = torch.randn(2, 1, 8, 8), torch.zeros(2)
    assert not torch.allclose(net(x, noise), net(x, noise, augment_labels=torch.randn(2, 9)))


class TestBadInput:
    def test_wrong_channels(self, tiny_unet):
        with pytest.raises(ValueError, match="x: expected 1 channels"):
            tiny_unet()(torch.randn(2, 3, 8, 8), torch.zeros(2))

    def test_wrong_spatial_size(self, tiny_unet):
        with pytest.raises(ValueError, match="x: this UNet was built for 8x8"):
            tiny_unet()(torch.randn(2, 1, 16, 16), torch.zeros(2))
        with pytest.raises(ValueError, match="x: this UNet was built for 8x8"):
            tiny_unet()(torch.randn(2, 1, 8, 6), torch.zeros(2))

    def test_wrong_rank_and_dtype(self, tiny_unet):
        with pytest.raises(ValueError, match=r"x: expected \[B, C, H, W\]"):
            tiny_unet()(torch.randn(1, 8, 8), torch.zeros(1))
        with pytest.raises(TypeError, match="x: expected a floating-point"):
            tiny_unet()(torch.zeros(2, 1, 8, 8, dtype=torch.int64), torch.zeros(2))

    def test_noise_label_shape(self, tiny_unet):
        with pytest.raises(ValueError, match="noise_labels"):
            tiny_unet()(torch.randn(2, 1, 8, 8), torch.zeros(3))

    def test_unsupported_resolution_at_construction(self):
        with pytest.raises(ValueError, match="img_resolution: 28 is not divisible by .* = 8"):
            UNet(img_resolution=28, channel_mult=(1, 2, 2, 2), model_channels=8)
        with pytest.raises(ValueError, match="img_resolution"):
            UNet(img_resolution=0, model_channels=8)

    @pytest.mark.parametrize(
        "fields,match",
        [
            (dict(num_heads=3), "num_heads: 3 does not divide"),
            (dict(num_heads=None, channels_per_head=5), "channels_per_head: 5 does not divide"),
            (dict(num_heads=None), "exactly one of num_heads and channels_per_head"),
            (dict(channel_mult=()), "channel_mult"),
            (dict(dropout=1.0), "dropout"),
            (dict(model_channels=3), "model_channels"),
            (dict(label_dim=-1), "label_dim"),
        ],
    )
    def test_bad_config(self, fields, match):
        with pytest.raises(ValueError, match=match):
            UNet(**{"model_channels": 8, **fields})

    def test_unknown_config_field(self):
        with pytest.raises(TypeError):
            UNet(model_channels=8, heads=2)


def test_unmatched_attention_resolution_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="diffcore.models.unet"):
        UNet(img_resolution=28, channel_mult=(1, 2, 2), model_channels=8, attn_resolutions=(16,))
    assert "match no level" in caplog.text


def test_backward_reaches_every_parameter(tiny_unet):
    net = tiny_unet(label_dim=3)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    net(x, torch.tensor([0.1, 0.5]), torch.tensor([0, 2])).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_gradcheck_float64_input(tiny_unet):
    net = tiny_unet(img_resolution=4, channel_mult=(1, 2), attn_resolutions=(4,)).double()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor([0.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: net(x, noise), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("res,attn", [(8, (8,)), (16, (16,))])
def test_jvp_matches_finite_differences_float64(tiny_unet, res, attn):
    net = tiny_unet(img_resolution=res, model_channels=16, channel_mult=(1, 2), attn_resolutions=attn).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, res, res, dtype=torch.float64, generator=gen)
    t = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    noise = torch.tensor([0.2, -0.7], dtype=torch.float64)
    f = lambda x: net(x, noise)  # noqa: E731
    out, tangent = jvp(f, (x,), (t,))
    torch.testing.assert_close(out, f(x))
    h = 1e-5
    central = (f(x + h * t) - f(x - h * t)) / (2 * h)
    assert tangent.abs().max() > 1e-2  # the check is not vacuous
    torch.testing.assert_close(tangent, central, rtol=1e-6, atol=1e-7)


def test_vmap_over_tangents_matches_a_loop(tiny_unet):
    net = tiny_unet()
    x = torch.randn(2, 1, 8, 8)
    noise = torch.tensor([0.2, -0.7])
    f = lambda x: net(x, noise)  # noqa: E731
    tangents = torch.randn(4, *x.shape)
    batched = vmap(lambda t: jvp(f, (x,), (t,))[1])(tangents)
    looped = torch.stack([jvp(f, (x,), (t,))[1] for t in tangents])
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-5)


def test_vmap_over_samples(tiny_unet):
    net = tiny_unet()
    x = torch.randn(3, 2, 1, 8, 8)
    noise = torch.tensor([0.2, -0.7])
    batched = vmap(lambda xi: net(xi, noise))(x)
    torch.testing.assert_close(batched, torch.stack([net(xi, noise) for xi in x]), rtol=1e-4, atol=1e-5)


def test_jvp_with_channels_last_input(tiny_unet):
    """torch's group_norm forward-mode rule fails on channels-last strides; the UNet guards it."""
    net = tiny_unet(in_channels=3)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    t = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    _, tangent = jvp(lambda x: net(x, torch.zeros(2)), (x,), (t,))
    _, expected = jvp(lambda x: net(x, torch.zeros(2)), (x.contiguous(),), (t.contiguous(),))
    torch.testing.assert_close(tangent, expected)


def test_same_seed_same_weights():
    def build():
        torch.manual_seed(4)
        return UNet(model_channels=8, img_resolution=8, in_channels=1, channel_mult=(1, 2), attn_resolutions=())

    a, b = build(), build()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(a.eval()(x, torch.zeros(1)), b.eval()(x, torch.zeros(1)))
