"""Atomic writes of single files: a temporary file in the target's folder, fsync, ``os.replace``.

A killed process leaves either the old file or the new one, never half of one (a stray
``.NAME.XXXXXXXX.tmp`` at worst, which never passes for the file). Folders made whole before they
appear (a unit, a checkpoint) are built in :func:`temporary_folder` and renamed into place. This is
the one temporary-name scheme of the package: :data:`TEMPORARY_NAME` is what the stale-file
cleaner (:func:`diffcore._folder.remove_stale_temporaries`) removes.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# ``.NAME.XXXXXXXX.tmp``: what tempfile.mkstemp / mkdtemp make with the prefix and suffix used here.
TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def temporary_folder(target: str | os.PathLike) -> Path:
    """A fresh empty folder ``.NAME.XXXXXXXX.tmp`` beside ``target`` (its parent created), to be
    filled and then renamed onto ``target`` with ``os.replace``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


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
