"""Streaming reads of remote objects: ranged, resumable after a dropped connection,
and ``pipe:`` commands (opt-in).
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from shardstream.errors import StorageError
from shardstream.storage.backends import StorageOptions, read_fs
from shardstream.storage.files import local_errors
from shardstream.storage.io import DEFAULT_CHUNK_SIZE, fetch_range, raw_size
from shardstream.storage.retry import DEFAULT_RETRY, RetryPolicy
from shardstream.storage.urls import is_pipe, is_remote, local_path

__all__ = ["open_stream", "ResumableStream"]


class ResumableStream(io.RawIOBase):
    """Sequential reader of bytes ``[start, end)`` that survives broken connections.

    Bytes are fetched in ``chunk_size`` range requests, the next one in the
    background while the current one is consumed (``readahead``). A request
    that fails is retried by ``retry`` at the first byte not yet received, so
    nothing is read twice from the caller's view and nothing is re-read from
    zero. ``retries`` counts the retried requests; ``bytes_fetched`` the
    payload received.
    """

    def __init__(self, fs: Any, path: str, url: str, *, start: int = 0, end: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, retry: RetryPolicy = DEFAULT_RETRY,
                 readahead: bool = True) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.fs, self.path, self.url, self.retry = fs, path, url, retry
        self.chunk_size = chunk_size
        self.retries = 0
        self.bytes_fetched = 0
        self._pos = start  # next byte to hand out
        self._fetch_pos = start  # next byte to request
        self._end = end if end is not None else raw_size(fs, path, url, retry)
        self._buf = memoryview(b"")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shardstream-readahead") \
            if readahead else None
        self._next: Future | None = None

    def _count_retry(self, exc: BaseException, retry_no: int, wait: float) -> None:
        self.retries += 1

    def _fetch(self, offset: int) -> bytes:
        """One chunk from ``offset``; partial bodies count as progress."""
        end = min(self._end, offset + self.chunk_size)
        data = fetch_range(self.fs, self.path, self.url, offset, end, self.retry,
                           self._count_retry)
        self.bytes_fetched += end - offset
        return data

    def _schedule(self) -> None:
        if self._next is None and self._fetch_pos < self._end:
            at = self._fetch_pos
            self._fetch_pos = min(self._end, at + self.chunk_size)
            if self._pool is not None:
                self._next = self._pool.submit(self._fetch, at)
            else:
                done: Future = Future()
                try:
                    done.set_result(self._fetch(at))
                except BaseException as exc:
                    done.set_exception(exc)
                self._next = done

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:
        if self.closed:
            raise ValueError(f"read from a closed stream ({self.url})")
        view = memoryview(b).cast("B")
        filled = 0
        while filled < len(view) and self._pos < self._end:
            if not self._buf:
                self._schedule()
                assert self._next is not None
                future, self._next = self._next, None
                self._buf = memoryview(future.result())
                self._schedule()  # read-ahead: the next chunk while this one is used
            n = min(len(view) - filled, len(self._buf))
            view[filled:filled + n] = self._buf[:n]
            self._buf = self._buf[n:]
            filled += n
            self._pos += n
        return filled

    def close(self) -> None:
        if self._pool is not None:
            if self._next is not None:
                self._next.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._next = None
        self._buf = memoryview(b"")
        super().close()


class _PipeStream(io.RawIOBase):
    """stdout of a command (no shell); closing waits for it and checks its status."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        args = shlex.split(url[len("pipe:"):])
        if not args:
            raise ValueError(f"{url!r}: empty pipe: command")
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        assert self._proc.stdout is not None
        return self._proc.stdout.readinto(b)

    def close(self) -> None:
        if not self.closed:
            assert self._proc.stdout is not None
            self._proc.stdout.close()
            status = self._proc.wait()
            super().close()
            if status not in (0, -13):  # -13: SIGPIPE when the reader stopped early
                raise StorageError(f"{self.url}: command exited with status {status}")


def open_stream(url: str, *, start: int = 0, end: int | None = None, size: int | None = None,
                storage_options: StorageOptions = None, retry: RetryPolicy = DEFAULT_RETRY,
                chunk_size: int = DEFAULT_CHUNK_SIZE, readahead: bool = True,
                allow_pipe: bool = False) -> BinaryIO:
    """A file-like reader of ``url`` from byte ``start`` to ``end`` (exclusive).

    Remote: a :class:`ResumableStream` (pass the object's ``size`` when the
    manifest knows it, to skip a HEAD request). Local: a plain file. ``pipe:``
    URLs run the command (split like a shell would, but no shell) only with
    ``allow_pipe=True``.
    """
    url = os.fspath(url)
    if is_pipe(url):
        if not allow_pipe:
            raise StorageError(f"{url}: pipe: URLs run a command; pass allow_pipe=True if "
                               "you trust where this URL came from")
        if start or end is not None:
            raise ValueError(f"{url}: pipe: streams cannot start at an offset")
        return _PipeStream(url)  # type: ignore[return-value]
    if not is_remote(url) and end is None:
        path = local_path(url)
        with local_errors(path, missing=f"{path} does not exist"):
            f = open(path, "rb")
            try:
                f.seek(start)
            except BaseException:
                f.close()
                raise
        return f
    fs, path = read_fs(url, storage_options, timeout=retry.timeout)
    if end is None and size is not None:
        end = size
    return ResumableStream(fs, path, url, start=start, end=end,  # type: ignore[return-value]
                           chunk_size=chunk_size, retry=retry, readahead=readahead)
