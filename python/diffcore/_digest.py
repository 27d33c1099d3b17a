"""Content digests of files and folders, computed once per process for each (path, size, mtime).

Results and resumable units are keyed on the content of the files they depend on (a descriptor
network, a data folder), not on their paths: replacing a file at the same path changes its digest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, computed once per process for each (path, size, mtime)."""
    resolved = os.path.realpath(path)
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"{os.fspath(path)!r}: not a file (results are keyed on its content)")
    info = os.stat(resolved)
    key = (resolved, info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(resolved)
    return _DIGESTS[key]


def folder_digest(root: str | os.PathLike) -> str:
    """SHA-256 over the relative paths and content digests of every regular file under ``root``
    (hidden files and folders skipped), in sorted order; each file hashed once per process."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ):
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def _sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
