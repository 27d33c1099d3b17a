"""CIFAR-10 from a local folder (no download).

Supported layouts:
- the binary version ``cifar-10-batches-bin``: ``data_batch_1.bin`` ... ``data_batch_5.bin`` and
  ``test_batch.bin``, each 10000 records of 1 label byte followed by 3072 pixel bytes
  (1024 red, 1024 green, 1024 blue, row-major 32x32);
- the python version ``cifar-10-batches-py``: ``data_batch_1`` ... ``data_batch_5`` and
  ``test_batch``, pickled dicts read with a restricted unpickler that accepts only the numpy
  array types those files need (never plain ``pickle.load``).

``root`` may be the batches folder itself or a folder that contains it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from diffcore._files import read_regular_file
from diffcore.data.dataset import ArrayDataset

RECORD_BYTES = 1 + 3 * 32 * 32
RECORDS_PER_BATCH = 10000
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _batch_names(split: str) -> tuple[str, ...]:
    if split == "train":
        return TRAIN_BATCHES
    if split == "test":
        return TEST_BATCHES
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _find_layout(root: Path) -> tuple[str, Path]:
    """('bin' | 'py', folder holding the batch files)."""
    if not root.exists():
        raise FileNotFoundError(f"CIFAR-10 folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"CIFAR-10 root {str(root)!r} is not a folder")
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        if (folder / "data_batch_1.bin").exists() or (folder / "test_batch.bin").exists():
            return "bin", folder
        if (folder / "data_batch_1").exists() or (folder / "test_batch").exists():
            return "py", folder
    raise FileNotFoundError(
        f"no CIFAR-10 batch files under {str(root)!r}: expected cifar-10-batches-bin "
        "(data_batch_1.bin ... test_batch.bin) or cifar-10-batches-py (data_batch_1 ... test_batch)"
    )


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 batch file {str(path)!r} is missing")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES != 0:
        raise ValueError(
            f"malformed CIFAR-10 batch {str(path)!r}: {raw.size} bytes is not a positive multiple "
            f"of the record size {RECORD_BYTES} (1 label byte + 3072 pixel bytes)"
        )
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CLASSES):
        raise ValueError(f"malformed CIFAR-10 batch {str(path)!r}: label {labels.max()} is not in 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _reconstruct_function():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Accepts only what a CIFAR-10 python batch holds: dicts, lists, bytes and numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes this way
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR-10 pickle (only numpy arrays are allowed)"
            )
        if name == "_reconstruct":
            return _reconstruct_function()
        if name == "encode":
            import codecs

            return codecs.encode
        return {"ndarray": np.ndarray, "dtype": np.dtype}[name]


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 batch file {str(path)!r} is missing")
    try:
        payload = read_regular_file(path, 1 << 30, what="CIFAR-10 batch")  # never a FIFO or a device
        content = _CifarUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"malformed or unsafe CIFAR-10 pickle {str(path)!r}: {error}") from error
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as error:
        raise ValueError(f"malformed CIFAR-10 pickle {str(path)!r}: {error}") from error
    except MemoryError:  # a forged header asking for a huge array
        raise ValueError(
            f"malformed CIFAR-10 pickle {str(path)!r}: it asks for an array too large "
            "for memory (a real batch holds 10000 x 3072 bytes)"
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"malformed CIFAR-10 pickle {str(path)!r}: expected a dict, got {type(content).__name__}")
    data = content.get(b"data", content.get("data"))
    labels = content.get(b"labels", content.get("labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise ValueError(f"malformed CIFAR-10 pickle {str(path)!r}: missing 'data' array or 'labels'")
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"malformed CIFAR-10 pickle {str(path)!r}: data {data.dtype} {data.shape}, labels {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"malformed CIFAR-10 pickle {str(path)!r}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root, split: str = "train") -> ArrayDataset:
    """CIFAR-10 ``split`` ('train': 50000 images, 'test': 10000) from the local folder ``root``.

    Returns an ``ArrayDataset`` with uint8 values ``[N, 3, 32, 32]`` and labels ``[N]``
    (``dataset.all()`` gives floats in [-1, 1]). Missing or malformed files raise with the path.
    """
    layout, folder = _find_layout(Path(root))
    reader = _read_binary_batch if layout == "bin" else _read_python_batch
    suffix = ".bin" if layout == "bin" else ""
    images, labels = zip(*(reader(folder / (name + suffix)) for name in _batch_names(split)))
    values = torch.from_numpy(np.ascontiguousarray(np.concatenate(images)))
    return ArrayDataset(
        values, torch.from_numpy(np.concatenate(labels)), num_classes=len(CLASSES), name=f"cifar10-{split}"
    )


def write_cifar10_binary_batch(path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``images [N, 3, 32, 32]`` uint8 and ``labels [N]`` in the binary batch format
    (used by tests to build small fake folders)."""
    images = np.asarray(images, dtype=np.uint8).reshape(len(labels), 3072)
    records = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], images], axis=1)
    Path(path).write_bytes(records.tobytes())
