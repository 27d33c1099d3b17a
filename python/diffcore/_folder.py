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
  folder of another kind, or a non-empty folder diffcore did not write, is refused.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from diffcore import _env

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
WORKERS_LOCK_FILE = ".lock.workers"
KIND_FILE = "diffcore-run.json"
LOCK_WAIT_VAR = _env.LOCK_WAIT_VAR
WORKERS_GRACE_SECONDS = 30.0
_STALE_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # tempfile.mkstemp/mkdtemp names


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


def remove_stale_temporaries(root) -> list[Path]:
    """Remove ``.NAME.XXXXXXXX.tmp`` files and folders under ``root`` (leftovers of a killed
    writer; call only while holding the folder's lock). Returns what was removed."""
    removed = []
    for path in sorted(Path(root).rglob(".*.tmp")):
        if _STALE_TEMPORARY.match(path.name) and path.exists():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
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


class FolderLock:
    """The exclusive lock of one folder, held by one process (see the module docstring)."""

    def __init__(self, root):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock, as written by the holder ("unknown" when unreadable)."""
        try:
            info = json.loads(self.path.read_text())
            return f"process {info['pid']} on {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown process"

    def acquire(self, wait: float | None = None, argument: str = "out", shared: bool = False) -> "FolderLock":
        """Take the lock (``shared``: with the other processes of one sharded run) or raise
        FolderError naming the holder after ``wait`` seconds (default ``DIFFCORE_LOCK_WAIT``)."""
        wait = lock_wait_seconds() if wait is None else wait
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _wait_for_flock(fd, wait, shared):
            os.close(fd)
            holder = "the shards of a sharded run" if shared else self.holder() + " (or the shards of a sharded run)"
            raise FolderError(f"{argument}: {str(self.root)!r} is in use by {holder}; wait for it "
                              f"to finish (or set {LOCK_WAIT_VAR}=SECONDS to wait) or use another folder")
        self._fd = fd
        if shared:
            return self
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._wait_for_workers(argument)
        return self

    def _wait_for_workers(self, argument: str) -> None:
        """Wait until no worker process of an earlier run holds ``.lock.workers``."""
        fd = os.open(self.root / WORKERS_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _wait_for_flock(fd, WORKERS_GRACE_SECONDS):
                self.release()
                raise FolderError(f"{argument}: worker processes of an earlier run still write into "
                                  f"{str(self.root)!r} after {WORKERS_GRACE_SECONDS:.0f} s; end them first")
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
    if not path.exists():
        return None
    try:
        return str(json.loads(path.read_text())["kind"])
    except (ValueError, KeyError, TypeError):
        raise FolderError(f"{str(path)!r} is unreadable; delete it only if the folder holds a run of "
                          "the kind you are starting") from None


def check_kind(root, kind: str, argument: str = "out", legacy_files: tuple[str, ...] = ()) -> None:
    """Refuse ``root`` if it holds a run of another kind, or files diffcore did not write.

    A folder without a kind record is accepted when it holds nothing but hidden files (locks, the
    temporaries of a shard starting beside this one) or one of ``legacy_files`` (a run of an
    earlier diffcore version, checked further by the caller)."""
    root = Path(root)
    found = folder_kind(root)
    if found is not None:
        if found != kind:
            raise FolderError(f"{argument}: {str(root)!r} holds a {found!r} run, not {kind!r}; "
                              "use another folder")
        return
    entries = [p.name for p in root.iterdir() if not p.name.startswith(".")]
    if entries and not any(name in entries for name in legacy_files):
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise FolderError(f"{argument}: {str(root)!r} is not empty and holds no diffcore run ({shown}); "
                          "use a new or empty folder")


def record_kind(root, kind: str) -> None:
    """Write ``root/diffcore-run.json`` (atomically) if it is not there."""
    path = Path(root) / KIND_FILE
    if path.exists():
        return
    tmp = path.with_name(f".{KIND_FILE}.{os.getpid()}.partial")
    tmp.write_text(json.dumps({"kind": kind}) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def claim_folder(path, kind: str, *, argument: str = "out", record: bool = True,
                 legacy_files: tuple[str, ...] = (), shared: bool = False) -> Iterator[Path]:
    """Check, lock, clean and kind-check the folder ``path`` for a run of ``kind``; yields it.

    ``record=False`` leaves writing the kind record to the caller (:func:`record_kind`), e.g.
    after a config was validated and bound. ``shared``: one of the processes of a sharded run
    (see the module docstring). The lock is held inside the ``with`` block."""
    root = check_output_folder(path, argument)
    lock = FolderLock(root).acquire(argument=argument, shared=shared)
    try:
        check_kind(root, kind, argument, legacy_files)
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
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
    _worker_lock_fd = os.open(Path(root) / WORKERS_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_flock(_worker_lock_fd, shared=True):  # never happens under the folder lock
        raise FolderError(f"{root}: could not take the workers' lock")


def worker_pool(workers: int, root):
    """A spawn-context ``ProcessPoolExecutor`` whose processes die with this process and hold
    ``root``'s workers lock while they live (call with ``root``'s folder lock held)."""
    import concurrent.futures
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(os.getpid(), str(root)))
