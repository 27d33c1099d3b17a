"""Atomic writes of single files: a temporary file in the target's folder, fsync, ``os.replace``.

A killed process leaves either the old file or the new one, never half of one (a stray
``.NAME.XXXXXXXX.tmp`` at worst, which never passes for the file and which
``diffcore._folder`` removes). Studies and metrics write their files through here; two writers
still have their own scheme: unit folders (``experiments/base.py``, the same ``tempfile`` names)
and the trainer's files and checkpoint folders (``train/checkpoint.py``, ``.tmp-NAME-PID``,
removed by ``prune_checkpoints``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` with what ``write(fh)`` writes to a binary file handle; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically; returns the path."""
    return atomic_write(path, lambda fh: fh.write(data))
