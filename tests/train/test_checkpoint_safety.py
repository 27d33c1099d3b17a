"""Checkpoint manifests name only plain files inside the checkpoint: a path leaving the folder, a
link to a device or a FIFO is refused at once, and nothing about an outside file is disclosed
(issue 32: hangs and runaway reads)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from diffcore.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def checkpoint_listing(tmp_path, name: str, size: int):
    """A valid checkpoint whose manifest also lists ``name`` (``size`` bytes)."""
    path = save_checkpoint(tmp_path / "checkpoints", 1, {"model": {"w": torch.ones(2)}}, {"state": {"step": 1}})
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"][name] = {"bytes": size, "sha256": "0" * 64}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    return path


def test_a_manifest_path_leaving_the_checkpoint_is_refused_without_disclosing_its_size(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "1234567"}')
    path = checkpoint_listing(tmp_path, "../../secret.json", 1)
    with pytest.raises(CheckpointError, match=r"lists '\.\./\.\./secret\.json', not a file name") as error:
        load_checkpoint(path)
    # the message names the checkpoint's folder; the temporary folder's name holds a counter
    # (pytest-120 held "20", this secret's size), so the size is looked for in the rest
    assert str(secret.stat().st_size) not in str(error.value).replace(str(tmp_path), "")


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "manifest_dev_zero", "manifest_fifo"])
def test_a_device_or_fifo_in_a_checkpoint_is_refused_without_hanging(tmp_path, deadline, kind):
    path = checkpoint_listing(tmp_path, "extra.json", 1 << 40)
    target = path / ("MANIFEST.json" if kind.startswith("manifest") else "extra.json")
    target.unlink(missing_ok=True)
    if kind.endswith("dev_zero"):
        target.symlink_to("/dev/zero")
    else:
        os.mkfifo(target)
    with pytest.raises(CheckpointError, match="is a symbolic link|not a regular file"):
        load_checkpoint(path)


def tiny_checkpoint(tmp_path, tensors=None, documents=None):
    from diffcore.train import build_model

    spec = {"name": "ddpmpp", "preset": "ddpmpp-digits-light", "model_channels": 4}
    weights = build_model(spec).state_dict()
    return save_checkpoint(
        tmp_path / "checkpoints",
        2,
        tensors=tensors if tensors is not None else {"model": weights, "ema": weights},
        documents=documents if documents is not None else {"config": {"model": spec}},
    )


def test_a_checkpoint_without_config_json_is_named(tmp_path):
    from diffcore.train import load_trained_model

    path = tiny_checkpoint(tmp_path, tensors={"ema": {"w": torch.zeros(1)}}, documents={"state": {}})
    with pytest.raises(CheckpointError, match=r"has no config.json with a model spec"):
        load_trained_model(path)


def test_a_wrong_shape_tensor_in_a_reused_checkpoint_is_named(tmp_path):
    from diffcore.train import build_model, load_trained_model

    spec = {"name": "ddpmpp", "preset": "ddpmpp-digits-light", "model_channels": 4}
    weights = build_model(spec).state_dict()
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 1, 1)
    path = tiny_checkpoint(tmp_path, tensors={"model": weights, "ema": weights})
    with pytest.raises(CheckpointError, match=f"ema.safetensors does not fit the model of its config.json: .*{name}"):
        load_trained_model(path)
