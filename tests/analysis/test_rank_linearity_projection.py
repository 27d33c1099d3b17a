"""numerical_rank, Frobenius estimates, trajectory ranks, local linearity and subspace helpers."""

from __future__ import annotations

import math

import pytest
import torch

from diffcore.analysis import (
    edit_direction,
    euler_trajectory,
    frobenius_norm_sq,
    jacobian_full,
    jacobian_subspace,
    local_linearity,
    null_space_project,
    numerical_rank,
    principal_angles,
    rank_along_trajectory,
)


def test_numerical_rank_criteria_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1])  # s^2: 9, 4, 1, 0.25, 0.01; total 14.26
    # frobenius: cumulative s^2 > 0.99^2 * 14.26 = 13.976 -> 9 + 4 + 1 = 14 at k = 3
    assert int(numerical_rank(s)) == 3
    # energy: cumulative > 0.99 * 14.26 = 14.117 -> 14.25 at k = 4; ratio 0.9: > 12.834 -> k = 2
    assert int(numerical_rank(s, criterion="energy")) == 4
    assert int(numerical_rank(s, 0.9, "energy")) == 2
    # frobenius at 0.9: > 0.81 * 14.26 = 11.55 -> k = 2; at 0.95: > 12.87 -> 13 at k = 2
    assert int(numerical_rank(s, 0.95)) == 2
    # flat spectrum, total 4: frobenius 0.8 -> > 2.56 -> k = 3; energy 0.8 -> > 3.2 -> k = 4
    s2 = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert int(numerical_rank(s2, 0.9)) == 4 and int(numerical_rank(s2, 0.9, "energy")) == 4
    assert int(numerical_rank(s2, 0.8)) == 3 and int(numerical_rank(s2, 0.8, "energy")) == 4
    batch = torch.stack([s, s.flip(0)])  # order does not matter
    assert numerical_rank(batch).tolist() == [3, 3]
    assert int(numerical_rank(torch.zeros(5))) == 0
    assert int(numerical_rank(s[:2], frobenius_sq=torch.tensor(14.26))) == 3  # not reached: r + 1
    with pytest.raises(ValueError, match="criterion"):
        numerical_rank(s, criterion="nuclear")
    with pytest.raises(ValueError, match="ratio"):
        numerical_rank(s, ratio=1.5)


def test_frobenius_estimate_with_and_without_deflation(gapped_gaussian):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(gapped_gaussian.jacobian(0.5)) ** 2
    plain = frobenius_norm_sq(gapped_gaussian, x, 0.5, probes=400, seed=1)
    assert torch.allclose(plain, exact.expand(2), rtol=0.2)
    sub = jacobian_subspace(gapped_gaussian, x, 0.5, 6, tol=1e-8)
    deflated = sub.singular_values.square().sum(1) + frobenius_norm_sq(gapped_gaussian, x, 0.5, basis=sub.V, probes=16)
    assert torch.allclose(deflated, exact.expand(2), rtol=1.5e-2)  # remainder ~2% of the total, estimated to ~35%


def test_euler_trajectory_converges_to_the_exact_gaussian_flow(gapped_gaussian):
    x_T = 10.0 * torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    errors = []
    for steps in (50, 100):
        sig = torch.logspace(1, math.log10(0.05), steps + 1, dtype=torch.float64)
        end = euler_trajectory(gapped_gaussian, x_T, sig)[-1]
        errors.append(float((end - gapped_gaussian.exact_flow(x_T, 10.0, 0.05)).norm()))
    assert errors[1] < 0.03 * float(x_T.norm())
    assert 1.7 < errors[0] / errors[1] < 2.3  # first order


def test_rank_along_trajectory_full_and_top_k(molrg):
    x_T = 20.0 * torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sig = torch.cat([torch.logspace(math.log10(20.0), math.log10(0.01), 12, dtype=torch.float64), torch.zeros(1)])
    full = rank_along_trajectory(molrg, x_T, sig, progress=False)
    assert full.ranks.shape == (12, 2) and full.sigmas.shape == (12,)
    assert full.ranks[-1].tolist() == [4, 4]  # one 4-dim component at the end
    assert bool((full.ranks[0] >= 4).all())  # high noise: components mix
    topk = rank_along_trajectory(
        molrg, x_T, sig, trajectory=euler_trajectory(molrg, x_T, sig), k=6, progress=False, method="lanczos", tol=1e-8
    )
    assert topk.ranks[-1].tolist() == [4, 4]
    assert torch.allclose(topk.singular_values[-1], full.singular_values[-1, :, :6], atol=1e-6)
    with pytest.raises(ValueError, match="trajectory"):
        rank_along_trajectory(molrg, x_T, sig, trajectory=[x_T], progress=False)
    seeded = rank_along_trajectory(molrg, [0, 1], sig[-4:], shape=(3, 4, 4), dtype=torch.float64, progress=False)
    assert seeded.ranks.shape == (3, 2) and seeded.points.shape == (3, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        rank_along_trajectory(molrg, [0, 1], sig, progress=False)


def test_local_linearity(gapped_gaussian, molrg):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dirs = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    lin = local_linearity(gapped_gaussian, x, 0.5, dirs, [0.1, 1.0, 10.0])
    assert lin.rel_error.shape == (2, 3, 3)
    assert float(lin.rel_error.max()) < 1e-10 and float((1 - lin.cosine).abs().max()) < 1e-10
    x0 = molrg.sample(2, seed=5, dtype=torch.float64)
    nonlin = local_linearity(molrg, x0 + 0.3 * x, 0.3, dirs, [1e-3, 1.0, 5.0])
    err = nonlin.rel_error.mean(dim=(0, 1))
    assert float(err[0]) < 1e-2 and float(err[0]) < float(err[2])  # linear for small steps only
    per_point = local_linearity(molrg, x0, 0.3, dirs[None].expand(2, 3, 3, 4, 4), [0.5])
    assert per_point.cosine.shape == (2, 3, 1)
    with pytest.raises(ValueError, match="directions"):
        local_linearity(molrg, x0, 0.3, torch.randn(3, 48), [0.5])


def test_null_space_projection_and_principal_angles():
    g = torch.Generator().manual_seed(6)
    basis = torch.randn(3, 10, generator=g, dtype=torch.float64)
    v = torch.randn(4, 10, generator=g, dtype=torch.float64)
    p = null_space_project(v, basis)
    assert torch.allclose(p @ basis.T, torch.zeros(4, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(null_space_project(p, basis), p, atol=1e-12)
    assert null_space_project(v[0], basis).shape == (10,)
    e = torch.eye(3, dtype=torch.float64)
    theta = math.radians(30.0)
    a = e[:2]
    b = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]])
    assert torch.allclose(principal_angles(a, b), torch.tensor([0.0, 30.0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(
        principal_angles(a[None].repeat(2, 1, 1), 3 * a[None].repeat(2, 1, 1)),
        torch.zeros(2, 2, dtype=torch.float64),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="v"):
        null_space_project(torch.randn(2, 9), basis)


def test_edit_direction_is_orthogonal_to_the_outside_subspace(mlp_denoiser):
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(2, 4, 4, dtype=torch.float64)
    mask[:, :2, :2] = 1
    d = edit_direction(mlp_denoiser, x, 0.5, mask, k_out=3, tol=1e-10, method="lanczos")
    assert d.shape == x.shape
    assert torch.allclose(d.reshape(2, -1).norm(dim=1), torch.ones(2, dtype=torch.float64))
    outside = jacobian_subspace(mlp_denoiser, x, 0.5, 3, mask=1 - mask, tol=1e-10, method="lanczos")
    assert float((outside.V.flatten(2) @ d.reshape(2, -1, 1)).abs().max()) < 1e-8
    jac = jacobian_full(mlp_denoiser, x, 0.5)
    inside_gain = (mask.reshape(1, -1, 1) * jac @ d.reshape(2, -1, 1)).norm(dim=1)
    assert bool((inside_gain > 0).all())


def test_principal_angles_resolve_small_angles_in_float32():
    e = torch.eye(4)
    for degrees in (1e-3, 0.05, 1.0, 60.0, 90.0):
        t = math.radians(degrees)
        a = e[:2]
        b = torch.stack([e[0], math.cos(t) * e[1] + math.sin(t) * e[3]])
        got = principal_angles(a, b)
        assert abs(float(got[1]) - degrees) < 1e-4 * max(1.0, degrees), (degrees, got)
        assert float(got[0]) < 1e-4
    # unequal sizes: a 1-dim span inside a 3-dim span has one zero angle
    assert principal_angles(e[:3], e[1:2]).shape == (1,)
    assert float(principal_angles(e[1:2], e[:3])[0]) < 1e-4
