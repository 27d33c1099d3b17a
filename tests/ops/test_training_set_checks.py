"""The three ops over a training set refuse a bad one with the same message, naming ``train``
(diffcore._checks.check_training_set / check_magnitude, shared by knn, empirical_denoise and
local_denoise)."""

import pytest
import torch

from diffcore.ops import empirical_denoise, knn, local_denoise

OPS = {
    "knn": ("queries", lambda q, train: knn(q, train, 1, backend="cpu")),
    "empirical_denoise": ("x", lambda q, train: empirical_denoise(q, train, 0.5, backend="cpu")),
    "local_denoise": ("x", lambda q, train: local_denoise(q, train, 0.5, backend="cpu")),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_trailing_shape_mismatch_names_train_and_the_queries(op):
    queries_name, call = OPS[op]
    q = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=rf"train: expected trailing shape \(1, 4, 4\) \(that of {queries_name}\)"):
        call(q, torch.zeros(3, 1, 4, 5))


@pytest.mark.parametrize("op", ["knn", "empirical_denoise"])
def test_empty_training_set_and_huge_values_are_refused(op):
    queries_name, call = OPS[op]
    q = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="train: expected at least one training row"):
        call(q, torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match=rf"{queries_name}: expected values of magnitude <= 1e\+15"):
        call(q + 1e16, torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match=rf"{queries_name}: contains NaN"):
        call(q + float("nan"), torch.zeros(3, 1, 4, 4))
