"""Loaded weights are never cast silently (issue 32): a reused checkpoint or Inception weights file
whose tensors have another dtype than the model's (int8, float16, complex) or hold NaN is refused,
naming the tensor and the file."""

from __future__ import annotations

import pytest
import torch

from diffcore.train import load_trained_model, save_checkpoint
from diffcore.train.registry import register_model

register_model("test-linear-3x2", lambda: torch.nn.Linear(3, 2), overwrite=True)


def _checkpoint(folder, weight: torch.Tensor):
    good = torch.nn.Linear(3, 2).state_dict()
    tensors = {"model": {**good, "weight": weight}, "ema": {**good, "weight": weight}}
    save_checkpoint(
        folder / "checkpoints", 5, tensors=tensors, documents={"config": {"model": {"name": "test-linear-3x2"}}}
    )
    return folder


@pytest.mark.parametrize(
    "weight,message",
    [
        (torch.ones(2, 3, dtype=torch.int8), "dtype int8"),
        (torch.ones(2, 3, dtype=torch.float16), "dtype float16"),
        (torch.ones(2, 3, dtype=torch.complex64), "dtype complex64"),
        (torch.full((2, 3), float("nan")), "NaN"),
    ],
    ids=["int8", "fp16", "complex", "nan"],
)
def test_a_checkpoint_with_wrong_dtype_or_nan_weights_is_refused(tmp_path, weight, message):
    folder = _checkpoint(tmp_path / "run", weight)
    with pytest.raises(ValueError, match=f"checkpoint .*run.* tensor 'weight' .*{message}"):
        load_trained_model(folder)


def test_a_checkpoint_with_the_models_dtypes_loads(tmp_path):
    folder = _checkpoint(tmp_path / "run", torch.full((2, 3), 0.5))
    assert torch.equal(load_trained_model(folder).weight, torch.full((2, 3), 0.5))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.half(), "dtype float16"),
        (lambda t: t.to(torch.int8), "dtype int8"),
        (lambda t: t.to(torch.complex64), "dtype complex64"),
        (lambda t: t * float("nan"), "NaN"),
    ],
    ids=["fp16", "int8", "complex", "nan"],
)
def test_inception_weights_with_wrong_dtype_or_nan_are_refused(tmp_path, change, message):
    from diffcore.metrics import InceptionFeatures, inception_features

    state = {k: v for k, v in InceptionFeatures().state_dict().items() if not k.endswith("num_batches_tracked")}
    key = "Conv2d_1a_3x3.conv.weight"
    assert key in state
    state[key] = change(state[key])
    path = tmp_path / "inception-bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"inception-bad.pth.*tensor '{key}' .*{message}"):
        inception_features(path)
