"""Object storage on fsspec: ``s3://``, ``gs://``, ``http(s)://``, ``file://``, local paths.

Every function takes a URL (or a local path) plus ``storage_options`` (passed
to the fsspec filesystem: ``key``, ``secret``, ``endpoint_url``, ``anon``,
``client_kwargs``...) and a :class:`~shardstream.retry.RetryPolicy`.
Credentials come from the usual places when not given: environment
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for S3-compatible
stores, ``GOOGLE_APPLICATION_CREDENTIALS``), ``~/.aws``, instance metadata.

Errors leave as :class:`StorageError` (``.url``, ``.kind`` = ``"auth"``,
``"transient"``, ``"fatal"``; ``.tries``) or, for a missing object,
:class:`ShardNotFoundError`. Authentication errors are never retried.

Reading: :func:`read_bytes` (one range request) and :func:`open_stream`
(a sequential reader that resumes a broken download with a range request at
the first byte not yet handed out, with one chunk of read-ahead).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Iterator

from .errors import ShardNotFoundError, StorageError
from .retry import DEFAULT_RETRY, RetryPolicy, classify

__all__ = ["RetryPolicy", "DEFAULT_RETRY", "DEFAULT_CHUNK_SIZE", "is_remote", "is_pipe",
           "join", "local_path", "get_fs", "read_bytes", "open_stream", "ResumableStream",
           "size", "exists", "list_prefix", "put_file", "put_bytes", "remove",
           "fetch_to_cache"]

log = logging.getLogger("shardstream.storage")

DEFAULT_CHUNK_SIZE = 8 * 2**20
StorageOptions = dict[str, Any] | None
_LOCAL_PROTOCOLS = ("file", "local")
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
_PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "http": "aiohttp"}


# ---------------------------------------------------------------- URLs
# ---------------------------------------------------------------- fork safety
# fsspec runs its async filesystems (s3fs, gcsfs, http) on one event loop in a
# thread. A forked child (a DataLoader worker) inherits that loop object and
# its epoll instance, which the parent still uses: when the child later closes
# the inherited connections (s3fs's finalizer, aiohttp's connector __del__),
# asyncio unregisters their sockets from that *shared* epoll, and the parent's
# next request on such a pooled connection waits for its timeout (60 s). The
# child gets a private selector for the inherited loop, so whatever it closes
# stays in the child; fsspec itself gives the child a fresh loop.
_inherited_loop: list[Any] = [None]


def _before_fork() -> None:
    asyn = __import__("sys").modules.get("fsspec.asyn")
    _inherited_loop[0] = asyn.loop[0] if asyn is not None else None


def _after_fork_in_child() -> None:
    global _sessions_lock
    _sessions_lock = threading.Lock()  # a parent's thread may have held it
    loop, _inherited_loop[0] = _inherited_loop[0], None
    if loop is not None and getattr(loop, "_selector", None) is not None:
        import selectors

        loop._selector = selectors.DefaultSelector()


def _after_fork_in_parent() -> None:
    _inherited_loop[0] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child,
                        after_in_parent=_after_fork_in_parent)


def _protocol(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isidentifier() else ""


def is_pipe(url: str) -> bool:
    """``pipe:cmd args`` (webdataset-style: the shard is a command's stdout)."""
    return url.startswith("pipe:")


def is_remote(url: str | os.PathLike) -> bool:
    """True for ``s3://``, ``gs://``, ``http(s)://`` and other non-local fsspec URLs."""
    url = os.fspath(url)
    return is_pipe(url) or _protocol(url) not in ("", *_LOCAL_PROTOCOLS)


def local_path(url: str | os.PathLike) -> str:
    """``file:///x/y`` -> ``/x/y``; a plain path is returned as is."""
    url = os.fspath(url)
    if _protocol(url) in _LOCAL_PROTOCOLS:
        return url.partition("://")[2]
    return url


def join(base: str, *names: str) -> str:
    """``join("s3://b/ds", "shard-000000.tar")`` -> ``"s3://b/ds/shard-000000.tar"``."""
    if not is_remote(base):
        return os.path.join(local_path(base), *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


# ---------------------------------------------------------------- filesystems
def _default_options(protocol: str, options: dict[str, Any], timeout: float | None) -> None:
    """Timeouts, and no hidden retry layers under ours (they would multiply)."""
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        if timeout is not None:
            config.setdefault("connect_timeout", timeout)
            config.setdefault("read_timeout", timeout)
        options["config_kwargs"] = config
    elif protocol in ("http", "https") and timeout is not None:
        client = dict(options.get("client_kwargs") or {})
        if "timeout" not in client:
            import aiohttp

            client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                      sock_read=timeout)
        options["client_kwargs"] = client


def get_fs(url: str, storage_options: StorageOptions = None, *,
           timeout: float | None = DEFAULT_RETRY.timeout) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path to hand it.

    ``timeout`` (seconds of silence on connect or read) is applied unless
    ``storage_options`` sets its own. Raises :class:`StorageError` naming the
    extra to install when the protocol's package is missing.
    """
    import fsspec

    url = os.fspath(url)
    if is_pipe(url):
        raise StorageError(f"{url}: pipe: URLs run a shell command; only open_stream(..., "
                           "allow_pipe=True) accepts them")
    protocol = _protocol(url) or "file"
    options = dict(storage_options or {})
    _default_options(protocol, options, timeout)
    inner_retries = options.pop("retries", 1) if protocol in ("s3", "s3a") else None
    try:
        if protocol in ("s3", "s3a"):
            _shared_session(options)
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = (f"pip install 'shardstream[{extra}]' (or {_PACKAGES[extra]})" if extra
                else "install the fsspec implementation for it")
        raise StorageError(f"{url}: {protocol}:// needs a package that is not installed: "
                           f"{hint}") from exc
    except ValueError as exc:
        raise StorageError(f"{url}: unknown storage protocol {protocol!r} ({exc})") from exc
    if inner_retries is not None:
        fs.retries = inner_retries
    return fs, path


def _read_fs(url: str, storage_options: StorageOptions, timeout: float | None
             ) -> tuple[Any, str]:
    """The filesystem for reads: :mod:`shardstream.s3read` for ``s3://`` where it can
    sign the requests itself (no s3fs/botocore import, no client to build), else
    :func:`get_fs`."""
    if _protocol(os.fspath(url)) in ("s3", "s3a"):
        from . import s3read

        lite = s3read.reader(os.fspath(url), storage_options, timeout=timeout)
        if lite is not None:
            return lite
    return get_fs(url, storage_options, timeout=timeout)


# s3fs creates a botocore session per filesystem, and each parses the S3 service
# model and endpoint data from JSON (~50 ms of CPU). Filesystems are per process
# (fsspec), so every DataLoader worker paid that again before its first request.
# One session per process and profile, all sharing the parsed data of the first
# one (botocore's data loader: read-only file contents, nothing tied to an event
# loop or credentials); a forked worker inherits it already filled.
_S3FS_BASE_OPTIONS = ("use_listings_cache", "listings_expiry_time", "max_paths",
                      "skip_instance_cache")
_sessions: dict[tuple[int, str | None], Any] = {}
_data_loaders: dict[Any, Any] = {}
_sessions_lock = threading.Lock()


def _shared_session(options: dict[str, Any]) -> None:
    """Pass s3fs this process's session for ``options`` (unless they name their own)."""
    if options.get("session") is not None:
        return
    import inspect

    import aiobotocore.session
    import s3fs

    known = inspect.signature(s3fs.S3FileSystem.__init__).parameters
    extra = {k for k in options if k not in known and k not in _S3FS_BASE_OPTIONS}
    if extra - {"profile"}:  # other session arguments: s3fs makes its session itself
        return
    profile = options.get("profile")
    key = (os.getpid(), profile)
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = aiobotocore.session.AioSession(profile=profile)
            where = session.get_config_variable("data_path")
            loader = _data_loaders.get(where)
            if loader is None:
                _data_loaders[where] = session.get_component("data_loader")
            else:
                session.register_component("data_loader", loader)
            for k in [k for k in _sessions if k[0] != key[0]]:  # a parent's sessions
                del _sessions[k]
            _sessions[key] = session
    options["session"] = session


# ---------------------------------------------------------------- errors + retries
def _fail(url: str, action: str) -> Callable[[BaseException, int], Exception]:
    def describe(exc: BaseException, tries: int) -> Exception:
        kind = classify(exc)
        last = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if kind == "missing":
            err: Exception = ShardNotFoundError(f"{url} does not exist ({last})")
        elif kind == "auth":
            err = StorageError(
                f"cannot {action} {url}: access denied ({last}); not retried. Check the "
                "credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws, "
                "GOOGLE_APPLICATION_CREDENTIALS, or storage_options) and the bucket's "
                "permissions")
        elif kind == "transient":
            err = StorageError(f"cannot {action} {url}: gave up after {tries} tries; "
                               f"last error: {last}")
        else:
            err = StorageError(f"cannot {action} {url}: {last}")
        err.url, err.kind, err.tries = url, kind, tries  # type: ignore[attr-defined]
        return err
    return describe


def _log_retry(url: str, action: str) -> Callable[[BaseException, int, float], None]:
    def note(exc: BaseException, retry: int, wait: float) -> None:
        log.info("%s %s: %s: %s; retry %d in %.2f s", action, url, type(exc).__name__, exc,
                 retry + 1, wait)
    return note


def _call(url: str, action: str, fn: Callable[[], Any], retry: RetryPolicy,
          on_retry: Callable[[BaseException, int, float], None] | None = None) -> Any:
    note = _log_retry(url, action)

    def both(exc: BaseException, retry_no: int, wait: float) -> None:
        note(exc, retry_no, wait)
        if on_retry is not None:
            on_retry(exc, retry_no, wait)
    return retry.call(fn, describe=_fail(url, action), on_retry=both)


# ---------------------------------------------------------------- reading
def read_bytes(url: str, start: int | None = None, end: int | None = None, *,
               storage_options: StorageOptions = None,
               retry: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """Bytes ``[start, end)`` of the object (all of it by default): one range request."""
    fs, path = _read_fs(url, storage_options, timeout=retry.timeout)
    want = None if start is None or end is None else end - start

    def fetch() -> bytes:
        data = fs.cat_file(path, start=start, end=end)
        if want is not None and len(data) > want:
            raise StorageError(f"{url}: the server ignored the Range header "
                               f"(asked {want} bytes, got {len(data)})")
        return bytes(data) if isinstance(data, bytearray) else data
    if want == 0:
        return b""
    return _call(url, "read", fetch, retry)


def size(url: str, *, storage_options: StorageOptions = None,
         retry: RetryPolicy = DEFAULT_RETRY) -> int:
    """Size of the object in bytes."""
    fs, path = _read_fs(url, storage_options, timeout=retry.timeout)
    return int(_call(url, "stat", lambda: fs.size(path), retry))


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
        self._end = end if end is not None else _size(fs, path, url, retry)
        self._buf = memoryview(b"")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shardstream-readahead") \
            if readahead else None
        self._next: Future | None = None

    def _count_retry(self, exc: BaseException, retry_no: int, wait: float) -> None:
        self.retries += 1

    def _fetch(self, offset: int) -> bytes:
        """One chunk from ``offset``; partial bodies count as progress."""
        end = min(self._end, offset + self.chunk_size)
        data = _fetch_range(self.fs, self.path, self.url, offset, end, self.retry,
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


def _fetch_range(fs: Any, path: str, url: str, start: int, end: int, retry: RetryPolicy,
                 on_retry: Callable[[BaseException, int, float], None] | None = None) -> bytes:
    """Bytes ``[start, end)``; a broken or short body is retried from its first byte
    not yet received (what arrived counts as progress, nothing is fetched twice)."""
    parts: list[bytes] = []
    got = 0

    def attempt() -> None:
        nonlocal got
        lo = start + got
        try:
            data = fs.cat_file(path, start=lo, end=end)
        except Exception as exc:
            partial = getattr(exc, "partial", None)  # http.client.IncompleteRead (s3read)
            if isinstance(partial, bytes) and 0 < len(partial) <= end - lo:
                parts.append(partial)  # what arrived before the break counts as progress
                got += len(partial)
            raise
        if len(data) > end - lo:
            raise StorageError(f"{url}: the server ignored the Range header")
        if not data:
            raise ConnectionResetError(f"empty body at byte {lo} of {url}")
        parts.append(data)
        got += len(data)
        if got < end - start:  # short body without an error: resume where it stopped
            raise ConnectionResetError(f"short body at byte {start + got}")
    _call(url, "read", attempt, retry, on_retry)
    return parts[0] if len(parts) == 1 else b"".join(parts)  # bytes or bytearray


def _size(fs: Any, path: str, url: str, retry: RetryPolicy) -> int:
    return int(_call(url, "stat", lambda: fs.size(path), retry))


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
        try:
            f = open(path, "rb")
            f.seek(start)
        except FileNotFoundError as exc:
            raise ShardNotFoundError(f"{path} does not exist") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return f
    fs, path = _read_fs(url, storage_options, timeout=retry.timeout)
    if end is None and size is not None:
        end = size
    return ResumableStream(fs, path, url, start=start, end=end,  # type: ignore[return-value]
                           chunk_size=chunk_size, retry=retry, readahead=readahead)


# ---------------------------------------------------------------- listing, writing
def exists(url: str, *, storage_options: StorageOptions = None,
           retry: RetryPolicy = DEFAULT_RETRY) -> bool:
    """Whether the object (or prefix) exists; listing caches are bypassed."""
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)
    fs.invalidate_cache(path)
    return bool(_call(url, "check", lambda: fs.exists(path), retry))


def list_prefix(url: str, *, storage_options: StorageOptions = None,
                retry: RetryPolicy = DEFAULT_RETRY) -> list[str]:
    """Sorted names of the objects directly under ``url`` (``[]`` if there are none)."""
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)
    fs.invalidate_cache(path)

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        here = path.rstrip("/")
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                if e.get("type") != "directory" and e["name"].rstrip("/") != here]
    return sorted(_call(url, "list", ls, retry))


def put_file(local: str | os.PathLike, url: str, *, storage_options: StorageOptions = None,
             retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Upload a local file whole (s3fs uses multipart uploads above 50 MiB)."""
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)
    local = os.fspath(local)
    if not is_remote(url):
        fs.makedirs(fs._parent(path), exist_ok=True)
    _call(url, "upload to", lambda: fs.put_file(local, path), retry)


def put_bytes(data: bytes, url: str, *, storage_options: StorageOptions = None,
              retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Write ``data`` as one object (a single PUT: atomic on object stores)."""
    if not is_remote(url):
        from .manifest import atomic_write

        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, data)
        return
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)
    _call(url, "upload to", lambda: fs.pipe_file(path, data), retry)


def remove(url: str, *, missing_ok: bool = True, storage_options: StorageOptions = None,
           retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Delete one object."""
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
    _call(url, "delete", rm, retry)
    fs.invalidate_cache(path)


# ---------------------------------------------------------------- local cache
@contextlib.contextmanager
def _locked(path: str, blocking: bool = True) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


#: range requests in flight per download (each ``DEFAULT_CHUNK_SIZE`` bytes)
DOWNLOAD_STREAMS = 3


def _download(url: str, dest: str, storage_options: StorageOptions, retry: RetryPolicy,
              size_hint: int | None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
              streams: int = DOWNLOAD_STREAMS) -> None:
    """Fetch ``url`` into ``dest`` via a temp file + rename (never a partial ``dest``).

    A remote object comes in ``chunk_size`` range requests, ``streams`` of them in
    flight, each retried from its first byte not yet received (see
    :func:`_fetch_range`); chunks are written in order, straight from the
    response, so the temp file only grows.
    """
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=os.path.dirname(dest))
    try:
        if is_remote(url) and not is_pipe(url):
            try:
                fs, path = _read_fs(url, storage_options, timeout=retry.timeout)
                end = size_hint if size_hint is not None else _size(fs, path, url, retry)
                _fetch_into(fd, fs, path, url, end, retry, chunk_size, streams)
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as out, open_stream(url, size=size_hint, retry=retry,
                                                          storage_options=storage_options) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fetch_into(fd: int, fs: Any, path: str, url: str, end: int, retry: RetryPolicy,
                chunk_size: int, streams: int) -> None:
    """Bytes ``[0, end)`` of ``url`` into ``fd``, in order, ``streams`` requests at a time."""
    offsets = iter(range(0, end, max(1, chunk_size)))
    pool = ThreadPoolExecutor(max(1, streams), thread_name_prefix="shardstream-download")
    pending: deque[tuple[int, Future]] = deque()

    def submit() -> None:
        at = next(offsets, None)
        if at is not None:
            pending.append((at, pool.submit(_fetch_range, fs, path, url, at,
                                            min(end, at + chunk_size), retry)))
    try:
        for _ in range(max(1, streams)):
            submit()
        while pending:
            at, fut = pending.popleft()
            data = fut.result()
            submit()
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _entry_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


#: a ``.part-`` file (download in progress) not written to for this long is abandoned
_STALE_PART_S = 6 * 3600


def _evict(cache_dir: str, max_bytes: int | None, keep: str) -> None:
    """Drop least recently used entries until the cache fits ``max_bytes``."""
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
    for _, p, nbytes in sorted(entries):
        if total <= max_bytes:
            break
        if p == keep:
            continue
        with _locked(os.path.join(cache_dir, "." + os.path.basename(p) + ".lock"),
                     blocking=False) as got:
            if not got:  # being filled by another process
                continue
            gone = os.path.join(cache_dir, ".evict-" + os.path.basename(p))
            with contextlib.suppress(OSError):
                os.replace(p, gone)  # disappears atomically, then is deleted
                shutil.rmtree(gone) if os.path.isdir(gone) else os.unlink(gone)
                total -= nbytes


def fetch_to_cache(url: str, cache_dir: str, max_bytes: int | None = None,
                   storage_options: StorageOptions = None, *,
                   retry: RetryPolicy = DEFAULT_RETRY) -> str:
    """A local copy of ``url`` in ``cache_dir``; returns its path.

    ``url`` is a dataset prefix (its ``manifest.json`` is read fresh each call;
    shards and indexes whose size matches are reused, others downloaded) or a
    single object. Entries are evicted least recently used first once the
    cache exceeds ``max_bytes``. Safe for concurrent processes: one fills an
    entry under a file lock, every file appears by atomic rename. Local
    ``url``: returned unchanged.
    """
    from .manifest import MANIFEST_NAME, Manifest, atomic_write

    if not is_remote(url):
        return local_path(url)
    os.makedirs(cache_dir, exist_ok=True)
    url = url.rstrip("/")
    digest = hashlib.sha256(url.encode()).hexdigest()[:20]
    entry = os.path.join(cache_dir, f"{digest}-{url.rsplit('/', 1)[-1] or 'root'}")
    try:
        text = read_bytes(join(url, MANIFEST_NAME), storage_options=storage_options,
                          retry=retry)
    except ShardNotFoundError:
        text = None
    with _locked(os.path.join(cache_dir, "." + os.path.basename(entry) + ".lock")):
        if text is None:  # a single object
            remote_size = size(url, storage_options=storage_options, retry=retry)
            if not (os.path.isfile(entry) and os.path.getsize(entry) == remote_size):
                _download(url, entry, storage_options, retry, remote_size)
        else:
            manifest = Manifest.from_json(text.decode("utf-8"), where=join(url, MANIFEST_NAME))
            os.makedirs(entry, exist_ok=True)
            old = os.path.join(entry, MANIFEST_NAME)
            if os.path.exists(old):
                with open(old, "rb") as f:
                    if f.read() != text:
                        os.unlink(old)  # no stale manifest over changing shards
            wanted = {}
            for s in manifest.shards:
                wanted[s.name], wanted[s.index] = s.bytes, s.index_bytes
            for name, nbytes in wanted.items():
                dest = os.path.join(entry, name)
                if not (os.path.isfile(dest) and os.path.getsize(dest) == nbytes):
                    _download(join(url, name), dest, storage_options, retry, nbytes)
            for name in os.listdir(entry):
                if name not in wanted and name != MANIFEST_NAME:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(entry, name))
            atomic_write(os.path.join(entry, MANIFEST_NAME), text)  # last, as on upload
        os.utime(entry)
    _evict(cache_dir, max_bytes, keep=entry)
    return entry
