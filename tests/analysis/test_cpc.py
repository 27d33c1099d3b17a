"""Per-sample CPCs from batched JVP/VJP subspaces, checked on class Gaussians (exact W_c - W_u)."""

from __future__ import annotations

import pytest
import torch

from diffcore.analysis import contrastive_components, subspace_overlap
from diffcore.denoisers import ClassGaussians


@pytest.fixture(scope="module")
def gaussians():
    g = torch.Generator().manual_seed(11)
    rows, labels = [], []
    for c in range(2):
        scales = torch.linspace(2.0, 0.1, 16, dtype=torch.float64) ** (1 + c)
        rows.append(torch.randn(200, 16, generator=g, dtype=torch.float64) * scales + 0.5 * c)
        labels.append(torch.full((200,), c))
    return ClassGaussians.fit(torch.cat(rows).reshape(-1, 1, 4, 4), torch.cat(labels))


@pytest.mark.parametrize("method", ["lanczos", "subspace"])
def test_per_sample_cpcs_of_gaussians_are_the_linear_cpcs(gaussians, method):
    labels = torch.tensor([0, 1, 1])
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma, k = 0.6, 4
    comps = contrastive_components(
        gaussians.conditional_denoiser(labels),
        gaussians.unconditional,
        x,
        sigma,
        k,
        method=method,
        tol=1e-10,
        iters=200 if method == "subspace" else None,
    )
    assert comps.eigenvalues.shape == (3, k) and comps.vectors.shape == (3, k, 1, 4, 4)
    for b, c in enumerate(labels.tolist()):
        values, vectors = gaussians.contrastive_components(c, sigma)
        top = values.abs().argsort(descending=True)[:k]
        torch.testing.assert_close(comps.eigenvalues[b], values[top], rtol=1e-7, atol=1e-9)
        assert float(subspace_overlap(comps.vectors[b].reshape(k, 16), vectors[:, top].T)) > 1 - 1e-8
        assert bool((comps.symmetry[b].abs() > 1 - 1e-8).all())  # symmetric Jacobian: u = +-v


def test_subspace_overlap_bounds():
    basis = torch.eye(6, dtype=torch.float64)
    assert float(subspace_overlap(basis[:2], basis[:2] * 3.0)) == pytest.approx(1.0, abs=1e-12)
    assert float(subspace_overlap(basis[:2], basis[2:4])) == pytest.approx(0.0, abs=1e-12)
    half = torch.stack([basis[0] + basis[2], basis[1]])
    assert float(subspace_overlap(basis[:2], half)) == pytest.approx(0.75, abs=1e-12)  # cos^2 = 1/2 and 1
