"""Atomic, verified checkpoints: safetensors for tensors, JSON for the rest, a manifest last.

A checkpoint is a folder ``<run>/checkpoints/step_<step:09d>/`` holding named files
(``*.safetensors`` and ``*.json``) and ``MANIFEST.json`` (size and SHA-256 of every file).
Writing: every file goes into a temporary folder in the same parent, is fsynced, the manifest is
written last, the folder is fsynced and renamed into place with ``os.replace``; so a killed
writer leaves at most a ``.step_N.XXXXXXXX.tmp`` folder (:mod:`diffcore._atomic`'s one temporary
name) that never passes for a checkpoint. Loading verifies the manifest, sizes and hashes and
raises ``CheckpointError`` naming the bad file: a corrupted or truncated checkpoint is never
silently skipped or replaced by a fresh start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes, save as save_safetensors_bytes

from diffcore._atomic import TEMPORARY_NAME, atomic_write_bytes, temporary_folder
from diffcore._files import FileReadError, load_json, parse_json, read_regular_file

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT = "diffcore-checkpoint-v1"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not match the run."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors[file][key]`` and ``documents[file]`` (parsed JSON)."""

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    documents: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step_{int(step):09d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, payload: bytes) -> None:
    """Write, flush and fsync one file."""
    with open(path, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def write_file_atomic(path, payload: bytes) -> None:
    """Replace ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``."""
    path = atomic_write_bytes(path, payload)
    _fsync_dir(path.parent)


def _cpu_contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(
    checkpoints_dir, step: int, tensors: Mapping[str, Mapping[str, torch.Tensor]], documents: Mapping[str, Any]
) -> Path:
    """Write ``tensors[file]`` as ``file.safetensors`` and ``documents[file]`` as ``file.json``
    atomically into ``checkpoints_dir/step_<step>``; returns that folder."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    tmp = temporary_folder(final)
    entries = {}
    payloads = {
        f"{name}.safetensors": save_safetensors_bytes(_cpu_contiguous(group)) for name, group in tensors.items()
    }
    payloads.update(
        {f"{name}.json": json.dumps(doc, indent=1, sort_keys=True).encode() for name, doc in documents.items()}
    )
    for filename, payload in payloads.items():
        write_bytes_durably(tmp / filename, payload)
        entries[filename] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    manifest = {"format": FORMAT, "step": int(step), "files": entries}
    write_bytes_durably(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    if final.exists():  # rewriting a step after resuming from an earlier one
        old = checkpoints_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(checkpoints_dir)
    return final


_CHECKPOINT_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(safetensors|json)$")


def load_checkpoint(path) -> Checkpoint:
    """Load and verify a checkpoint folder; raises ``CheckpointError`` naming what is wrong.

    Only what the format allows is read: a manifest of bounded size, and files named in it that
    are plain names inside the folder (never ``../`` or a link), regular files of the size the
    manifest states (never a FIFO or a device such as ``/dev/zero``)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    manifest_path = path / MANIFEST
    if not os.path.lexists(manifest_path):
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: no {MANIFEST} (written last)")
    try:
        manifest = load_json(manifest_path, what="checkpoint manifest", follow=False)
        files, step = dict(manifest["files"]), int(manifest["step"])
        if manifest.get("format") != FORMAT:
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        for filename, entry in files.items():
            if not _CHECKPOINT_FILE.match(filename):
                raise ValueError(f"it lists {filename!r}, not a file name of the checkpoint format")
            if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or entry["bytes"] < 0:
                raise ValueError(f"its entry for {filename!r} has no byte count")
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has a malformed {MANIFEST}: {error}") from error
    tensors, documents = {}, {}
    for filename, entry in files.items():
        payload = _read_verified(path / filename, entry)
        stem = filename.rsplit(".", 1)[0]
        try:
            if filename.endswith(".safetensors"):
                tensors[stem] = load_safetensors_bytes(payload)
            else:
                documents[stem] = parse_json(payload, what="checkpoint file", path=path / filename)
        except Exception as error:
            raise CheckpointError(f"checkpoint file {str(path / filename)!r} cannot be decoded: {error}") from error
    return Checkpoint(path, step, tensors, documents)


def _read_verified(file: Path, entry: Mapping[str, Any]) -> bytes:
    if not os.path.lexists(file):
        raise CheckpointError(f"checkpoint file {str(file)!r} listed in the manifest is missing")
    info = os.lstat(file)
    if stat.S_ISREG(info.st_mode) and info.st_size != entry["bytes"]:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is truncated or padded: {info.st_size} bytes, "
            f"manifest says {entry['bytes']}"
        )
    try:
        payload = read_regular_file(file, entry["bytes"], what="checkpoint file", follow=False)
    except FileReadError as error:
        raise CheckpointError(f"{error} (the manifest says {entry['bytes']} bytes)") from None
    if len(payload) != int(entry["bytes"]):
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is truncated or padded: {len(payload)} bytes, "
            f"manifest says {entry['bytes']}"
        )
    if hashlib.sha256(payload).hexdigest() != entry.get("sha256"):
        raise CheckpointError(f"checkpoint file {str(file)!r} is corrupted: SHA-256 does not match the manifest")
    return payload


def list_checkpoints(checkpoints_dir) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step_*`` folder, ascending (unverified)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(checkpoints_dir) -> Path | None:
    """The folder of the highest step, or None when there is none."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoints_dir, keep: int, protected=()) -> None:
    """Delete all but the ``keep`` newest checkpoints and those of the ``protected`` steps (a
    trainer's ``keep_steps``), and temporary folders left by killed writers."""
    checkpoints_dir = Path(checkpoints_dir)
    protected = {int(step) for step in protected}
    for step, path in list_checkpoints(checkpoints_dir)[:-keep]:
        if step not in protected:
            shutil.rmtree(path)
    # leftovers of a writer killed mid-way (".tmp-*": the temporary name of older versions)
    for path in checkpoints_dir.iterdir() if checkpoints_dir.is_dir() else ():
        if TEMPORARY_NAME.match(path.name) or path.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# ---- optimizer state <-> (tensors, JSON) ---------------------------------------------------


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors keyed ``state.<param>.<name>``, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param_id, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """Inverse of ``flatten_optimizer_state``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, entry in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(entry)
    return {"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]}


# ---- RNG states ----------------------------------------------------------------------------


def capture_rng_state(prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Global RNG states of torch (CPU and the current CUDA device), numpy and python as (tensors, JSON)."""
    tensors = {f"{prefix}torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the current device only: under DDP each rank owns one GPU (and must not touch the others)
        tensors[f"{prefix}torch_cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors[f"{prefix}numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    document = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, document


def restore_rng_state(tensors: Mapping[str, torch.Tensor], document: Mapping[str, Any], prefix: str = "") -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(tensors[f"{prefix}torch_cpu"])
    if f"{prefix}torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"{prefix}torch_cuda"])
    kind, pos, has_gauss, cached = document["numpy"]
    np.random.set_state((kind, tensors[f"{prefix}numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = document["python"]
    random.setstate((version, tuple(internal), gauss_next))
