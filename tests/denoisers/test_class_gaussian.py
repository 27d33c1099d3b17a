"""Class Gaussians and the linear split of CFG (docs/papers.md section 8)."""

from __future__ import annotations

import pytest
import torch

from diffcore.denoisers import ClassGaussians, GaussianDenoiser
from diffcore.sampler import GuidanceInterval, GuidedDenoiser

EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def labeled():
    """Three classes of correlated data in R^2x3x3 (d = 18), each with its own mean and covariance."""
    g = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for c, count in enumerate((60, 45, 70)):
        mix = torch.randn(18, 18, generator=g, dtype=torch.float64) * (0.3 + 0.2 * c)
        rows.append(torch.randn(count, 18, generator=g, dtype=torch.float64) @ mix + c - 1.0)
        labels.append(torch.full((count,), c))
    return torch.cat(rows).reshape(-1, 2, 3, 3), torch.cat(labels)


@pytest.fixture(scope="module")
def gaussians(labeled):
    return ClassGaussians.fit(*labeled)


def _batch(labels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(labels.shape[0], 2, 3, 3, generator=g, dtype=torch.float64) * 2.0


@pytest.mark.parametrize("sigma", [0.01, 0.3, 1.0, 5.0, 80.0])
def test_exact_split_to_float64_precision(gaussians, sigma):
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    x = _batch(labels)
    split = gaussians.split(x, sigma, labels)
    direct = gaussians.difference(x, sigma, labels)
    # reference: D_c - D_u from each class' own GaussianDenoiser
    reference = torch.stack(
        [
            gaussians.conditional[c](x[i : i + 1], sigma)[0] - gaussians.unconditional(x[i : i + 1], sigma)[0]
            for i, c in enumerate(labels.tolist())
        ]
    )
    scale = float(x.abs().max() + 2.0)  # |x - mu|: eigh and two products, about d * eps relative
    torch.testing.assert_close(direct, reference, rtol=0, atol=50 * EPS64 * scale)  # batched vs row GEMMs
    assert float((split.total() - direct).abs().max()) < 200 * EPS64 * scale


@pytest.mark.parametrize("sigma", [0.05, 2.0])
def test_split_terms_match_their_definitions(gaussians, sigma):
    labels = torch.tensor([1, 2])
    x = _batch(labels, seed=3)
    split = gaussians.split(x, sigma, labels)
    for i, c in enumerate(labels.tolist()):
        m = gaussians.conditional[c].jacobian(sigma) - gaussians.unconditional.jacobian(sigma)
        values, vectors = torch.linalg.eigh(m)
        centered = x[i].reshape(-1) - gaussians.conditional[c].mean
        positive = vectors @ torch.diag(values.clamp_min(0)) @ vectors.T @ centered
        negative = vectors @ torch.diag(values.clamp_max(0)) @ vectors.T @ centered
        shift = gaussians.conditional[c].mean - gaussians.unconditional.mean
        mean_shift = (torch.eye(18, dtype=torch.float64) - gaussians.unconditional.jacobian(sigma)) @ shift
        for got, want in ((split.positive, positive), (split.negative, negative), (split.mean_shift, mean_shift)):
            torch.testing.assert_close(got[i].reshape(-1), want, rtol=1e-12, atol=1e-12)


def test_contrastive_components_decompose_the_guidance_matrix(gaussians):
    values, vectors = gaussians.contrastive_components(2, 0.7)
    matrix = gaussians.guidance_matrix(2, 0.7)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, matrix, rtol=0, atol=1e-13)
    assert bool((values[:-1] >= values[1:]).all())  # descending
    assert values[0] > 0 > values[-1]  # both positive and negative CPCs here
    assert gaussians.contrastive_components(2, 0.7)[0] is values  # cached


def test_cpc_eigenvalues_when_covariances_commute():
    """Shared eigenvectors: the CPC eigenvalues are lam_c/(lam_c + s^2) - lam_u/(lam_u + s^2)."""
    basis = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0]
    lam_c = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1, 0.01], dtype=torch.float64)
    lam_u = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    mean_c, mean_u = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    cls = ClassGaussians([GaussianDenoiser(mean_c, basis, lam_c)], GaussianDenoiser(mean_u, basis, lam_u))
    s2 = 0.8**2
    expected = (lam_c / (lam_c + s2) - lam_u / (lam_u + s2)).sort(descending=True).values
    torch.testing.assert_close(cls.contrastive_components(0, 0.8)[0], expected, rtol=0, atol=1e-14)


def test_each_term_alone_plus_the_others_is_full_linear_guidance(gaussians):
    """As guidance terms of GuidedDenoiser: sum over the three terms of (guided - base) = all."""
    labels = torch.tensor([0, 1, 2, 2])
    x = _batch(labels, seed=5)
    base = gaussians.conditional_denoiser(labels)
    sigma, w = torch.full((4,), 1.3, dtype=torch.float64), 2.5
    out = {
        name: GuidedDenoiser(base, gaussians.term(name, labels), w)(x, sigma)
        for name in ("positive", "negative", "mean_shift", "all")
    }
    b = base(x, sigma)
    summed = sum(out[name] - b for name in ("positive", "negative", "mean_shift"))
    torch.testing.assert_close(summed, out["all"] - b, rtol=0, atol=1e-12)
    # with the Gaussian base, "all" is CFG of the Gaussians: D_u + (1 + w)(D_c - D_u)
    cfg = gaussians.unconditional(x, sigma) + (1 + w) * (b - gaussians.unconditional(x, sigma))
    torch.testing.assert_close(out["all"], cfg, rtol=0, atol=1e-12)
    # a limited interval leaves the base untouched outside it
    limited = GuidedDenoiser(base, gaussians.term("positive", labels), w, GuidanceInterval(2.0, 5.0))
    assert torch.equal(limited(x, sigma), b)


def test_conditional_denoiser_rows_and_mixed_sigmas(gaussians):
    labels = torch.tensor([2, 0, 2, 1])
    x = _batch(labels, seed=7).float()
    sigma = torch.tensor([0.5, 0.5, 3.0, 0.5])
    out = gaussians.conditional_denoiser(labels)(x, sigma)
    assert out.dtype == torch.float32
    for i, c in enumerate(labels.tolist()):
        torch.testing.assert_close(out[i], gaussians.conditional[c](x[i : i + 1], float(sigma[i]))[0])


def test_fit_and_label_validation(labeled):
    data, labels = labeled
    with pytest.raises(ValueError, match="labels"):
        ClassGaussians.fit(data, labels.double())
    with pytest.raises(ValueError, match="labels"):
        ClassGaussians.fit(data, labels, num_classes=2)
    few = labels.clone()
    few[0] = 3
    with pytest.raises(ValueError, match="class 3 has 1 samples"):
        ClassGaussians.fit(data, few)
    gaussians = ClassGaussians.fit(data, labels)
    with pytest.raises(ValueError, match="labels"):
        gaussians.split(data[:2], 1.0, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="labels"):
        gaussians.split(data[:2], 1.0, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="name"):
        gaussians.term("shift", torch.tensor([0]))
    with pytest.raises(ValueError, match="label"):
        gaussians.contrastive_components(3, 1.0)
