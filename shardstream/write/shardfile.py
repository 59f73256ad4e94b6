"""ShardFile: a shard being written, its I/O on background threads.

The sink appends bytes (tar headers, blocks straight from an encoded batch, padding);
in batches of about ``BATCH_BYTES`` one thread writes them with one ``os.writev``
each and, with ``fsync``, flushes every ``SYNC_BYTES`` with ``fdatasync`` so that the
final ``fsync`` has little left to do; another hashes them (sha256, for the manifest).
``writev``, ``fdatasync`` and ``update`` of large buffers release the GIL, so writing,
hashing and encoding the next samples run side by side. The queues are bounded
(``DEPTH`` batches): a slow disk holds the encoder back rather than filling memory.
An error on the writing thread is raised, naming the file, by the next :meth:`write`
or by :meth:`close`; the bytes handed over must not change afterwards (``bytes``, or
views of read-only buffers, as the sink gives).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading

from shardstream.storage.files import storage_error

__all__ = ["ShardFile"]

BATCH_BYTES = 1 << 20
SYNC_BYTES = 16 << 20
DEPTH = 8
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class ShardFile:
    """Bytes appended in order to a new file at ``path``; :meth:`close` -> sha256 hex."""

    def __init__(self, path: str, fsync: bool = True) -> None:
        self.name = path
        self.fsync = fsync
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as exc:
            raise storage_error("create", path, exc) from exc
        self._sha = hashlib.sha256()
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._queues: tuple[queue.Queue, queue.Queue] = (queue.Queue(DEPTH), queue.Queue(DEPTH))
        self._threads = [threading.Thread(target=run, args=(q,), name=f"shardstream-{what}",
                                          daemon=True)
                         for run, q, what in zip((self._write_run, self._hash_run),
                                                 self._queues, ("write", "sha256"))]
        for t in self._threads:
            t.start()

    def write(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            self._raise()
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= BATCH_BYTES or len(self._pending) >= _IOV_MAX:
            self._hand_off()

    def _hand_off(self) -> None:
        if self._pending:
            for q in self._queues:
                q.put(self._pending)
            self._pending, self._pending_bytes = [], 0

    def close(self) -> str:
        """Write what is left, fsync (if asked) and close; the sha256 of all bytes."""
        self._hand_off()
        self._stop()
        try:
            if self._error is not None:
                self._raise()
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise storage_error("write", self.name, exc) from exc
        finally:
            os.close(self._fd)
        return self._sha.hexdigest()

    def _raise(self) -> None:
        exc = self._error
        if isinstance(exc, OSError):
            raise storage_error("write", self.name, exc) from exc
        raise RuntimeError(f"writing {self.name} failed: {exc!r}") from exc

    def abort(self) -> None:
        """Stop writing and close the file (the caller removes it)."""
        self._pending = []
        self._stop()
        os.close(self._fd)

    def _stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()

    # -- the threads -------------------------------------------------------------
    def _hash_run(self, q: queue.Queue) -> None:
        while (pieces := q.get()) is not None:
            for p in pieces:
                self._sha.update(p)

    def _write_run(self, q: queue.Queue) -> None:
        synced = written = 0
        while (pieces := q.get()) is not None:
            if self._error is not None:
                continue  # drain: the caller raises the error
            try:
                written += self._write_all(pieces)
                if self.fsync and written - synced >= SYNC_BYTES:
                    _datasync(self._fd)
                    synced = written
            except BaseException as exc:  # kept for the caller; the thread drains on
                self._error = exc

    def _write_all(self, pieces: list[bytes | memoryview]) -> int:
        """Write every piece (``writev``, then piece by piece after a short write); the
        bytes written."""
        total = sum(map(len, pieces))
        done = os.writev(self._fd, pieces)
        if done == total:
            return total
        for p in pieces:  # a short write (rare on files): the rest one piece at a time
            view = memoryview(p)
            if done >= len(view):
                done -= len(view)
                continue
            view, done = view[done:], 0
            while view:
                view = view[os.write(self._fd, view):]
        return total

