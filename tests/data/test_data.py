"""Datasets: digits, CIFAR-10 (fake folders in the real formats), image folders, MoLRG, subsets."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from diffcore.data import (
    ArrayDataset,
    load_cifar10,
    load_dataset,
    load_digits,
    load_image_folder,
    molrg,
    subset,
    subset_indices,
    uint8_to_unit,
    unit_to_uint8,
)
from diffcore.data.cifar10 import write_cifar10_binary_batch


def _fake_cifar(rng, n):
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=n)


@pytest.fixture
def cifar_bin(tmp_path):
    """A cifar-10-batches-bin folder with 7 records per train batch and 5 test records."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    content = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels = _fake_cifar(rng, 5 if name == "test_batch" else 7)
        write_cifar10_binary_batch(folder / f"{name}.bin", images, labels)
        content[name] = (images, labels)
    return tmp_path, content


def test_digits_range_and_uint8():
    x, y = load_digits()
    u8, _ = load_digits(as_uint8=True)
    assert x.shape == (1797, 1, 8, 8) and u8.dtype == torch.uint8
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(unit_to_uint8(x), u8)
    assert torch.equal(uint8_to_unit(u8), x)
    assert sorted(y.unique().tolist()) == list(range(10))


def test_cifar10_binary_reads_exact_records(cifar_bin):
    root, content = cifar_bin
    for ds_root in (root, root / "cifar-10-batches-bin"):
        train = load_cifar10(ds_root, "train")
        assert len(train) == 35 and train.values.dtype == torch.uint8
        expected = np.concatenate([content[f"data_batch_{i}"][0] for i in range(1, 6)])
        assert np.array_equal(train.values.numpy(), expected)
        labels = np.concatenate([content[f"data_batch_{i}"][1] for i in range(1, 6)])
        assert np.array_equal(train.labels.numpy(), labels)
    test = load_cifar10(root, "test")
    assert np.array_equal(test.values.numpy(), content["test_batch"][0])
    x, _ = test.batch(torch.tensor([0, 4]))
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(x[1], uint8_to_unit(torch.from_numpy(content["test_batch"][0][4])))


def test_cifar10_errors(tmp_path, cifar_bin):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batch files"):
        load_cifar10(tmp_path / "empty")
    root, _ = cifar_bin
    batch = root / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="malformed CIFAR-10 batch.*data_batch_3"):
        load_cifar10(root)
    (root / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(root)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(root, "validation")


def _write_py_batch(path, images, labels):
    with open(path, "wb") as fh:
        pickle.dump(
            {
                b"batch_label": b"fake",
                b"labels": list(map(int, labels)),
                b"data": images.reshape(len(labels), 3072),
                b"filenames": [b"a"] * len(labels),
            },
            fh,
            protocol=2,
        )


def test_cifar10_python_pickle_restricted(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = _fake_cifar(rng, 4)
    _write_py_batch(folder / "test_batch", images, labels)
    test = load_cifar10(tmp_path, "test")
    assert np.array_equal(test.values.numpy(), images) and np.array_equal(test.labels.numpy(), labels)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_cifar10(tmp_path, "test")


def test_image_folder_resize_and_center_crop(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
    # 40 x 20 image: left half red, right half blue, a green 20x20 square in the middle
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    array[:, 20:, 2] = 255
    array[:, 10:30] = (0, 255, 0)
    Image.fromarray(array).save(tmp_path / "cats" / "a.png")
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(tmp_path / "dogs" / "b.jpg")
    ds = load_image_folder(tmp_path, resolution=8)
    assert ds.values.shape == (2, 3, 8, 8) and ds.values.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 1] and ds.num_classes == 2
    green = ds.values[0].permute(1, 2, 0).int()
    assert (green[:, 1:7, 1] > 200).all() and (green[:, 1:7, 0] < 50).all()  # center crop kept the square
    assert (ds.values[1].int() - 200).abs().max() <= 3
    gray = load_image_folder(tmp_path, resolution=4, channels=1)
    assert gray.values.shape == (2, 1, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 8)
    with pytest.raises(FileNotFoundError, match="no PNG/JPEG"):
        load_image_folder(tmp_path, 8)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path, 8)


def test_molrg_bases_orthogonal_and_data_in_subspaces():
    data, labels, bases = molrg(K=3, n=24, d=5, num=300, seed=7)
    assert data.shape == (300, 24) and labels.shape == (300,) and bases.shape == (3, 24, 5)
    stacked = bases.permute(1, 0, 2).reshape(24, 15).double()
    assert torch.allclose(stacked.T @ stacked, torch.eye(15, dtype=torch.float64), atol=1e-6)
    for k in range(3):
        x = data[labels == k].double()
        u = bases[k].double()
        assert torch.allclose(x - x @ u @ u.T, torch.zeros_like(x), atol=1e-5)  # x = U_k a
    latents = torch.einsum("bnd,bn->bd", bases[labels].double(), data.double())
    assert abs(latents.var().item() - 1.0) < 0.15  # a ~ N(0, I_d)
    again = molrg(3, 24, 5, 300, 7)
    assert torch.equal(again.data, data) and torch.equal(again.bases, bases)
    assert not torch.equal(molrg(3, 24, 5, 300, 8).data, data)
    with pytest.raises(ValueError, match="K \\* d <= n"):
        molrg(K=5, n=10, d=3, num=4, seed=0)


def test_subsets_are_nested_and_deterministic():
    for seed in (0, 1, 123):
        small, large = subset_indices(1797, 64, seed), subset_indices(1797, 1024, seed)
        assert torch.equal(large[:64], small)
        assert set(small.tolist()) <= set(large.tolist())
        assert len(set(large.tolist())) == 1024
    assert not torch.equal(subset_indices(1797, 64, 0), subset_indices(1797, 64, 1))
    images, labels = load_digits(as_uint8=True)
    ds = ArrayDataset(images, labels, 10)
    sub = subset(ds, 100, seed=5)
    idx = subset_indices(1797, 100, 5)
    assert torch.equal(sub.values, images[idx]) and torch.equal(sub.labels, labels[idx])
    xs, ys = subset((images, labels), 100, seed=5)
    assert torch.equal(xs, images[idx]) and torch.equal(subset(images, 100, 5), images[idx])
    with pytest.raises(ValueError, match="n = 2000 is larger than the dataset \\(1797"):
        subset(ds, 2000, 0)
    with pytest.raises(ValueError, match="n must be positive"):
        subset(ds, 0, 0)


def test_load_dataset_specs(tmp_path, cifar_bin):
    root, _ = cifar_bin
    assert len(load_dataset({"name": "digits", "subset": 64, "subset_seed": 2})) == 64
    assert len(load_dataset({"name": "cifar10", "root": str(root), "split": "test"})) == 5
    mix = load_dataset({"name": "molrg", "K": 2, "n": 8, "d": 2, "num": 50, "seed": 0})
    assert mix.values.shape == (50, 8) and mix.values.is_floating_point()
    noise = load_dataset({"name": "random_images", "shape": [3, 4, 4], "num": 6, "seed": 1})
    assert noise.values.shape == (6, 3, 4, 4) and noise.values.dtype == torch.uint8
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset({"name": "mnist"})
    with pytest.raises(ValueError, match="needs the field 'root'"):
        load_dataset({"name": "cifar10"})


def test_16_bit_grayscale_png_is_scaled_by_its_bit_depth(tmp_path):
    """A 16-bit PNG is read as v * 255 / 65535, not clipped to 255 (issue 18, item 11)."""
    from PIL import Image

    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # 0 .. 63000
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    loaded = load_image_folder(tmp_path, resolution=8, channels=1).values[0, 0].numpy().astype(np.int64)
    assert np.abs(loaded - np.rint(values.astype(np.int64) * 255 / 65535)).max() <= 1  # bicubic, same size
    assert (loaded == 255).mean() < 0.05


def test_image_errors_name_the_file(tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit: a "bomb"
    with pytest.raises(ValueError, match="image .*big.png.* is too large to decode.*decompression bomb"):
        load_image_folder(tmp_path, resolution=8, channels=1)


def test_cifar_pickle_asking_for_a_huge_array_names_the_file(tmp_path):
    from diffcore.data.cifar10 import _reconstruct_function

    class Huge:  # unpickles as numpy's _reconstruct(ndarray, (10**13,), b"b"): a 10 TB allocation
        def __reduce__(self):
            return _reconstruct_function(), (np.ndarray, (10**13,), b"b")

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Huge(), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_1.*too large for memory"):
        load_cifar10(tmp_path)


def test_load_dataset_selects_listed_indices():
    """``indices`` picks those positions in order (a subset that is not nested); not with ``subset``."""
    import pytest as _pytest

    from diffcore.data import load_dataset

    full = load_dataset({"name": "digits"})
    picked = load_dataset({"name": "digits", "indices": [5, 2, 9]})
    assert len(picked) == 3 and torch.equal(picked.values, full.values[torch.tensor([5, 2, 9])])
    with _pytest.raises(ValueError, match="indices"):
        load_dataset({"name": "digits", "indices": [0], "subset": 4})
    with _pytest.raises(ValueError, match="indices"):
        load_dataset({"name": "digits", "indices": [len(full)]})
