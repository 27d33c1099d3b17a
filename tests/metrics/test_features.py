"""Feature extractors: the shipped digits network, and FID's Inception-v3 loaded from a local file
(tested with a stand-in weights file of the same layout, made here with random weights)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from diffcore.data import load_digits
from diffcore.metrics import (
    InceptionFeatures,
    class_accuracy,
    digits_classifier,
    digits_features,
    digits_network_info,
    frechet_distance,
    inception_features,
)
from diffcore.metrics.features import DIGITS_HELDOUT, digits_heldout_split

# ----------------------------------------------------------------------------- digits network


def test_shipped_digits_weights_are_small_and_reach_their_recorded_accuracy():
    from importlib import resources

    size = resources.files("diffcore.data").joinpath("files/digits_cnn.safetensors").stat().st_size
    assert size < 1_000_000
    images, labels = load_digits()
    _, heldout = digits_heldout_split(images.shape[0])
    assert len(heldout) == DIGITS_HELDOUT
    recorded = float(digits_network_info()["heldout_accuracy"])
    measured = class_accuracy(images[heldout], labels[heldout])
    assert abs(measured - recorded) <= 1.0 / DIGITS_HELDOUT  # one image may flip on another CPU
    assert measured >= 0.97


def test_digits_features_and_predictions():
    images, labels = load_digits(as_uint8=True)
    network = digits_features()
    feats = network(images[:5])
    assert feats.shape == (5, 64) and feats.dtype == torch.float32
    assert torch.equal(feats, network(images[:5].float() / 127.5 - 1.0))  # uint8 read as u8/127.5 - 1
    assert digits_classifier().predict(images[:5]).shape == (5,)
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        network(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(images[:4], labels[:3])


def test_digits_frechet_distance_separates_digits_from_noise():
    images, _ = load_digits()
    net = digits_features()
    half_a, half_b = images[0::2], images[1::2]
    noise = torch.rand(half_b.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = frechet_distance(half_a, half_b, extractor=net)
    different = frechet_distance(half_a, noise, extractor=net)
    assert 0 <= same < 0.05 * different


# ----------------------------------------------------------------------------- Inception-v3


@pytest.fixture(scope="module")
def standin_inception_file(tmp_path_factory):
    """A weights file with FID Inception's layout and random weights (the real one is not shipped)."""
    torch.manual_seed(0)
    network = InceptionFeatures()
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / "pt_inception-standin.pth"
    torch.save(state, path)
    return path, network.eval()


@pytest.mark.slow
def test_inception_loads_a_local_file_and_gives_pool3_features(standin_inception_file):
    path, network = standin_inception_file
    loaded = inception_features(path)
    expected = network.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    seen = []
    loaded.Conv2d_1a_3x3.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        feats = loaded(images)
    assert seen == [(1, 3, 299, 299)]  # resized to Inception's input size
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLUs
    # one channel is repeated to RGB; uint8 is read as u8 / 127.5 - 1
    assert torch.equal(loaded.prepare(images[:, :1]), loaded.prepare(images[:, :1].expand(-1, 3, -1, -1)))
    u8 = torch.arange(0, 256, 64, dtype=torch.uint8).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert torch.allclose(loaded.prepare(u8), loaded.prepare(u8.float() / 127.5 - 1), atol=0)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_inception_file_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        inception_features(path)
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as fh:
        pickle.dump({"a": 1}, fh)
    with pytest.raises(ValueError, match="weights_only=True"):
        inception_features(tmp_path / "plain.pkl")
    torch.save({"a": 1}, tmp_path / "numbers.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        inception_features(tmp_path / "numbers.pth")


def test_inception_file_of_another_network_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ValueError, match="do not match FID's Inception-v3: missing"):
        inception_features(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inception_features(tmp_path / "absent.pth")
