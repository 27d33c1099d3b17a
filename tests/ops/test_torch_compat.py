"""diffcore.ops._torch_compat: each private-torch helper against the public behaviour it stands
for, on the installed torch (CI installs the torch release pyproject.toml pins; CONTRIBUTING.md)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad

from diffcore.ops import _torch_compat as compat


def test_forward_ad_active_inside_jvp_only():
    seen = []

    def probe(x):
        seen.append(compat.forward_ad_active())
        return x * 2

    assert not compat.forward_ad_active()
    torch.func.jvp(probe, (torch.ones(3),), (torch.ones(3),))
    with fwad.dual_level():
        assert compat.forward_ad_active()
    assert seen == [True] and not compat.forward_ad_active()


def test_grad_transform_active_inside_grad_only():
    seen = []

    def probe(x):
        seen.append(compat.grad_transform_active())
        return (x * x).sum()

    assert not compat.grad_transform_active()
    torch.func.grad(probe)(torch.ones(3))
    torch.func.jvp(probe, (torch.ones(3),), (torch.ones(3),))
    torch.vmap(probe)(torch.ones(2, 3))
    assert seen == [True, False, False]


def test_plain_tensor_unwraps_gradient_wrappers_and_refuses_vmap():
    x = torch.arange(3.0)
    found = {}

    def probe(t):
        plain = compat.plain_tensor(t)
        found["wrapped"] = torch._C._functorch.is_functorch_wrapped_tensor(t)
        found["plain"] = torch._C._functorch.is_functorch_wrapped_tensor(plain)
        found["equal"] = torch.equal(plain, x)
        found["batched"] = compat.vmap_batched(t)
        return (t * t).sum()

    torch.func.grad(probe)(x)
    assert found == {"wrapped": True, "plain": False, "equal": True, "batched": False}
    assert compat.plain_tensor(None) is None and compat.plain_tensor(x) is x

    def batched(t):
        assert compat.vmap_batched(t)
        try:
            compat.plain_tensor(t)
        except RuntimeError as exc:
            assert "vmap-batched" in str(exc)
        else:
            raise AssertionError("plain_tensor must refuse a vmap-batched tensor")
        return t

    torch.vmap(batched)(torch.ones(2, 3))
    assert not compat.vmap_batched(x) and not compat.vmap_batched(None)


def test_functorch_disabled_lets_kernels_see_plain_tensors():
    def probe(x):
        with compat.functorch_disabled():
            inner = torch.empty(2)  # allocations inside are plain tensors
            assert not torch._C._functorch.is_functorch_wrapped_tensor(inner)
        return (x * x).sum()

    torch.func.grad(probe)(torch.ones(3))


def test_vmap_batched_inside_vmap_only():
    seen = []

    def probe(x):
        seen.append(compat.vmap_batched(x))
        return x * 2

    torch.func.vmap(probe)(torch.ones(2, 3))
    assert seen == [True] and not compat.vmap_batched(torch.ones(3))


def test_int_mm_is_the_exact_integer_product():
    if not compat.has_int_mm():
        pytest.skip("this torch has no torch._int_mm")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-63, 64, (64, 40), generator=g, dtype=torch.int8)
    expected = a.long() @ b.long()
    assert torch.equal(compat.int_mm(a, b).long(), expected)
    out = torch.empty(32, 40, dtype=torch.int32)
    compat.int_mm(a, b, out=out)
    assert torch.equal(out.long(), expected)


def test_foreach_lerp_matches_the_formula():
    targets = [torch.zeros(3, dtype=torch.float64), torch.full((2, 2), 4.0, dtype=torch.float64)]
    sources = [torch.ones(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)]
    expected = [t + 0.25 * (s - t) for t, s in zip(targets, sources)]
    compat.foreach_lerp_(targets, sources, 0.25)
    assert all(torch.equal(t, e) for t, e in zip(targets, expected))
