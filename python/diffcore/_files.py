"""Reading small files a run folder or a user names, without hanging or reading without end.

Every JSON record diffcore reads back (run records, configs, manifests, checkpoint documents) goes
through :func:`read_regular_file`: only a regular file is read (a FIFO would block forever, a
device such as ``/dev/zero`` would never end), at most ``max_bytes`` of it, and ``follow=False``
also refuses a symbolic link (a run folder's own records are never links). :func:`load_json`
adds a one-line error for malformed or absurdly nested JSON (Python's parser recurses).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_RECORD_BYTES = 64 << 20  # a manifest of many files is well under this; a record is far smaller


class FileReadError(ValueError):
    """A file that is not a regular file, too large, or not what it should hold."""


def read_regular_file(
    path: str | os.PathLike, max_bytes: int = MAX_RECORD_BYTES, *, what: str = "file", follow: bool = True
) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``); FileReadError naming ``what``
    and the path for a FIFO, device, folder, link (``follow=False``) or a larger file;
    FileNotFoundError when it does not exist."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except OSError as error:
        why = "is a symbolic link" if not follow and os.path.islink(path) else f"cannot be read ({error.strerror})"
        raise FileReadError(f"{what} {str(path)!r} {why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileReadError(f"{what} {str(path)!r} is not a regular file")
        if info.st_size > max_bytes:
            raise FileReadError(
                f"{what} {str(path)!r} is {info.st_size} bytes, more than the {max_bytes} such a file can hold"
            )
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise FileReadError(f"{what} {str(path)!r} grew past {max_bytes} bytes while being read")
        return data
    finally:
        os.close(fd)


def parse_json(data: bytes | str, *, what: str, path: str | os.PathLike) -> Any:
    """``json.loads`` with one-line errors naming ``what`` and ``path`` (bad JSON, bad UTF-8, or
    nesting deeper than Python's parser recurses)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise FileReadError(f"{what} {str(path)!r} is nested too deeply to be a diffcore file") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise FileReadError(f"{what} {str(path)!r} is not valid JSON ({error})") from None


def load_json(
    path: str | os.PathLike, max_bytes: int = MAX_RECORD_BYTES, *, what: str = "file", follow: bool = True
) -> Any:
    """The JSON value in the regular file ``path`` (see :func:`read_regular_file` and
    :func:`parse_json`)."""
    return parse_json(read_regular_file(path, max_bytes, what=what, follow=follow), what=what, path=Path(path))


MAX_IMAGE_BYTES = 256 << 20


def open_image(path: str | os.PathLike, *, what: str = "image"):
    """The decoded Pillow image in the regular file ``path`` (fully loaded, file closed).

    ValueError naming ``what`` and the file for anything that is not a readable image: a FIFO or
    device (never opened for reading), a file over 256 MiB, a truncated or corrupt file, or a
    decompression bomb (more pixels than Pillow's ``MAX_IMAGE_PIXELS``, which would allocate
    gigabytes)."""
    import io
    import warnings

    from PIL import Image

    data = read_regular_file(path, MAX_IMAGE_BYTES, what=what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now: a truncated file fails here, naming the file
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise FileReadError(f"{what} {str(path)!r} is too large to decode ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise FileReadError(f"{what} {str(path)!r} is not a readable image ({error})") from None
    return image
