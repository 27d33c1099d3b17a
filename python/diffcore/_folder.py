"""Output folders: one writer at a time, one kind of run per folder, no stale temporaries.

Every command that writes into a folder claims it first with :func:`claim_folder`:

- the path is checked (``""``, a file, a path under a file, an unwritable place: one-line errors);
- an exclusive lock on ``FOLDER/.lock`` (``fcntl.flock``, released by the kernel when the holder
  dies) names the holder's pid and host; a second run waits ``DIFFCORE_LOCK_WAIT`` seconds
  (default 0) and then exits with an error naming that process;
- worker processes of an earlier run hold a shared lock on ``FOLDER/.lock.workers`` until they
  exit, so a new run waits for them and never writes beside them (workers started through
  :func:`worker_pool` also die with their parent: ``PR_SET_PDEATHSIG`` on Linux, a watchdog thread
  elsewhere);
- temporaries left by a killed writer with :mod:`tempfile`'s names (``.NAME.XXXXXXXX.tmp``: the
  files of :mod:`diffcore._atomic` and the unit folders of ``experiments/base.py``) are removed;
  the trainer's ``.tmp-*`` checkpoint leftovers are removed by ``train.checkpoint.prune_checkpoints``;
- the processes of one sharded or distributed run (``--shard I/N``, torchrun ranks) share the lock
  (``shared=True``): they run side by side, a plain run waits for all of them, and they leave the
  removal of temporaries to it (a shard's temporaries may be in use); units are claimed one by one
  (:func:`unit_claim`);
- ``FOLDER/diffcore-run.json`` records the kind of run (``"train"``, an experiment's name), and a
  folder of another kind, or a non-empty folder diffcore did not write, is refused. The folder is
  identified before anything in it is touched: a folder without the record is adopted only when
  its own files prove it is a diffcore run of an earlier version (``adopt``), never because it
  merely holds a ``config.json``;
- lock files are opened without following symbolic links and must be regular files, and nothing
  is written or deleted through a symbolic link inside the folder (:func:`check_inside`,
  :func:`remove_tree`): a link could lead out of the run folder to a user's files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from diffcore import _atomic, _env
from diffcore._files import FileReadError, load_json

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
WORKERS_LOCK_FILE = ".lock.workers"
KIND_FILE = "diffcore-run.json"
LOCK_WAIT_VAR = _env.LOCK_WAIT_VAR
WORKERS_GRACE_SECONDS = 30.0
_STALE_TEMPORARY = _atomic.TEMPORARY_NAME  # the one temporary-name scheme (diffcore._atomic)


class FolderError(RuntimeError):
    """An output folder that cannot be used: a bad path, in use by another run, or of another kind."""


# ----------------------------------------------------------------------------- path checks


def check_output_folder(path, argument: str = "out") -> Path:
    """Create ``path`` as a folder (with parents) or raise one line naming ``argument``."""
    if isinstance(path, str) and path.strip() == "":
        raise FolderError(f"{argument}: expected a folder path, got an empty string")
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == path else f"is under the file {str(parent)!r}"
            raise FolderError(f"{argument}: {str(path)!r} {where}; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FolderError(f"{argument}: cannot create the folder {str(path)!r}: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FolderError(f"{argument}: the folder {str(path)!r} is not writable")
    return path


def check_inside(root, path, argument: str = "out") -> Path:
    """``path`` (under ``root``) if no part of it below ``root`` is a symbolic link; raise
    FolderError naming the link otherwise (writing or deleting through it could reach files
    outside the run folder). Parts that do not exist yet are fine."""
    root, path = Path(root), Path(path)
    relative = path.relative_to(root)
    if ".." in relative.parts:
        raise FolderError(f"{argument}: {str(path)!r} leaves the run folder {str(root)!r}")
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise FolderError(
                f"{argument}: {str(current)!r} is a symbolic link; diffcore never writes or "
                "deletes through links inside a run folder (replace it by a folder)"
            )
        if not current.exists():
            break
    return path


def remove_tree(root, path, argument: str = "out") -> None:
    """Delete the folder (or file) ``path`` under ``root``, never through a symbolic link: the
    path itself is checked with :func:`check_inside`, and ``shutil.rmtree`` does not follow the
    links inside the tree (it removes the links themselves)."""
    path = check_inside(root, path, argument)
    if not os.path.lexists(path):
        return
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale_temporaries(root) -> list[Path]:
    """Remove ``.NAME.XXXXXXXX.tmp`` files and folders under ``root`` (leftovers of a killed
    writer; call only while holding the folder's lock, after the folder was identified as a
    diffcore run). Symbolic links are not followed. Returns what was removed."""
    removed = []
    for folder, folders, files in os.walk(root, followlinks=False):
        for name in sorted(folders + files):
            if _STALE_TEMPORARY.match(name):
                path = Path(folder) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        folders[:] = [name for name in folders if not _STALE_TEMPORARY.match(name)]
    if removed:
        log.info("removed %d temporaries left by a killed run under %s", len(removed), root)
    return removed


# ----------------------------------------------------------------------------- locks


def lock_wait_seconds() -> float:
    """``DIFFCORE_LOCK_WAIT``: seconds to wait for a folder held by another run (default 0)."""
    text = os.environ.get(LOCK_WAIT_VAR, "0").strip() or "0"
    try:
        value = float(text)
    except ValueError:
        raise FolderError(f"{LOCK_WAIT_VAR}: expected seconds (a number >= 0), got {text!r}") from None
    if not value >= 0:
        raise FolderError(f"{LOCK_WAIT_VAR}: expected seconds (a number >= 0), got {text!r}")
    return value


def _try_flock(fd: int, shared: bool = False) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _wait_for_flock(fd: int, seconds: float, shared: bool = False) -> bool:
    deadline = time.monotonic() + seconds
    while not _try_flock(fd, shared):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def open_lock_file(path) -> int:
    """A read-write descriptor of the lock file ``path`` (created if missing), opened without
    following a symbolic link; FolderError unless it is a regular file (a link would make the
    lock truncate and overwrite the link's target, a FIFO or device would hang or be written)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        why = "is a symbolic link" if os.path.islink(path) else f"cannot be opened ({error.strerror or error})"
        raise FolderError(
            f"lock file {str(path)!r} {why}; diffcore uses only regular lock files "
            "(delete it if no run is using the folder)"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FolderError(f"lock file {str(path)!r} is not a regular file; delete it if no run is using the folder")
    return fd


class FolderLock:
    """The exclusive lock of one folder, held by one process (see the module docstring)."""

    def __init__(self, root):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    @staticmethod
    def holder(fd: int, patience: float = 1.0) -> str:
        """Who holds the lock open as ``fd``, as written by the holder ("unknown" when unreadable).
        The holder writes its record just after it takes the lock, so an empty or partial record
        is read again for up to ``patience`` seconds before the holder is called unknown."""
        deadline = time.monotonic() + patience
        while True:
            try:
                info = json.loads(os.pread(fd, 4096, 0))
                return f"process {info['pid']} on {info['host']} (since {info['since']})"
            except (OSError, ValueError, KeyError, TypeError):
                if time.monotonic() >= deadline:
                    return "an unknown process"
                time.sleep(0.05)

    def acquire(self, wait: float | None = None, argument: str = "out", shared: bool = False) -> FolderLock:
        """Take the lock (``shared``: with the other processes of one sharded run) or raise
        FolderError naming the holder after ``wait`` seconds (default ``DIFFCORE_LOCK_WAIT``)."""
        wait = lock_wait_seconds() if wait is None else wait
        fd = open_lock_file(self.path)
        if not _wait_for_flock(fd, wait, shared):
            holder = "the shards of a sharded run" if shared else self.holder(fd) + " (or the shards of a sharded run)"
            os.close(fd)
            raise FolderError(
                f"{argument}: {str(self.root)!r} is in use by {holder}; wait for it "
                f"to finish (or set {LOCK_WAIT_VAR}=SECONDS to wait) or use another folder"
            )
        self._fd = fd
        if shared:
            return self
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._wait_for_workers(argument)
        return self

    def _wait_for_workers(self, argument: str) -> None:
        """Wait until no worker process of an earlier run holds ``.lock.workers``."""
        fd = open_lock_file(self.root / WORKERS_LOCK_FILE)
        try:
            if not _wait_for_flock(fd, WORKERS_GRACE_SECONDS):
                self.release()
                raise FolderError(
                    f"{argument}: worker processes of an earlier run still write into "
                    f"{str(self.root)!r} after {WORKERS_GRACE_SECONDS:.0f} s; end them first"
                )
        finally:
            os.close(fd)  # closing drops the probe lock

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# ----------------------------------------------------------------------------- kinds


def folder_kind(root) -> str | None:
    """The kind recorded in ``root/diffcore-run.json``, or None when there is none."""
    path = Path(root) / KIND_FILE
    if not os.path.lexists(path):
        return None
    try:
        record = load_json(path, 4096, what="run record", follow=False)
        return str(record["kind"])
    except (FileReadError, KeyError, TypeError) as error:
        detail = str(error) if isinstance(error, FileReadError) else f"{str(path)!r} is unreadable"
        raise FolderError(f"{detail}; delete it only if the folder holds a run of the kind you are starting") from None


Adopt = Callable[[Path], bool]


def check_kind(root, kind: str, argument: str = "out", adopt: Adopt | None = None) -> None:
    """Refuse ``root`` if it holds a run of another kind, or files diffcore did not write.

    A folder without a kind record is accepted when it holds nothing but hidden files (locks, the
    temporaries of a shard starting beside this one), or when ``adopt(root)`` proves from its own
    files that it is a run of an earlier diffcore version (checked further by the caller). Files
    that merely have diffcore's names (``config.json``, ``checkpoints/``) prove nothing."""
    root = Path(root)
    found = folder_kind(root)
    if found is not None:
        if found != kind:
            raise FolderError(f"{argument}: {str(root)!r} holds a {found!r} run, not {kind!r}; use another folder")
        return
    entries = [p.name for p in root.iterdir() if not p.name.startswith(".")]
    if entries and not (adopt is not None and adopt(root)):
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise FolderError(
            f"{argument}: {str(root)!r} is not empty and holds no diffcore run ({shown}); use a new or empty folder"
        )


def holds_manifest(folder, is_ours: Callable[[Any], bool]) -> bool:
    """Whether some ``folder/*/MANIFEST.json`` (a regular file, not a link) parses to a value
    ``is_ours`` accepts: the proof :func:`check_kind`'s ``adopt`` asks of an earlier run."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    for child in sorted(folder.iterdir()):
        manifest = child / "MANIFEST.json"
        if child.is_symlink() or not manifest.is_file() or manifest.is_symlink():
            continue
        try:
            if is_ours(load_json(manifest, what="manifest", follow=False)):
                return True
        except (FileReadError, OSError):
            continue
    return False


def record_kind(root, kind: str) -> None:
    """Write ``root/diffcore-run.json`` (atomically) if it is not there."""
    path = Path(root) / KIND_FILE
    if os.path.lexists(path):
        return
    _atomic.atomic_write_bytes(path, (json.dumps({"kind": kind}) + "\n").encode())


@contextlib.contextmanager
def claim_folder(
    path, kind: str, *, argument: str = "out", record: bool = True, adopt: Adopt | None = None, shared: bool = False
) -> Iterator[Path]:
    """Check, lock, kind-check and then clean the folder ``path`` for a run of ``kind``; yields it.
    ``adopt``: how a folder without a kind record proves it is an earlier diffcore run (see
    :func:`check_kind`).

    ``record=False`` leaves writing the kind record to the caller (:func:`record_kind`), e.g.
    after a config was validated and bound. ``shared``: one of the processes of a sharded run
    (see the module docstring). The lock is held inside the ``with`` block."""
    root = check_output_folder(path, argument)
    created = [root / name for name in (LOCK_FILE, WORKERS_LOCK_FILE) if not os.path.lexists(root / name)]
    lock = FolderLock(root).acquire(argument=argument, shared=shared)
    try:
        try:
            check_kind(root, kind, argument, adopt)
        except FolderError:  # not ours: leave it as it was (no diffcore run waits on these locks)
            for lock_file in created:
                lock_file.unlink(missing_ok=True)
            raise
        if not shared:
            remove_stale_temporaries(root)
        if record:
            record_kind(root, kind)
        yield root
    finally:
        lock.release()


# ----------------------------------------------------------------------------- unit claims


@contextlib.contextmanager
def unit_claim(path, wait: bool = True) -> Iterator[bool]:
    """Hold the claim ``path`` (a ``.NAME.claim`` file) while a unit is produced; yields whether
    it is held (``wait=False``: False at once when another process holds it; else blocks until it
    is free). The kernel drops a killed process's claim, so the next run takes it over. ``flock``
    works across the nodes of a shared filesystem that supports it (NFS emulates it with POSIX
    locks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(path)
    try:
        yield _wait_for_flock(fd, float("inf")) if wait else _try_flock(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- worker processes


def _die_with_parent(parent_pid: int) -> None:
    """In a worker: end this process when ``parent_pid`` ends (at once on Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:  # a watchdog: poll the parent

        def watch():
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="diffcore-parent-watchdog", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


_worker_lock_fd: int | None = None


def _init_worker(parent_pid: int, root: str) -> None:
    """Initializer of :func:`worker_pool`'s processes."""
    global _worker_lock_fd
    _die_with_parent(parent_pid)
    _env.tune_allocator()
    _worker_lock_fd = open_lock_file(Path(root) / WORKERS_LOCK_FILE)
    if not _try_flock(_worker_lock_fd, shared=True):  # never happens under the folder lock
        raise FolderError(f"{root}: could not take the workers' lock")


def worker_pool(workers: int, root):
    """A spawn-context ``ProcessPoolExecutor`` whose processes die with this process and hold
    ``root``'s workers lock while they live (call with ``root``'s folder lock held)."""
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(), str(root)),
    )
