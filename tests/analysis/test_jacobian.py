"""jacobian_subspace and jacobian_full against exact SVDs and analytic Jacobians."""

from __future__ import annotations

import pytest
import torch

import diffcore
from diffcore.analysis import JacobianOperator, jacobian_full, jacobian_subspace, numerical_rank, principal_angles

METHODS = ["subspace", "randomized", "lanczos"]


def exact_svd(jac, k):
    u, s, vh = torch.linalg.svd(jac)
    return s[:, :k], u[:, :, :k].transpose(1, 2), vh[:, :k]


def test_jacobian_full_matches_autograd(mlp_denoiser):
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64)
    fwd = jacobian_full(mlp_denoiser, x, sigma, chunk_size=7)
    rev = jacobian_full(mlp_denoiser, x, sigma, mode="rev", chunk_size=5)
    for b in range(3):
        ref = torch.autograd.functional.jacobian(
            lambda z, b=b: mlp_denoiser(z[None], sigma[b : b + 1])[0], x[b]
        ).reshape(32, 32)
        assert torch.allclose(fwd[b], ref, atol=1e-12)
        assert torch.allclose(rev[b], ref, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_matches_exact_svd_of_a_nonlinear_denoiser(mlp_denoiser, method):
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    k = 5
    s_ref, u_ref, v_ref = exact_svd(jacobian_full(mlp_denoiser, x, sigma), k)
    iters = {"subspace": 300, "randomized": 8, "lanczos": 32}[method]
    res = jacobian_subspace(mlp_denoiser, x, sigma, k, method=method, tol=1e-10, iters=iters, oversample=6)
    assert res.U.shape == (2, k, 2, 4, 4) and res.V.shape == (2, k, 2, 4, 4)
    assert torch.allclose(res.singular_values, s_ref, rtol=1e-6, atol=1e-9)
    # each singular vector matches up to sign (the spectrum of this net is simple)
    cos_v = (res.V.flatten(2) * v_ref).sum(-1).abs()
    cos_u = (res.U.flatten(2) * u_ref).sum(-1).abs()
    assert float(cos_v.min()) > 1 - 1e-6 and float(cos_u.min()) > 1 - 1e-6
    if method != "randomized":
        assert bool(res.converged.all())
    assert float(res.residuals.max()) < 1e-5


@pytest.mark.parametrize("probes", ["vmap", "batch", "loop"])
def test_probe_modes_agree_and_runs_are_reproducible(mlp_denoiser, probes):
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = jacobian_subspace(mlp_denoiser, x, 0.5, 3, iters=5, seed=7)
    res = jacobian_subspace(mlp_denoiser, x, 0.5, 3, iters=5, seed=7, probes=probes)
    assert torch.allclose(res.singular_values, ref.singular_values, atol=1e-12)
    assert torch.allclose(res.V, ref.V, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_gaussian_jacobian_subspace_within_one_degree(gapped_gaussian, method):
    den = gapped_gaussian.to("cpu")
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(3))  # float32 inputs
    sigma = 0.5
    res = jacobian_subspace(den, x, sigma, 6, method=method, tol=1e-4)
    lam = den.eigvals[:6]
    assert torch.allclose(res.singular_values.double(), (lam / (lam + sigma**2)).expand(3, 6), rtol=1e-4)
    top = den.eigvecs[:, :6].T.float()
    assert float(principal_angles(res.V.flatten(2), top).max()) <= 1.0
    assert float(principal_angles(res.U.flatten(2), top).max()) <= 1.0
    assert bool(res.converged.all())


def test_molrg_rank_is_the_component_dimension_at_small_sigma(molrg):
    x0, labels = molrg.sample(3, seed=4, dtype=torch.float64, return_labels=True)
    x = x0 + 0.01 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    svals = torch.linalg.svdvals(jacobian_full(molrg, x, 0.01))
    assert numerical_rank(svals).tolist() == [4, 4, 4]
    res = jacobian_subspace(molrg, x, 0.01, 4, method="lanczos", tol=1e-8)
    for b in range(3):
        basis = molrg.bases[labels[b]].T
        assert float(principal_angles(res.V[b].flatten(1), basis).max()) <= 1.0
    assert torch.allclose(res.singular_values, torch.full((3, 4), 1 / (1 + 0.01**2), dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_output_and_input_masks(mlp_denoiser, method):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g)
    out_mask = torch.zeros(2, 4, 4, dtype=torch.float64)
    out_mask[:, 1:3, 1:4] = 1  # 12 output pixels
    in_mask = (torch.rand(2, 2, 4, 4, generator=g) > 0.4).double()  # per-point input masks
    jac = jacobian_full(mlp_denoiser, x, 0.8)
    masked = out_mask.reshape(1, -1, 1) * jac * in_mask.reshape(2, 1, -1)
    s_ref, _, v_ref = exact_svd(masked, 4)
    iters = {"subspace": 300, "randomized": 8, "lanczos": 32}[method]
    res = jacobian_subspace(
        mlp_denoiser, x, 0.8, 4, mask=out_mask, input_mask=in_mask, method=method, tol=1e-10, iters=iters, oversample=6
    )
    assert torch.allclose(res.singular_values, s_ref, rtol=1e-6, atol=1e-9)
    assert float(principal_angles(res.V.flatten(2), v_ref).max()) < 0.1
    # U vanishes outside the output mask and V outside the input mask
    assert float((res.U * (1 - out_mask)).abs().max()) < 1e-12
    assert float((res.V * (1 - in_mask[:, None])).abs().max()) < 1e-12


def test_lanczos_handles_a_rank_deficient_operator(mlp_denoiser):
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    mask = torch.zeros(2, 4, 4, dtype=torch.float64)
    mask[0, 0, :2] = 1  # rank <= 2
    res = jacobian_subspace(mlp_denoiser, x, 1.0, 4, mask=mask, method="lanczos", tol=1e-10)
    s_ref = torch.linalg.svdvals(mask.reshape(1, -1, 1) * jacobian_full(mlp_denoiser, x, 1.0))[:, :4]
    assert torch.allclose(res.singular_values, s_ref, atol=1e-9)
    assert bool(res.converged.all())


class _AttentionDenoiser(torch.nn.Module):
    """A trained network's situation: parameters that require grad and a self-attention layer
    (``diffcore.ops.attention``, the UNet's), on [B, 1, 4, 4] (16 positions, 2 heads of 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(1, 24, dtype=torch.float64)
        self.out = torch.nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x, sigma):
        tokens = x.reshape(x.shape[0], 16, 1)
        q, k, v = self.qkv(torch.tanh(tokens)).reshape(x.shape[0], 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
        h = diffcore.ops.attention(q, k, v).transpose(1, 2).reshape(x.shape[0], 16, 8)
        return (self.out(h).reshape(x.shape) + x) / 2


def test_products_record_no_graph_for_the_parameters():
    """J = dD/dx only: with parameters that require grad (a trained network), the JVPs and the
    vmapped VJPs (through attention) record no autograd graph, so the blocks of an SVD do not hold
    every probe's activations (the watermark learned run grew to 13.5 GB that way); the values are
    those of the same network with frozen parameters."""
    net = _AttentionDenoiser()
    frozen = _AttentionDenoiser().requires_grad_(False)
    assert all(p.requires_grad for p in net.parameters())
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    block = torch.randn(3, 16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for probes in ("vmap", "batch", "loop"):
        op, ref = (JacobianOperator(d, x, 0.7, probes=probes) for d in (net, frozen))
        for product in ("matvec", "rmatvec"):
            out = getattr(op, product)(block)
            assert not out.requires_grad and out.grad_fn is None, (probes, product)
            assert torch.allclose(out, getattr(ref, product)(block), atol=1e-12)
    res = jacobian_subspace(net, x, 0.7, 4, method="randomized", seed=3)
    assert not any(t.requires_grad for t in (res.singular_values, res.U, res.V, res.residuals))
    ref = jacobian_subspace(frozen, x, 0.7, 4, method="randomized", seed=3)
    assert torch.allclose(res.singular_values, ref.singular_values)


def test_bad_input_gives_clear_errors(mlp_denoiser):
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="k: 33 exceeds"):
        jacobian_subspace(mlp_denoiser, x, 1.0, 33)
    with pytest.raises(ValueError, match="mask"):
        jacobian_subspace(mlp_denoiser, x, 1.0, 2, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="input_mask"):
        jacobian_subspace(mlp_denoiser, x, 1.0, 2, input_mask=torch.ones(3, 2, 4, 4))
    with pytest.raises(ValueError, match="method"):
        jacobian_subspace(mlp_denoiser, x, 1.0, 2, method="qr")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        jacobian_subspace(lambda z, s: z * float("nan"), x, 1.0, 2)
    with pytest.raises(FloatingPointError, match="Jacobian-vector product"):
        jacobian_subspace(lambda z, s: torch.sqrt(z.abs()), torch.zeros_like(x), 1.0, 2)
    with pytest.raises(ValueError, match="denoiser"):
        jacobian_subspace(lambda z, s: z[:, :1], x, 1.0, 2)


@pytest.mark.gpu
def test_gpu_matches_cpu(gapped_gaussian, device):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    cpu = jacobian_subspace(gapped_gaussian, x, 0.5, 6, tol=1e-8)
    gpu = jacobian_subspace(gapped_gaussian.to(device), x.to(device), 0.5, 6, tol=1e-8)
    assert torch.allclose(gpu.singular_values.cpu(), cpu.singular_values, atol=1e-8)
    assert float(principal_angles(gpu.V.flatten(2).cpu(), cpu.V.flatten(2)).max()) < 1e-3
