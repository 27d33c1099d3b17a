"""A run folder is data: the model spec in its config never imports or calls anything (issue 18, item 2)."""

from __future__ import annotations

import os

import pytest
import torch

from diffcore.train import build_model, load_trained_model, save_checkpoint


def test_a_run_folder_naming_os_system_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = {"weight": torch.zeros(2)}
    folder = tmp_path / "downloaded_run"
    save_checkpoint(
        folder / "checkpoints",
        5,
        tensors={"model": weights, "ema": weights},  # manifest matches
        documents={"config": {"model": {"name": "os:system", "command": "touch pwned"}}},
    )
    with pytest.raises(ValueError, match="unknown model name 'os:system'.*registered in code"):
        load_trained_model(folder)
    assert not os.path.exists(tmp_path / "pwned")


@pytest.mark.parametrize("name", ["os:system", "subprocess:call", "builtins:eval", "diffcore.train:build_model"])
def test_no_importable_path_is_a_model_name(name):
    with pytest.raises(ValueError, match="unknown model name"):
        build_model({"name": name})
