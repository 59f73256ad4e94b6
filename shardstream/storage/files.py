"""The dataset's own local files: atomic writes, directory fsync, hashing."""

from __future__ import annotations

import hashlib
import os
import secrets

__all__ = ["sha256_file"]


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


def _create_temp(path: str) -> tuple[int, str]:
    """A new ``.<name>.<random>.tmp`` next to ``path``, created with mode 0666 & ~umask
    (what ``open()`` gives; ``mkstemp``'s 0600 would lock other users out)."""
    directory = os.path.dirname(path) or "."
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all: temp file, fsync, rename, fsync the directory."""
    directory = os.path.dirname(path) or "."
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)
