"""Node-cache entries on disk: shared holds, exclusive locks and eviction.

A reader holds a shared ``flock`` on an entry while it reads it; eviction takes the
exclusive lock without waiting, so an entry some process is reading is never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import time
from typing import Any, Callable, Iterator

from shardstream.errors import StorageError
from shardstream.storage.files import storage_error
from shardstream.storage.urls import inside

__all__ = ["hold", "CacheHold", "entry_path", "evict", "locked", "open_shared", "os_error"]


# ---------------------------------------------------------------- local cache
def os_error(action: str, path: str, exc: OSError, fix: str = "check cache_dir") -> StorageError:
    return storage_error(action, path, exc, fix)


@contextlib.contextmanager
def locked(path: str, blocking: bool = True) -> Iterator[bool]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise os_error("create the lock file", path, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            # explicitly: a child forked meanwhile shares this lock through its copy
            # of the fd, and closing ours alone would leave it held
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def removed_error(path: str, what: str = "cached copy") -> StorageError:
    """The error for a cache entry that disappeared under a reader."""
    return StorageError(f"the {what} at {path} was removed (evicted from the cache or deleted "
                        "by hand); read the dataset again (a new ShardDataset / ShardStream) "
                        "to download it again, and raise the cache size limit (cache_limit= / "
                        "max_bytes=) or use a cache_dir of its own if it keeps being evicted")


def open_shared(path: str) -> int | None:
    """An fd on the entry ``path`` (file or directory) holding ``flock(LOCK_SH)``; None
    when it is gone (an eviction that renamed it away while we waited counts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error("open the cached copy", path, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # an eviction holds LOCK_EX only while it renames
        st = os.fstat(fd)
        now = os.stat(path)
        if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


class CacheHold:
    """A reader's shared lock on a cache entry: no eviction, in any process, removes it.

    The lock is ``flock(LOCK_SH)`` on the entry itself and lasts while any copy of
    the descriptor is open (a forked DataLoader worker's copy keeps it); it is never
    unlocked explicitly, only closed. Pickled (spawn workers) it is taken again by
    the new process. ``cached`` is False for a local dataset: nothing to hold.
    """

    __slots__ = ("path", "fd", "cached")

    def __init__(self, path: str, fd: int = -1, cached: bool | None = None) -> None:
        self.path, self.fd = path, fd
        self.cached = fd >= 0 if cached is None else cached

    def check(self, *paths: str) -> None:
        """Raise :func:`removed_error` for the entry or the first of ``paths`` (its
        files) that is gone; a no-op for a local dataset."""
        if not self.cached:
            return
        for p in (self.path, *paths):
            if not os.path.exists(p):
                raise removed_error(p)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "CacheHold":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __reduce__(self) -> tuple:
        return _rehold, (self.path, self.cached)


def _rehold(path: str, cached: bool) -> CacheHold:
    """A hold in a new process; an entry gone meanwhile holds nothing (readers then say
    it was removed)."""
    fd = open_shared(path) if cached else None
    return CacheHold(path, -1 if fd is None else fd, cached)


def hold(path: str) -> CacheHold:
    """Hold the cache entry ``path`` (what :func:`fetch_to_cache` returned) for reading.

    Raises :class:`StorageError` (see :func:`removed_error`) when it is gone already:
    prefer :func:`fetch_and_hold`, which takes the hold before any eviction can run.
    """
    fd = open_shared(path)
    if fd is None:
        raise removed_error(path)
    return CacheHold(path, fd)


def _entry_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


#: a ``.part-`` file (download in progress) not written to for this long is abandoned
_STALE_PART_S = 6 * 3600


def _try_exclusive(path: str) -> int | None:
    """An fd on ``path`` holding ``flock(LOCK_EX)``, or None: a reader holds it, or it
    is gone or cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def evict(cache_dir: str, max_bytes: int | None, keep: str,
          next_use: Callable[[str], float] | None = None) -> None:
    """Drop entries until the cache fits ``max_bytes``: with ``next_use`` (an entry's
    path -> how soon the schedule needs it again, inf: not again), the one needed last
    first, least recently used among equals; else least recently used first.

    An entry is dropped only under its fill lock and an exclusive ``flock`` on it,
    both taken without waiting: one being downloaded, or held by a reader in any
    process (:func:`hold`, :meth:`RemoteCache.open_shard`), stays.
    """
    if max_bytes is None:
        return
    entries = []
    now = time.time()
    for name in os.listdir(cache_dir):
        if name.startswith(".part-"):  # a download whose process died: untouched for hours
            p = os.path.join(cache_dir, name)
            with contextlib.suppress(OSError):
                if now - os.stat(p).st_mtime > _STALE_PART_S:
                    os.unlink(p)
        if name.startswith("."):
            continue
        p = os.path.join(cache_dir, name)
        with contextlib.suppress(OSError):
            entries.append((os.stat(p).st_mtime, p, _entry_bytes(p)))
    total = sum(e[2] for e in entries)
    if total <= max_bytes:
        return
    if next_use is not None:
        entries = [(-next_use(p), mtime, p, nbytes) for mtime, p, nbytes in entries]
    else:
        entries = [(0.0, mtime, p, nbytes) for mtime, p, nbytes in entries]
    for _, _, p, nbytes in sorted(entries):
        if total <= max_bytes:
            break
        if p == keep:
            continue
        with locked(os.path.join(cache_dir, "." + os.path.basename(p) + ".lock"),
                    blocking=False) as got:
            if not got:  # being filled by another process
                continue
            fd = _try_exclusive(p)
            if fd is None:  # a reader has it open
                continue
            try:
                gone = os.path.join(cache_dir, ".evict-" + os.path.basename(p))
                with contextlib.suppress(OSError):
                    os.replace(p, gone)  # disappears atomically, then is deleted
                    shutil.rmtree(gone) if os.path.isdir(gone) else os.unlink(gone)
                    total -= nbytes
            finally:  # unlock explicitly: a child forked meanwhile must not keep it
                fcntl.flock(fd, fcntl.LOCK_UN)  # a reader waiting for LOCK_SH: entry gone
                os.close(fd)


def entry_path(url: str, cache_dir: str) -> str:
    """The cache entry of ``url``: its hash and a tame copy of its last component."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:20]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[-80:].lstrip(".")
    return inside(cache_dir, f"{digest}-{base or 'root'}", url=url)
