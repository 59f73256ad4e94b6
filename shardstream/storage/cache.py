"""Reading shards from object storage: a node-local shard cache with read-ahead.

Readers in exact mode need a shard's blocks in a shuffled order, and every
rank and worker touches many shards. Rather than one range request per 64 KiB
block, each shard is downloaded **whole, once per node**, with one resumable
stream (:func:`shardstream.storage.streams.open_stream`: 8 MiB range requests,
retries with backoff, resume at the first byte not yet received) into a
cache directory, and then read with ``pread`` exactly like a local shard.

- :class:`RemoteCache`: where shards and indexes land. Entries are named by
  the URL's hash plus the manifest's sha256 (or the size), so a rewritten
  dataset never reads a stale copy. Files appear by atomic rename; one
  process downloads an entry under an ``flock`` while the others wait for
  it, so DataLoader workers and ranks on one node share each download. The
  directory is kept under ``max_bytes`` by evicting the entry the reader's
  schedule needs last (:attr:`RemoteCache.next_use`; least recently used without
  one), never one a reader has open: :meth:`RemoteCache.open_shard`'s fd
  holds a shared ``flock`` on the entry, and eviction (any process) skips
  what it cannot lock exclusively at once. Entry names are built from the
  URL's hash, a hex digest and a tamed copy of the URL's last component, and
  checked to stay inside the cache directory.
- :class:`~shardstream.storage.readahead.Prefetcher`: a background thread that
  downloads the shards a reader will need next, in the order it will first touch
  them, at most ``depth`` shards ahead of it.
- :class:`CacheStats`: where a cache counts its downloads (bytes, shards, indexes)
  and its hits (``ShardStream.cache_stats`` sums them over a rank's processes).
- :meth:`RemoteCache.start_fetch`: start-up read-ahead. A ShardStream knows
  the first shards its first batches touch as soon as it has the manifest;
  ``ShardStream.start_fetch`` (called by the loader) fetches their indexes and then
  the shards in a background thread of the calling process, while DataLoader
  workers start (fork, their own storage clients). Workers find the indexes on
  disk and wait for a shard still downloading under its lock, as for any other process's download; a
  reader in the same process waits for the fetch itself and gets its error.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import os
import re
import tempfile
import threading
from concurrent.futures import Future
from typing import Any, Callable, Protocol, Sequence

from shardstream.errors import ManifestError, ShardNotFoundError, StorageError
from shardstream.storage import download, engine, files, io, locks, urls
from shardstream.storage.retry import DEFAULT_RETRY, RetryPolicy

__all__ = ["RemoteCache", "CacheStats", "default_cache_dir", "DEFAULT_CACHE_LIMIT"]


#: default size limit of the node-local shard cache
DEFAULT_CACHE_LIMIT = 16 << 30


def default_cache_dir() -> str:
    """``$TMPDIR/shardstream-<uid>/shards``: per user, shared by the processes of a node."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"shardstream-{uid}", "shards")


_HEX = re.compile(r"[0-9a-fA-F]{16,64}")


def _entry_name(url: str, tag: str) -> str:
    """``<hash of url>-<tag>-<last component>``: a plain file name whatever the URL holds."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    return f"{digest}-{tag}-{base.lstrip('.') or 'object'}"


def _tag(url: str, sha256: str) -> str:
    """The entry tag for a manifest's ``sha256``: a hex digest, else ManifestError."""
    if not isinstance(sha256, str) or not _HEX.fullmatch(sha256):
        raise ManifestError(f"{url}: the manifest gives sha256 {sha256!r}, not a hex "
                            "digest; the manifest is damaged: rewrite the dataset")
    return sha256[:16]


def _cached_index(path: str | None) -> bytes | None:
    """The index kept at ``path``, if there is one."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class CacheStats(Protocol):
    """Where a :class:`RemoteCache` counts what it did: ``kind`` is ``"shard_download"``
    or ``"index_download"`` (``nbytes`` downloaded by this process) or ``"shard_hit"``
    / ``"index_hit"`` (found in the node cache, or fetched by another process of the
    node while this one waited for it)."""

    def count(self, kind: str, nbytes: int) -> None: ...


class RemoteCache:
    """Downloads remote shards (and indexes) into ``cache_dir``; see the module docs.

    Picklable (DataLoader workers get a copy): it holds only settings.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, *,
                 cache_dir: str | None = None, max_bytes: int | None = DEFAULT_CACHE_LIMIT,
                 retry: RetryPolicy = DEFAULT_RETRY, stats: CacheStats | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        #: where downloads and cache hits are counted (``count(kind, nbytes)``), if anywhere
        self.stats = stats
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        self.max_bytes = max_bytes
        self.retry = retry
        self._indexes: dict[str, bytes | None] = {}
        self._pending: dict[tuple[str, str], Future] = {}  # start_fetch's, by (kind, url)
        self._pending_pid = os.getpid()
        #: how soon this process's schedule needs an entry again (path -> steps, inf:
        #: not again), set by the reader; eviction drops the one needed last first
        self.next_use: Callable[[str], float] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_indexes"] = {}
        state["_pending"] = {}
        state["next_use"] = None
        return state

    def entry_name(self, url: str, *, size: int, sha256: str | None = None) -> str:
        """The file name of ``url``'s entry in the cache directory."""
        return os.path.basename(self._dest(url, size, sha256))

    # -- start-up read-ahead ------------------------------------------------------
    def start_fetch(self, shards: Sequence[tuple[str, int | None, str | None, str, str | None]]
                    ) -> threading.Thread | None:
        """Fetch ``(url, size, sha256, index_url, index_sha256)`` in the background: the
        shards one after another in one thread (a shard another process is downloading
        is left to it), the indexes in another. Errors wait for the reader (module docs).
        Returns a thread (tests join it)."""
        engine.start_soon()  # warm for the DataLoader workers about to fork
        pending = self._own_pending()
        indexes: list[tuple[Future, Callable[[], Any]]] = []
        downloads: list[tuple[Future, Callable[[], Any]]] = []
        for url, size, sha256, index_url, index_sha256 in shards:
            for kind, jobs, job in (
                    ("index", indexes, lambda u=index_url, h=index_sha256: self._index(u, h, False)),
                    ("shard", downloads, lambda u=url, n=size, h=sha256: self._shard(u, n, h, False))):
                key = (kind, index_url if kind == "index" else url)
                if key not in pending:
                    pending[key] = Future()
                    jobs.append((pending[key], job))
        if not indexes and not downloads:
            return None

        def run(jobs: list[tuple[Future, Callable[[], Any]]]) -> None:
            for fut, job in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(job())
                    except BaseException as exc:  # noqa: BLE001 - handed to the reader
                        fut.set_exception(exc)
        thread = None
        for jobs in (downloads, indexes):  # the shards at once: they take longest
            if jobs:
                thread = threading.Thread(target=run, args=(jobs,), daemon=True,
                                          name="shardstream-start-fetch")
                thread.start()
        return thread

    def _own_pending(self) -> dict[tuple[str, str], Future]:
        """start_fetch's futures, if made in this process (a forked child has no thread)."""
        if self._pending_pid != os.getpid():
            self._pending, self._pending_pid = {}, os.getpid()
        return self._pending

    def _started(self, kind: str, url: str, wait: bool) -> tuple[bool, Any]:
        """(True, result) of start_fetch's fetch of ``url`` once done (taken: later calls
        fetch afresh); (False, None) when there is none, or it runs and not ``wait``."""
        pending = self._own_pending()
        fut = pending.get((kind, url))
        if fut is None or (not wait and not fut.done()):
            return False, None
        pending.pop((kind, url), None)
        try:
            return True, fut.result()
        except (StorageError, ShardNotFoundError):
            if kind == "shard":
                raise  # as if this reader had tried: no second round of requests
            return False, None
        except Exception:  # noqa: BLE001 - anything else: the caller tries itself
            return False, None

    # -- indexes ----------------------------------------------------------------
    def index_bytes(self, url: str, *, sha256: str | None = None,
                    missing_ok: bool = False, size: int | None = None) -> bytes | None:
        """The index at ``url`` (one request; kept on disk when ``sha256`` names it).

        ``missing_ok``: return None instead of raising :class:`ShardNotFoundError`.
        ``size`` (the manifest's ``index_bytes``): a larger answer is refused unread.
        """
        self._started("index", url, wait=True)  # lands in self._indexes (or fails: retry)
        return self._index(url, sha256, missing_ok, size)

    def _index(self, url: str, sha256: str | None, missing_ok: bool,
               size: int | None = None) -> bytes | None:
        if url in self._indexes:
            data = self._indexes[url]
            if data is None and not missing_ok:
                raise ShardNotFoundError(f"index {url} does not exist")
            return data
        path = self._inside(url, _entry_name(url, _tag(url, sha256))) if sha256 else None
        try:
            data = _cached_index(path)
            if data is None:
                with contextlib.ExitStack() as stack:
                    if path is not None:  # one process fetches it, the others read its copy
                        lock = self._index_lock(path)
                        if lock is not None:
                            stack.enter_context(locks.locked(lock))
                            data = _cached_index(path)
                    if data is None:
                        data = io.read_bytes(url, storage_options=self.storage_options,
                                                  retry=self.retry, max_bytes=size)
                        self._count("index_download", len(data))
                        if path is not None and hashlib.sha256(data).hexdigest() == sha256:
                            self._store(path, data)
                    else:
                        self._count("index_hit", 0)
            else:
                self._count("index_hit", 0)
        except ShardNotFoundError:
            self._indexes[url] = None
            if missing_ok:
                return None
            raise
        if len(self._indexes) > 4096:
            self._indexes.clear()
        self._indexes[url] = data
        return data

    def _index_lock(self, path: str) -> str | None:
        """The lock file of a cached index; None where the cache dir is unusable."""
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
        except OSError:
            return None
        if not os.access(self.cache_dir, os.W_OK):
            return None
        return os.path.join(self.cache_dir, "." + os.path.basename(path) + ".lock")

    def _store(self, path: str, data: bytes) -> None:
        """Keep an index on disk, best effort: no fsync (a lost copy is fetched again),
        a ``.part-`` temp file (swept by eviction if abandoned), mode 0600 like shards."""
        os.makedirs(self.cache_dir, exist_ok=True)
        with contextlib.suppress(OSError):
            files.atomic_write(path, data, fsync=False, temp_prefix=".part-", mode=0o600)

    # -- shards -----------------------------------------------------------------
    def shard_path(self, url: str, *, size: int | None = None, sha256: str | None = None,
                   wait: bool = True) -> str | None:
        """A complete local copy of ``url`` (downloaded unless cached); returns its path.

        ``size`` (from the manifest or index) skips a HEAD request and validates
        the cached copy; without ``sha256`` the size is part of the entry's name.
        ``wait=False``: return None at once when another process is downloading it
        (read-ahead moves on to the next shard instead of queueing behind it).
        """
        done, path = self._started("shard", url, wait)
        if done and path is not None and self._complete(path, size):
            return path
        return self._shard(url, size, sha256, wait)

    def has_shard(self, url: str, *, size: int, sha256: str | None = None) -> bool:
        """Is a complete copy of ``url`` in the cache already?"""
        return self._complete(self._dest(url, size, sha256), size)

    def _dest(self, url: str, size: int, sha256: str | None) -> str:
        given = size
        try:
            size = operator.index(size) if not isinstance(size, bool) else -1
        except TypeError:
            size = -1
        if size < 0:
            raise ManifestError(f"{url}: size {given!r} is not a byte count; the manifest "
                                "or index is damaged: rewrite the dataset")
        tag = _tag(url, sha256) if sha256 else f"{size}b"
        return self._inside(url, _entry_name(url, tag))

    def _inside(self, url: str, name: str) -> str:
        """``cache_dir/name`` for ``url``, checked to stay inside the cache directory."""
        return urls.inside(self.cache_dir, name, url=url)

    def _shard(self, url: str, size: int | None, sha256: str | None, wait: bool) -> str | None:
        if size is None:
            size = io.size(url, storage_options=self.storage_options, retry=self.retry)
        dest = self._dest(url, size, sha256)
        if self._complete(dest, size):
            self._count("shard_hit", 0)
            return dest
        os.makedirs(self.cache_dir, exist_ok=True)
        lock = os.path.join(self.cache_dir, "." + os.path.basename(dest) + ".lock")
        with locks.locked(lock, blocking=wait) as got:
            if not got:
                return None
            if not self._complete(dest, size):
                download.download(url, dest, self.storage_options, self.retry, size)
                self._count("shard_download", size)
            else:  # another process of this node downloaded it meanwhile
                self._count("shard_hit", 0)
        locks.evict(self.cache_dir, self.max_bytes, keep=dest, next_use=self.next_use)
        return dest

    def _count(self, kind: str, nbytes: int) -> None:
        if self.stats is not None:
            self.stats.count(kind, nbytes)

    @staticmethod
    def _complete(path: str, size: int) -> bool:
        try:
            if os.path.getsize(path) != size:
                return False
            os.utime(path)  # LRU: recently used
            return True
        except OSError:
            return False

    def open_shard(self, url: str, *, size: int | None = None, sha256: str | None = None,
                   path: str | None = None) -> int:
        """An open fd on the cached copy of ``url`` (``path``: already fetched there).

        The fd holds a shared ``flock`` on the copy: while it is open no eviction,
        in any process, removes the entry (closing the fd lets it go).
        """
        for _ in range(3):  # an entry evicted between download and open: fetch again
            if path is None:
                path = self.shard_path(url, size=size, sha256=sha256)
            assert path is not None
            fd = locks.open_shared(path)
            if fd is not None:
                return fd
            path = None
        raise StorageError(f"{url}: the cached copy keeps being evicted from {self.cache_dir} "
                           "before it can be opened; raise the cache size limit "
                           "(cache_limit=) or give this reader a cache_dir of its own")
