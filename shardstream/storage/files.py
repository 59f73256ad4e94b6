"""The dataset's own local files: atomic writes, directory fsync, hashing, and the
one translation of a local file's ``OSError`` into shardstream's errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from typing import BinaryIO, Iterator

from shardstream.errors import ShardNotFoundError, ShardstreamError, StorageError

__all__ = ["missing_shard", "sha256_file", "atomic_write", "write_file", "fsync_dir",
           "storage_error", "local_errors", "open_local"]


# ---------------------------------------------------------------- OS errors
def storage_error(action: str, path: str, exc: OSError, fix: str | None = None) -> StorageError:
    """``StorageError("cannot <action> <path>: <strerror>[; <fix>]", errno=exc.errno)``."""
    tail = f"; {fix}" if fix else ""
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}{tail}",
                        errno=exc.errno)


def missing_shard(path: str) -> str:
    """The message of a missing shard file: the one fix there is."""
    return f"shard {path} is listed in the manifest but missing; restore it or rewrite " \
        "the dataset"


@contextlib.contextmanager
def local_errors(path: str, action: str = "read", *, missing: str | None = None,
                 fix: str | None = None) -> Iterator[None]:
    """Translate an ``OSError`` raised inside the block (``open``, ``os.open``,
    ``getsize``, ``pread``...) on the local file ``path``:

    - a missing file: :class:`ShardNotFoundError` with the message ``missing``
      (without ``missing``, a missing file is a StorageError like any other);
    - any other: :func:`storage_error` (``cannot <action> <path>: <strerror>``).

    shardstream's own errors (StorageError and ShardNotFoundError are OSErrors too)
    pass through unchanged.
    """
    try:
        yield
    except ShardstreamError:
        raise
    except FileNotFoundError as exc:
        if missing is None:
            raise storage_error(action, path, exc, fix) from exc
        raise ShardNotFoundError(missing) from None
    except OSError as exc:
        raise storage_error(action, path, exc, fix) from exc


def open_local(path: str, *, missing: str | None = None, action: str = "open") -> BinaryIO:
    """``open(path, "rb")`` with :func:`local_errors`' translation; ``missing`` is the
    message of the :class:`ShardNotFoundError` for a missing file (e.g. ``f"shard {path}
    is listed in the manifest but missing; restore it or rewrite the dataset"``)."""
    with local_errors(path, action, missing=missing):
        return open(path, "rb")


# ---------------------------------------------------------------- atomic writes
def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: str, prefix: str | None = None, mode: int = 0o666) -> tuple[int, str]:
    """A new temp file next to ``path``: ``.<name>.<random>.tmp``, or ``<prefix><random>``
    with ``prefix``. Created with ``mode & ~umask`` (the default is what ``open()``
    gives; ``mkstemp``'s 0600 would lock other users out)."""
    directory = os.path.dirname(path) or "."
    for _ in range(100):
        name = (f"{prefix}{secrets.token_hex(6)}" if prefix is not None else
                f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        tmp = os.path.join(directory, name)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def atomic_write(path: str, data: bytes, *, fsync: bool = True, temp_prefix: str | None = None,
                 mode: int = 0o666) -> None:
    """Write ``path`` whole or not at all: temp file, fsync, rename, fsync the directory.

    ``fsync=False`` skips both fsyncs (a cache: losing the file in a crash is fine,
    seeing half of it is not). ``temp_prefix`` names the temp file ``<prefix><random>``
    (the node cache's ``.part-``, which its eviction sweeps when abandoned); ``mode``
    is the new file's permission bits before the umask.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = _create_temp(path, temp_prefix, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(directory)


def write_file(path: str, data: bytes, fsync: bool = True) -> None:
    """Write a new file in place (a shard's index, in a staging folder no reader sees),
    fsynced unless asked not to; errors name it."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError as exc:
        raise storage_error("write", path, exc) from exc


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)
