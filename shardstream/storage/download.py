"""Downloads into the node cache: one process downloads an entry while the others
wait on its lock; parallel ranged streams for big objects; sizes checked against
the manifest before and after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from shardstream.errors import ManifestError, ShardNotFoundError, StorageError
from shardstream.storage.backends import ObjectFS, StorageOptions, info_size, read_fs
from shardstream.storage.io import (DEFAULT_CHUNK_SIZE, MANIFEST_LIMIT, call, fetch_range, raw_size,
                                    read_bytes, size)
from shardstream.storage.locks import (CacheHold, entry_path, evict, locked, open_shared, os_error,
                                       removed_error)
from shardstream.storage.retry import DEFAULT_RETRY, RetryPolicy
from shardstream.storage.streams import open_stream
from shardstream.storage.urls import check_name, inside, is_pipe, is_remote, join, local_path

__all__ = ["fetch_to_cache", "fetch_and_hold", "download"]


#: range requests in flight per download (each ``DEFAULT_CHUNK_SIZE`` bytes)
DOWNLOAD_STREAMS = 3


def _check_room(directory: str, nbytes: int, url: str) -> None:
    """StorageError when ``directory``'s file system cannot take ``nbytes`` more."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if nbytes > free:
        raise StorageError(f"cannot download {url}: it is {nbytes} bytes and only {free} are "
                           f"free in {directory}; free space, or use a cache_dir on a larger "
                           "disk (a size this large may also be a damaged manifest)")


def download(url: str, dest: str, storage_options: StorageOptions, retry: RetryPolicy,
             size_hint: int | None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
             streams: int = DOWNLOAD_STREAMS) -> None:
    """Fetch ``url`` into ``dest`` via a temp file + rename (never a partial ``dest``).

    A remote object comes in ``chunk_size`` range requests, ``streams`` of them in
    flight, each retried from its first byte not yet received (see
    :func:`_fetch_range`); chunks are written in order, straight from the
    response, so the temp file only grows. A size the disk cannot hold is refused
    before anything is fetched.
    """
    where = os.path.dirname(dest) or "."
    if size_hint is not None:
        _check_room(where, size_hint, url)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=where)
    except OSError as exc:
        raise os_error("create a download file in", where, exc) from exc
    try:
        if is_remote(url) and not is_pipe(url):
            try:
                fs, path = read_fs(url, storage_options, timeout=retry.timeout)
                if size_hint is not None:
                    end = size_hint
                else:
                    end = raw_size(fs, path, url, retry)
                    _check_room(where, end, url)
                _fetch_into(fd, fs, path, url, end, retry, chunk_size, streams, tmp)
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as out, open_stream(url, size=size_hint, retry=retry,
                                                          storage_options=storage_options) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, (StorageError,
                                                               ShardNotFoundError)):
            raise os_error("write the download of", f"{url} to {dest}", exc,
                           "free space or check cache_dir") from exc
        raise


def _read_in_place(fs: ObjectFS, fd: int, url: str, lo: int, hi: int,
                   retry: RetryPolicy) -> None:
    """Bytes ``[lo, hi)`` written in place by the storage engine; a broken body resumes
    at the first byte not written (what landed counts as progress)."""
    done = 0

    def attempt() -> None:
        nonlocal done
        try:
            done += fs.read_into(url, fd, lo + done, hi)
        except Exception as exc:
            done += int(getattr(exc, "written", 0) or 0)
            raise
    call(url, "read", attempt, retry)


def _fetch_into(fd: int, fs: Any, path: str, url: str, end: int, retry: RetryPolicy,
                chunk_size: int, streams: int, tmp: str = "") -> None:
    """Bytes ``[0, end)`` of ``url`` into ``fd``, in order, ``streams`` requests at a time
    (object stores: each range written in place as it arrives, in any order)."""
    if isinstance(fs, ObjectFS):
        pool = ThreadPoolExecutor(max(1, streams), thread_name_prefix="shardstream-download")
        try:
            for fut in [pool.submit(_read_in_place, fs, fd, url, at, min(end, at + chunk_size),
                                    retry) for at in range(0, end, max(1, chunk_size))]:
                fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # no write after the fd closes
        return
    offsets = iter(range(0, end, max(1, chunk_size)))
    pool = ThreadPoolExecutor(max(1, streams), thread_name_prefix="shardstream-download")
    pending: deque[tuple[int, Future]] = deque()

    def submit() -> None:
        at = next(offsets, None)
        if at is not None:
            pending.append((at, pool.submit(fetch_range, fs, path, url, at,
                                            min(end, at + chunk_size), retry)))
    try:
        for _ in range(max(1, streams)):
            submit()
        while pending:
            at, fut = pending.popleft()
            data = fut.result()
            submit()
            view = memoryview(data)
            try:
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
            except OSError as exc:
                raise os_error("write", tmp or f"the download of {url}", exc,
                               "free space or use another cache_dir") from exc
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def fetch_to_cache(url: str, cache_dir: str, max_bytes: int | None = None,
                   storage_options: StorageOptions = None, *,
                   retry: RetryPolicy = DEFAULT_RETRY) -> str:
    """A local copy of ``url`` in ``cache_dir``; returns its path.

    ``url`` is a dataset prefix (its ``manifest.json`` is read fresh each call;
    shards and indexes whose size matches are reused, others downloaded) or a
    single object. Entries are evicted least recently used first once the
    cache exceeds ``max_bytes`` (never one a reader holds: see
    :func:`fetch_and_hold`). Safe for concurrent processes: one fills an
    entry under a file lock, every file appears by atomic rename. Local
    ``url``: returned unchanged.

    Every file name in the manifest must be a plain name (:func:`check_name`)
    and every size a byte count, else :class:`ManifestError`; the manifest
    itself is read only up to :data:`MANIFEST_LIMIT` bytes.
    """
    return _fetch(url, cache_dir, max_bytes, storage_options, retry, take_hold=False).path


def fetch_and_hold(url: str, cache_dir: str, max_bytes: int | None = None,
                   storage_options: StorageOptions = None, *,
                   retry: RetryPolicy = DEFAULT_RETRY) -> CacheHold:
    """:func:`fetch_to_cache`, and a :class:`CacheHold` on the entry (``.path``) taken
    before its lock is released: no eviction can slip in between. Keep the hold as
    long as the copy is read (``ShardDataset`` keeps it for its lifetime)."""
    return _fetch(url, cache_dir, max_bytes, storage_options, retry, take_hold=True)


def _fetch(url: str, cache_dir: str, max_bytes: int | None, storage_options: StorageOptions,
           retry: RetryPolicy, take_hold: bool) -> CacheHold:
    if not is_remote(url):
        return CacheHold(local_path(url))
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        raise os_error("create the cache directory", cache_dir, exc,
                       "pass a writable cache_dir") from exc
    url = url.rstrip("/")
    entry = entry_path(url, cache_dir)
    from shardstream.format.manifest import MANIFEST_NAME

    try:
        text = read_bytes(join(url, MANIFEST_NAME), storage_options=storage_options,
                          retry=retry, max_bytes=MANIFEST_LIMIT)
    except ShardNotFoundError:
        text = None
    held = CacheHold(entry)
    with locked(os.path.join(cache_dir, "." + os.path.basename(entry) + ".lock")):
        if text is None:  # a single object
            remote_size = size(url, storage_options=storage_options, retry=retry)
            if not (os.path.isfile(entry) and os.path.getsize(entry) == remote_size):
                download(url, entry, storage_options, retry, remote_size)
        else:
            _fill_entry(url, entry, text, storage_options, retry)
        os.utime(entry)
        if take_hold:  # under the fill lock: no eviction can take the entry meanwhile
            fd = open_shared(entry)
            if fd is None:
                raise removed_error(entry)
            held = CacheHold(entry, fd)
    evict(cache_dir, max_bytes, keep=entry)
    return held


def _fill_entry(url: str, entry: str, text: bytes, storage_options: StorageOptions,
                retry: RetryPolicy) -> None:
    """Make the directory ``entry`` hold the dataset whose manifest is ``text``."""
    from shardstream.format.manifest import MANIFEST_NAME, Manifest
    from shardstream.storage.files import atomic_write

    where = join(url, MANIFEST_NAME)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: not UTF-8 text (byte {exc.start}); the manifest is "
                            "damaged: rewrite the dataset") from None
    manifest = Manifest.from_json(decoded, where=where)
    wanted: dict[str, int] = {}
    for s in manifest.shards:  # every name and size checked before anything is written
        for name, nbytes in ((s.name, s.bytes), (s.index, s.index_bytes)):
            check_name(name, url=where, entry=entry)
            wanted[name] = info_size(nbytes, url=where, what=repr(name))
    try:
        os.makedirs(entry, exist_ok=True)
    except OSError as exc:
        raise os_error("create the cache entry", entry, exc) from exc
    old = inside(entry, MANIFEST_NAME, url=url)
    if os.path.exists(old):
        with open(old, "rb") as f:
            if f.read(len(text) + 1) != text:
                os.unlink(old)  # no stale manifest over changing shards
    for name, nbytes in wanted.items():
        dest = inside(entry, name, url=where)
        if not (os.path.isfile(dest) and os.path.getsize(dest) == nbytes):
            download(join(url, name), dest, storage_options, retry, nbytes)
    for name in os.listdir(entry):
        if name not in wanted and name != MANIFEST_NAME:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(entry, name))
    atomic_write(old, text)  # last, as on upload
