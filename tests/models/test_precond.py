"""Preconditioning wrappers: EDM Table 1 coefficients, the D(x, sigma) contract, sigma forms, JVPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacfwd, jvp, vmap

from diffcore.models import EDMPrecond, VEPrecond, VPPrecond

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.3, 80.0], dtype=torch.float64)


class AffineProbe(nn.Module):
    """F(x_in, c_noise) = 3 x_in + c_noise (broadcast); records what it was called with."""

    in_channels = 1
    img_resolution = 4
    label_dim = 0

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0, dtype=torch.float64))
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None):
        self.calls.append((x, noise_labels, class_labels))
        return self.scale * x + noise_labels[:, None, None, None]


def edm_direct(sigma, sd=0.5):
    return (
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / math.sqrt(sigma**2 + sd**2),
        1 / math.sqrt(sigma**2 + sd**2),
        math.log(sigma) / 4,
    )


def vp_direct(sigma, beta_d=19.9, beta_min=0.1, M=1000):
    t = (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d
    return 1.0, -sigma, 1 / math.sqrt(sigma**2 + 1), (M - 1) * t


def ve_direct(sigma):
    return 1.0, sigma, 1.0, math.log(sigma / 2)


@pytest.mark.parametrize(
    "cls,direct", [(EDMPrecond, edm_direct), (VPPrecond, vp_direct), (VEPrecond, ve_direct)], ids=["edm", "vp", "ve"]
)
def test_coefficients_match_table_1(cls, direct):
    precond = cls(AffineProbe())
    got = precond.coefficients(SIGMAS)
    for i, s in enumerate(SIGMAS.tolist()):
        for name, value, expected in zip(("c_skip", "c_out", "c_in", "c_noise"), got, direct(s)):
            assert value.shape == SIGMAS.shape
            assert value[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-15), (name, s)


@pytest.mark.parametrize(
    "cls,direct", [(EDMPrecond, edm_direct), (VPPrecond, vp_direct), (VEPrecond, ve_direct)], ids=["edm", "vp", "ve"]
)
def test_forward_is_eq_7(cls, direct):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), per sample."""
    probe = AffineProbe()
    precond = cls(probe)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 20.0], dtype=torch.float64)
    out = precond(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in, c_noise = direct(s)
        expected = c_skip * x[i] + c_out * (3 * c_in * x[i] + c_noise)
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)


def test_edm_at_sigma_equal_sigma_data():
    """At sigma = sigma_data = 0.5: c_skip = 1/2, c_out = 1/(2 sqrt 2), c_in = sqrt 2, c_noise = ln(0.5)/4."""
    probe = AffineProbe()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    out = EDMPrecond(probe)(x, 0.5)
    net_in, noise_labels, _ = probe.calls[-1]
    torch.testing.assert_close(net_in, math.sqrt(2) * x)
    torch.testing.assert_close(noise_labels, torch.full((2,), math.log(0.5) / 4, dtype=torch.float64))
    f_x = 3 * math.sqrt(2) * x + math.log(0.5) / 4
    torch.testing.assert_close(out, 0.5 * x + f_x / (2 * math.sqrt(2)))


def test_edm_custom_sigma_data_and_attributes():
    precond = EDMPrecond(AffineProbe(), sigma_data=1.0)
    c_skip, c_out, c_in, _ = precond.coefficients(torch.tensor([1.0], dtype=torch.float64))
    assert (c_skip.item(), c_out.item(), c_in.item()) == pytest.approx((0.5, 1 / math.sqrt(2), 1 / math.sqrt(2)))
    assert (precond.sigma_min, precond.sigma_max, precond.img_resolution, precond.img_channels) == (0.002, 80.0, 4, 1)


def test_vp_schedule_inverse_and_range():
    vp = VPPrecond(AffineProbe())
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(vp.t_of_sigma(vp.sigma_of_t(t)), t, rtol=1e-9, atol=1e-12)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1))
    assert vp.sigma_min == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5) - 1))


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond])
def test_loss_weight(cls):
    precond = cls(AffineProbe())
    s = SIGMAS
    expected = (s**2 + 0.25) / (s * 0.5) ** 2 if cls is EDMPrecond else 1 / s**2
    torch.testing.assert_close(precond.loss_weight(s), expected)


def test_training_sigma_distributions():
    gen = torch.Generator().manual_seed(0)
    edm = EDMPrecond(AffineProbe()).training_sigma(20000, generator=gen).log()
    assert edm.mean().item() == pytest.approx(-1.2, abs=0.05) and edm.std().item() == pytest.approx(1.2, abs=0.05)
    ve = VEPrecond(AffineProbe()).training_sigma(20000, generator=gen)
    assert ve.min() >= 0.02 * 0.999 and ve.max() <= 100 * 1.001
    vp_model = VPPrecond(AffineProbe())
    vp = vp_model.training_sigma(20000, generator=gen)
    assert vp.min() >= vp_model.sigma_min * 0.999 and vp.max() <= vp_model.sigma_max * 1.001


def test_sigma_forms_agree(tiny_unet):
    precond = EDMPrecond(tiny_unet())
    x = torch.randn(3, 1, 8, 8)
    ref = precond(x, torch.full((3,), 0.7))
    for sigma in (0.7, torch.tensor(0.7), torch.full((3, 1, 1, 1), 0.7), torch.full((3,), 0.7, dtype=torch.float64)):
        torch.testing.assert_close(precond(x, sigma), ref)


@pytest.mark.parametrize(
    "sigma,error",
    [
        (torch.ones(4), ValueError),
        (torch.ones(3, 2), ValueError),
        (torch.ones(1, 3), ValueError),
        ("0.5", TypeError),
        (torch.ones(3, 1, 1, 1, 1), ValueError),
    ],
)
def test_bad_sigma_raises_naming_sigma(tiny_unet, sigma, error):
    with pytest.raises(error, match="sigma"):
        EDMPrecond(tiny_unet())(torch.randn(3, 1, 8, 8), sigma)


def test_bad_x_raises(tiny_unet):
    precond = EDMPrecond(tiny_unet())
    with pytest.raises(ValueError, match="x: expected 1 channels"):
        precond(torch.randn(2, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="x: this UNet was built for 8x8"):
        precond(torch.randn(2, 1, 16, 16), 1.0)
    with pytest.raises(ValueError, match=r"x: expected \[B, C, H, W\]"):
        precond(torch.randn(2, 64), 1.0)


def test_class_labels_pass_through(tiny_unet):
    precond = EDMPrecond(tiny_unet(label_dim=5))
    x = torch.randn(2, 1, 8, 8)
    a, b = precond(x, 1.0, torch.tensor([1, 1])), precond(x, 1.0, torch.tensor([1, 4]))
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4
    assert precond.label_dim == 5


def test_float64_input_on_float32_network(tiny_unet):
    """A float64 sampler can drive a float32 network: D comes back in float64."""
    precond = EDMPrecond(tiny_unet())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = precond(x, torch.tensor([0.3, 3.0], dtype=torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, precond(x.float(), torch.tensor([0.3, 3.0])).double(), rtol=1e-5, atol=1e-5)


def test_small_sigma_is_near_identity(tiny_unet):
    """c_skip -> 1 and c_out -> 0 as sigma -> 0: D(x; 0.002) ~ x (EDM Table 1)."""
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = EDMPrecond(tiny_unet().double())(x, 0.002)
    assert (out - x).abs().max() < 0.02


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond])
def test_denoiser_jvp_matches_finite_differences_float64(tiny_unet, cls):
    precond = cls(tiny_unet(model_channels=16).double())
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=gen)
    t = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    sigma = torch.tensor([0.4, 2.5], dtype=torch.float64)
    f = lambda x: precond(x, sigma)  # noqa: E731
    _, tangent = jvp(f, (x,), (t,))
    h = 1e-5
    torch.testing.assert_close(tangent, (f(x + h * t) - f(x - h * t)) / (2 * h), rtol=1e-6, atol=1e-7)


def test_jvp_with_respect_to_sigma(tiny_unet):
    precond = EDMPrecond(tiny_unet().double())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.4, 2.5], dtype=torch.float64)
    _, d_sigma = jvp(lambda s: precond(x, s), (sigma,), (torch.ones_like(sigma),))
    h = 1e-6
    central = (precond(x, sigma + h) - precond(x, sigma - h)) / (2 * h)
    torch.testing.assert_close(d_sigma, central, rtol=1e-5, atol=1e-7)


def test_vmap_of_jvp_through_the_denoiser(tiny_unet):
    precond = EDMPrecond(tiny_unet(label_dim=3))
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 2])
    f = lambda x: precond(x, 0.8, labels)  # noqa: E731
    tangents = torch.randn(5, *x.shape)
    batched = vmap(lambda t: jvp(f, (x,), (t,))[1])(tangents)
    looped = torch.stack([jvp(f, (x,), (t,))[1] for t in tangents])
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-5)


def test_backward_through_the_denoiser(tiny_unet):
    precond = EDMPrecond(tiny_unet())
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.1, 5.0], requires_grad=True)
    loss = (precond.loss_weight(sigma)[:, None, None, None] * (precond(x, sigma) - 0.3).square()).mean()
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(sigma.grad).all() and sigma.grad.abs().min() > 0
    assert all(p.grad is not None for p in precond.parameters())


def test_bfloat16_autocast_on_cpu(tiny_unet):
    """Mixed precision: the network runs under autocast, D comes back in x's dtype (float32)."""
    precond = EDMPrecond(tiny_unet())
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = precond(x, 0.8)
    assert out.dtype == torch.float32
    reference = precond(x, 0.8)
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


def test_jacfwd_of_the_denoiser_is_consistent_with_jvp(tiny_unet):
    precond = EDMPrecond(tiny_unet(img_resolution=4, attn_resolutions=(4,)).double())
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    f = lambda x: precond(x, 0.5)  # noqa: E731
    jac = jacfwd(f)(x).reshape(16, 16)
    t = torch.randn_like(x)
    _, tangent = jvp(f, (x,), (t,))
    torch.testing.assert_close(jac @ t.reshape(16), tangent.reshape(16))
    # the denoiser's Jacobian is not just c_skip * I: the network contributes
    assert (jac - torch.diag(torch.diag(jac))).abs().max() > 1e-3
