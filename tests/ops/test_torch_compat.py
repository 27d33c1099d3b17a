"""diffcore.ops._torch_compat: each private-torch helper against the public behaviour it stands
for, on the installed torch (CI runs the suite on the torch versions pyproject.toml allows)."""
from __future__ import annotations

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
