"""Losses, EMA, warm-up, data order, checkpoint files, optimizer flattening, model registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load as safetensors_load, save as safetensors_save
from tiny_model import Oracle

from diffcore.train import (
    EMA,
    BatchOrder,
    CheckpointError,
    DDPMLoss,
    EDMLoss,
    TrainConfig,
    build_model,
    load_checkpoint,
    register_model,
    save_checkpoint,
)
from diffcore.train.checkpoint import (
    flatten_optimizer_state,
    latest_checkpoint,
    list_checkpoints,
    unflatten_optimizer_state,
)
from diffcore.train.ddp import DistributedContext, gather_by_seed, map_seeds, shard_seeds
from diffcore.train.loss import ema_beta, lr_at


def test_edm_loss_sigma_distribution_and_weight():
    loss = EDMLoss()
    sigma = loss.sample_sigma(200_000, torch.Generator().manual_seed(0), "cpu")
    assert abs(sigma.log().mean().item() + 1.2) < 0.01 and abs(sigma.log().std().item() - 1.2) < 0.01
    s = torch.tensor([0.1, 0.5, 2.0])
    assert torch.allclose(loss.weight(s), (s**2 + 0.25) / (s * 0.5) ** 2)
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    assert torch.equal(loss(Oracle(x0), x0, s, noise), torch.zeros(3))
    off = loss(Oracle(x0 + 0.1), x0, s, noise)
    assert torch.allclose(off, loss.weight(s) * 0.01)


def test_ddpm_loss_is_epsilon_mse():
    loss = DDPMLoss()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert math.isclose(loss.sigmas[0].item(), math.sqrt(1e-4 / (1 - 1e-4)), rel_tol=1e-5)
    assert torch.all(loss.sigmas[1:] > loss.sigmas[:-1])
    ab = torch.cumprod(1 - betas, 0)[-1]
    assert math.isclose(loss.sigmas[-1].item(), ((1 - ab) / ab).sqrt().item(), rel_tol=1e-5)
    sigma = loss.sample_sigma(5, torch.Generator().manual_seed(1), "cpu")
    assert all(torch.isclose(loss.sigmas, s).any() for s in sigma)
    x0, noise = torch.randn(5, 6), torch.randn(5, 6)
    denoised = x0 + 0.3 * torch.randn(5, 6)
    expected = ((denoised - x0) ** 2).mean(1) / sigma**2  # |eps_hat - eps|^2 = |D - x0|^2 / sigma^2
    assert torch.allclose(loss(Oracle(denoised), x0, sigma, noise), expected, rtol=1e-4)


def test_ema_halflife_in_images():
    assert ema_beta(100, 10**9, 1000, None) == pytest.approx(0.5**0.1)
    assert ema_beta(100, 200, 1000, 0.5) == pytest.approx(0.5)  # ramp-up caps the half-life at 100
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, halflife_images=64)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(8):  # 8 steps x 8 images = one half-life
        ema.update(model, batch_images=8, images_seen=10**6)
    assert ema.ema_model.weight.item() == pytest.approx(0.5, abs=1e-6)
    assert not ema.ema_model.weight.requires_grad


def test_lr_warmup():
    assert lr_at(50, 1e-3, 100) == pytest.approx(5e-4)
    assert lr_at(500, 1e-3, 100) == 1e-3 and lr_at(1, 1e-3, 0) == 1e-3


def test_batch_order_epochs_and_straddling():
    order = BatchOrder(num_items=10, batch_size=4, seed=7)
    stream = torch.cat([order.indices(s) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])
    assert torch.equal(BatchOrder(10, 4, 7).indices(3), order.indices(3))  # depends on (seed, step) only
    assert order.epoch_of(3) == (1, 2)
    big = BatchOrder(num_items=3, batch_size=8, seed=0).indices(0)  # batch larger than the dataset
    assert big.shape == (8,) and sorted(big[:3].tolist()) == [0, 1, 2]


def _tensors():
    return {"model": {"w": torch.randn(3, 4), "b": torch.arange(5)}, "rng": {"s": torch.get_rng_state()}}


def test_checkpoint_roundtrip(tmp_path):
    tensors = _tensors()
    path = save_checkpoint(tmp_path, 12, tensors, {"state": {"step": 12, "x": [1, 2]}})
    assert path.name == "step_000000012" and (path / "MANIFEST.json").exists()
    loaded = load_checkpoint(path)
    assert loaded.step == 12 and loaded.documents["state"] == {"step": 12, "x": [1, 2]}
    for group, values in tensors.items():
        for key, value in values.items():
            assert torch.equal(loaded.tensors[group][key], value)
    (tmp_path / ".tmp-step_000000020-999").mkdir()  # a killed writer's leftover
    assert latest_checkpoint(tmp_path) == path
    again = save_checkpoint(tmp_path, 12, {"model": {"w": torch.zeros(2)}}, {})  # rewrite the same step
    assert torch.equal(load_checkpoint(again).tensors["model"]["w"], torch.zeros(2))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [12]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated"),
        ("flip", "corrupted"),
        ("manifest", "incomplete"),
        ("garbled_manifest", "malformed MANIFEST"),
        ("delete", "missing"),
    ],
)
def test_damaged_checkpoint_raises(tmp_path, damage, message):
    path = save_checkpoint(tmp_path, 3, _tensors(), {"state": {"step": 3}})
    target = path / "model.safetensors"
    payload = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(payload[: len(payload) // 2])
    elif damage == "flip":
        target.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    elif damage == "manifest":
        (path / "MANIFEST.json").unlink()
    elif damage == "garbled_manifest":
        (path / "MANIFEST.json").write_text("{not json")
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_optimizer_state_roundtrip_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        model(data).square().mean().backward()
        opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values()) and "state.0.exp_avg" in tensors
    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(model.state_dict())
    clone_opt = torch.optim.Adam(clone.parameters(), lr=1e-2)
    tensors = safetensors_load(safetensors_save(tensors))  # through the file format, as in a checkpoint
    meta = json.loads(json.dumps(meta))
    clone_opt.load_state_dict(unflatten_optimizer_state(tensors, meta))
    for m, o in ((model, opt), (clone, clone_opt)):
        o.zero_grad()
        m(data).square().mean().backward()
        o.step()
    assert torch.equal(model.weight, clone.weight) and torch.equal(model.bias, clone.bias)


def test_build_model_registry_and_errors():
    @register_model("test_linear_denoiser")
    def factory(width=2):
        return torch.nn.Linear(width, width)

    assert isinstance(build_model({"name": "test_linear_denoiser", "width": 3}), torch.nn.Linear)
    assert isinstance(build_model({"name": "tiny_denoiser", "width": 4}), torch.nn.Module)
    with pytest.raises(ValueError, match="unknown model name 'ddpmpp_typo'"):
        build_model({"name": "ddpmpp_typo"})
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_linear_denoiser", lambda: torch.nn.Identity())
    register_model("test_not_a_module", lambda: 3)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        build_model({"name": "test_not_a_module"})


def test_seed_sharding_single_process():
    assert shard_seeds(range(10), 1, 3) == [1, 4, 7]
    parts = [shard_seeds(range(10), r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))
    context = DistributedContext()
    assert map_seeds(lambda s: s * s, [5, 3, 9], context) == [25, 9, 81]
    with pytest.raises(RuntimeError, match="no result for seeds \\[9\\]"):
        gather_by_seed({5: 1, 3: 2}, [5, 3, 9], context)
    with pytest.raises(ValueError, match="rank"):
        shard_seeds([1, 2], 3, 2)


def test_ddpmpp_entry_builds_the_unet_or_says_what_is_missing():
    import diffcore.models

    spec = {"name": "ddpmpp", "preset": "ddpmpp-digits", "model_channels": 16}
    if not hasattr(diffcore.models, "denoiser_preset"):  # before the UNet is merged
        with pytest.raises(ValueError, match="needs diffcore.models.denoiser_preset"):
            build_model(spec)
        return
    model = build_model(spec)
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.tensor([0.5, 2.0])).shape == x.shape


def test_lr_cosine_decay():
    assert lr_at(100, 1e-3, 100, 300) == 1e-3  # end of the warm-up
    assert lr_at(200, 1e-3, 100, 300) == pytest.approx(5e-4)  # half-way down the cosine
    assert lr_at(300, 1e-3, 100, 300) == pytest.approx(0.0) and lr_at(900, 1e-3, 100, 300) == pytest.approx(0.0)
    assert lr_at(50, 1e-3, 100, 300) == pytest.approx(5e-4)  # warm-up unchanged
    with pytest.raises(ValueError, match="lr_decay_images"):
        TrainConfig(lr_warmup_images=1000, lr_decay_images=500)


def test_checkpoint_temporaries_use_the_one_temporary_name(tmp_path, monkeypatch):
    """A writer killed mid-checkpoint leaves a ``.step_N.XXXXXXXX.tmp`` folder (diffcore._atomic's
    name): never a checkpoint, removed by prune_checkpoints and by the output folders' cleaner."""
    from diffcore import _atomic, _folder
    from diffcore.train.checkpoint import prune_checkpoints

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("diffcore.train.checkpoint.write_bytes_durably", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 7, _tensors(), {})
    monkeypatch.undo()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".step_000000007.") and _atomic.TEMPORARY_NAME.match(left[0])
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    assert _folder.remove_stale_temporaries(tmp_path) == [tmp_path / left[0]]
    for name in (".step_000000008.abcd1234.tmp", ".tmp-step_000000009-42", ".old-step_000000001-42"):
        (tmp_path / name).mkdir()
    save_checkpoint(tmp_path, 10, _tensors(), {})
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000010"]
