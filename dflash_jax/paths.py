"""Filesystem safety at the edges: output directories that never clobber user data, deletion of a run directory
only by its own markers, and the one-writer-per-directory lock.

- **Output directories** (``export --out``, ``import --out``, a run's ``export/``): written only when absent, empty,
  or holding nothing but a previous output's own files (:func:`check_output_dir`); never a symbolic link, never a
  protected directory (the run being exported) or a directory containing one. Anything else is a ``ValueError``
  raised before anything is touched.
- **Run-directory deletion** (``train --overwrite``, :func:`clear_run_dir`): only a real directory (not a symbolic
  link) that carries every one of the run's markers (``config.yaml`` and ``draft_config.json``, written by every
  run); its lock files stay.
- **Lock** (:class:`DirLock`): an exclusive ``fcntl.flock`` on ``DIR/.lock.<process index>``, held while a command
  writes the directory (train, export into a run, dump-features), released by the kernel if the process dies. The
  file holds the holder's PID, which the error of a second writer names. ``flock`` needs a local or lock-aware
  network filesystem. ``--overwrite`` deletes nothing while another process holds any lock file of the run.
- **Small files** (:func:`atomic_open`): written to a temporary file beside the target, then renamed over it: a
  process killed while writing leaves the previous file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from typing import IO, Iterator, Sequence

LOCK_PREFIX = ".lock."


def is_within(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (symbolic links resolved)."""
    outer = os.path.realpath(directory)
    return os.path.commonpath([outer, os.path.realpath(path)]) == outer


def check_output_dir(out: str, owned_files: Sequence[str], protect: Sequence[str] = ()) -> None:
    """Raise ValueError unless ``out`` may be (re)written by an output made of ``owned_files``.

    Allowed: ``out`` absent, an empty directory, or a directory holding only ``owned_files`` (a previous output,
    which the caller replaces). Refused: a symbolic link, a file, a directory with anything else in it, and any of
    ``protect`` or a directory containing one of them.
    """
    for p in protect:
        if is_within(p, out):
            raise ValueError(f"output {out!r} is or contains {p!r}, which must not be replaced; give another directory")
    if os.path.islink(out):
        raise ValueError(f"output {out!r} is a symbolic link; give the real directory")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"output {out!r} exists and is not a directory; refusing to replace it")
    foreign = sorted(set(os.listdir(out)) - set(owned_files))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"output {out!r} holds files that are not a previous export ({shown}); give a new or "
            f"empty directory (an existing one is replaced only if it holds nothing but "
            f"{', '.join(owned_files)})"
        )


def is_lock_file(name: str) -> bool:
    return name.startswith(LOCK_PREFIX)


def check_clearable(run_dir: str, markers: Sequence[str]) -> None:
    """ValueError unless ``run_dir`` is a real directory (not a symbolic link) holding every file of ``markers``."""
    if os.path.islink(run_dir):
        raise ValueError(
            f"--overwrite: run dir {run_dir!r} is a symbolic link; refusing to delete through it "
            f"(give the real path {os.path.realpath(run_dir)!r} if that is the run to replace)"
        )
    missing = [m for m in markers if not os.path.isfile(os.path.join(run_dir, m))]
    if missing:
        raise ValueError(
            f"--overwrite: {run_dir!r} has no {', '.join(missing)}, so it is not a dflash-jax run "
            "directory; refusing to delete it"
        )


@contextlib.contextmanager
def atomic_open(path: str) -> Iterator[IO[str]]:
    """A text file (UTF-8) that replaces ``path`` only when the ``with`` block completes: written to
    ``path + ".tmp"``, flushed to disk, then ``os.replace``d; on an error the temporary file is removed and
    ``path`` is untouched."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def clear_run_dir(run_dir: str, markers: Sequence[str], own_lock: str | None = None) -> None:
    """Delete everything in ``run_dir`` but its lock files, after :func:`check_clearable` and
    :func:`check_no_other_holder` (``own_lock``: the caller's lock file; nothing deleted if either refuses).
    Entries that are symbolic links are unlinked, never followed."""
    check_clearable(run_dir, markers)
    check_no_other_holder(run_dir, own_lock)
    for name in os.listdir(run_dir):
        if is_lock_file(name):
            continue
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


class DirLockedError(ValueError):
    """Another live process holds the lock of a directory."""


def _try_flock(fd: int) -> bool:
    """Take the exclusive lock of an open file without waiting; False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _locked_error(directory: str, lock_path: str) -> DirLockedError:
    """The error naming the PID written in a held lock file."""
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            holder = f.read(64).strip() or "unknown"
    except OSError:
        holder = "unknown"
    return DirLockedError(
        f"{directory!r} is in use by process {holder} (lock {lock_path}); wait for it to finish or stop it, then retry"
    )


def check_no_other_holder(directory: str, own_lock: str | None = None) -> None:
    """:class:`DirLockedError` naming the PID when a live process holds a lock file of ``directory`` other than
    ``own_lock`` (e.g. a peer process of another run, whose lock index differs from ours)."""
    directory = os.path.abspath(directory)
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not is_lock_file(name) or (own_lock is not None and os.path.abspath(own_lock) == path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            if not _try_flock(fd):
                raise _locked_error(directory, path)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class DirLock:
    """Exclusive ``fcntl.flock`` on ``directory/.lock.<process_index>`` (the directory is created if absent).

    A context manager; :meth:`acquire` raises :class:`DirLockedError` naming the holder's PID instead of waiting.
    The lock file is left in place on release (removing it would race with a new holder).
    """

    def __init__(self, directory: str, process_index: int = 0):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, f"{LOCK_PREFIX}{process_index}")
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_flock(fd):
            os.close(fd)
            raise _locked_error(self.directory, self.path)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
