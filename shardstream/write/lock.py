"""The writer's lock: one writer per dataset directory (``flock`` on
``.shardstream.lock``), fork-safe.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import warnings
import weakref
from typing import Callable

from shardstream.errors import DatasetLockedError, StorageError
from shardstream.format.manifest import LOCK_NAME
from shardstream.storage.files import storage_error  # re-exported: the writers use it

__all__ = ["DatasetLock", "storage_error"]


# ---------------------------------------------------------------- the writers' lock
_held: "weakref.WeakSet[DatasetLock]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    """In a forked child: close the inherited lock fds (the parent keeps the lock), so
    the lock goes away with the parent even while children live on."""
    for lock in list(_held):
        lock._drop_fd()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class DatasetLock:
    """An exclusive ``flock`` on ``<directory>/.shardstream.lock``, held by this process.

    The kernel drops it when the process dies, so a crashed writer never leaves
    a stale lock; :meth:`release` removes the lock file while still holding it.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._pid = os.getpid()
        _held.add(self)

    @classmethod
    def acquire(cls, directory: str) -> "DatasetLock | None":
        """Lock ``directory`` or raise :class:`DatasetLockedError` at once.

        None where the filesystem has no locks (a warning says so);
        FileNotFoundError if ``directory`` vanished (the caller retries).
        """
        path = os.path.join(directory, LOCK_NAME)
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise storage_error("create the lock file", path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise _locked_error(directory, holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (_errno.ENOLCK, _errno.EOPNOTSUPP, _errno.ENOSYS):
                    warnings.warn(f"{directory}: the filesystem does not support locks; "
                                  "nothing keeps two writers apart here", stacklevel=3)
                    return None
                raise storage_error("lock", path, exc) from exc
            if _same_file(fd, path):  # else a finishing writer unlinked it: lock the new one
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(path, fd)
            os.close(fd)
        raise StorageError(f"cannot lock {path}: it keeps being replaced; is another writer "
                           "starting and stopping in a loop?")

    def release(self, cleanup: Callable[[], None] | None = None) -> None:
        """Remove the lock file, run ``cleanup`` (still locked), then unlock. Idempotent."""
        fd = self._fd
        if fd is None or os.getpid() != self._pid:
            return
        self._fd = None
        try:
            if _same_file(fd, self.path):
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            if cleanup is not None:
                cleanup()
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: forked children share the lock
            finally:
                os.close(fd)

    def _drop_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _locked_error(directory: str, pid: int | None) -> DatasetLockedError:
    if pid == os.getpid():
        return DatasetLockedError(f"{directory} is being written by another writer in this "
                                  f"process (pid {pid}); close or abort that writer first")
    who = "another writer" + (f" (pid {pid})" if pid else "")
    return DatasetLockedError(
        f"{directory} is being written by {who}; wait for it to finish (its lock, "
        f"{LOCK_NAME}, goes away when that process exits), or stop it and run again")
