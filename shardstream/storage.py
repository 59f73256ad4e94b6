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

Servers are not trusted with sizes or names: a ranged answer longer than the
range is refused before its body is read, a whole-object read is bounded by
the size known for it (``max_bytes``; a manifest by :data:`MANIFEST_LIMIT`)
and bodies are read into buffers that grow only as bytes arrive. A name from
a remote manifest becomes a local path only if it is a plain file name that
resolves inside its cache entry (:func:`check_name`, :func:`inside`). Readers
hold a shared ``flock`` on the cache entries they use (:func:`hold`), and
eviction skips any entry it cannot lock exclusively at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Iterator

from .errors import ManifestError, ShardNotFoundError, StorageError
from .retry import DEFAULT_RETRY, RetryPolicy, classify
from .s3read import S3Reader, _check_content_range, _too_long

__all__ = ["RetryPolicy", "DEFAULT_RETRY", "DEFAULT_CHUNK_SIZE", "is_remote", "is_pipe",
           "join", "local_path", "get_fs", "read_bytes", "open_stream", "ResumableStream",
           "size", "exists", "list_prefix", "put_file", "put_bytes", "remove",
           "fetch_to_cache", "fetch_and_hold", "hold", "CacheHold", "check_name", "inside",
           "MANIFEST_LIMIT"]

log = logging.getLogger("shardstream.storage")

DEFAULT_CHUNK_SIZE = 8 * 2**20
#: the largest ``manifest.json`` read from storage (~300 bytes a shard: ~800,000 shards)
MANIFEST_LIMIT = 256 << 20
#: a body is read in steps of this many bytes; buffers grow as bytes arrive
_READ_STEP = 1 << 18
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


# ---------------------------------------------------------------- names and sizes from servers
def check_name(name: object, *, url: str, entry: str) -> str:
    """``name`` (a file name from a remote manifest) if it is a plain file name.

    Anything else (empty, ``.``/``..``, a separator, absolute, a NUL byte) is a
    :class:`ManifestError` naming ``url`` and the cache ``entry`` it would escape.
    """
    if not isinstance(name, str) or not name:
        why = "is not a non-empty string"
    elif "\x00" in name:
        why = "holds a NUL byte"
    elif name in (".", ".."):
        why = "names a directory"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name) or \
            os.path.isabs(name):
        why = "holds a path separator"
    else:
        return name
    raise ManifestError(f"{url}: file name {name!r} in the manifest {why}; only plain file "
                        f"names are allowed (it would land outside the cache entry {entry}). "
                        "The manifest is damaged or not from a shardstream writer: rewrite "
                        "the dataset, or check where the URL points")


def inside(root: str, name: str, *, url: str) -> str:
    """``root/name``, checked to resolve (symlinks followed) strictly inside ``root``."""
    path = os.path.join(root, check_name(name, url=url, entry=root))
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.dirname(real) != real_root:
        raise StorageError(f"{url}: the cache path {path} resolves to {real}, outside the "
                           f"cache entry {root} (a symlink in the cache?); remove {path} "
                           "or use another cache_dir")
    return path


def _declared_size(value: object, *, url: str, what: str) -> int:
    """A byte count from a manifest: a non-negative int (bools and strings refused)."""
    if type(value) is not int or not 0 <= value < 1 << 56:
        raise ManifestError(f"{url}: the manifest gives {what} a size of {value!r}, not a byte "
                            "count; the manifest is damaged: rewrite the dataset")
    return value


def _server_size(value: object, url: str) -> int:
    """An object size a server reported (HEAD): a non-negative int, else StorageError."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if type(value) is not int or value < 0:
        raise StorageError(f"{url}: the server reported no usable size ({value!r}); it must "
                           "answer HEAD with a Content-Length (or pass the size, e.g. from "
                           "the manifest)")
    return value


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
    fs, path = get_fs(url, storage_options, timeout=timeout)
    if _protocol(os.fspath(url)) in ("http", "https") and _BoundedHTTP.fits(fs):
        return _BoundedHTTP(fs), path
    return fs, path


class _BoundedHTTP:
    """fsspec's HTTP filesystem for reads, with every body bounded by what was asked:
    an answer announcing more than the range (or ``max_bytes``) is refused before its
    body is read, and a body is read in steps, stopping once past the bound."""

    _NEEDS = ("loop", "kwargs", "set_session", "encode_url", "_process_limits",
              "_raise_not_found_for_status")

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    @classmethod
    def fits(cls, fs: Any) -> bool:
        return all(hasattr(fs, a) for a in cls._NEEDS)

    def size(self, path: str) -> Any:
        return self.fs.size(path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 max_bytes: int | None = None) -> bytes | bytearray:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self._cat, path, start, end, max_bytes)

    async def _cat(self, url: str, start: int | None, end: int | None,
                   max_bytes: int | None) -> bytes | bytearray:
        kw = self.fs.kwargs.copy()
        headers = dict(kw.pop("headers", None) or {})
        ranged = start is not None or end is not None
        want = end - (start or 0) if end is not None and (start or 0) >= 0 else None
        if ranged:
            if start == end:
                return b""
            headers["Range"] = await self.fs._process_limits(url, start, end)
        bound = want if ranged else max_bytes
        session = await self.fs.set_session()
        async with session.get(self.fs.encode_url(url), headers=headers, **kw) as r:
            self.fs._raise_not_found_for_status(r, url)
            if ranged and r.status == 200 and start:
                raise StorageError(f"{url}: the server ignored the Range header (answered 200 "
                                   "with the whole object); use a server that supports "
                                   "ranged GETs")
            claimed = r.content_length
            if bound is not None and claimed is not None and claimed > bound:
                raise _too_long(url, bound, claimed, "asked for" if ranged else "expected")
            if ranged and r.status == 206 and (start or 0) >= 0:
                _check_content_range(url, r.headers.get("Content-Range"), start or 0, claimed)
            parts, got = [], 0
            while True:
                chunk = await r.content.read(_READ_STEP)
                if not chunk:
                    return b"".join(parts)  # one copy, as aiohttp's own read() makes
                parts.append(chunk)
                got += len(chunk)
                if bound is not None and got > bound:
                    raise _too_long(url, bound, f"at least {got}",
                                    "asked for" if ranged else "expected")


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
               retry: RetryPolicy = DEFAULT_RETRY, max_bytes: int | None = None) -> bytes:
    """Bytes ``[start, end)`` of the object (all of it by default): one range request.

    ``max_bytes`` bounds a whole-object read (the size the manifest declares, or a
    cap): a larger object is a :class:`StorageError`, refused before its body is read
    where the server announces its length (S3 and HTTP).
    """
    fs, path = _read_fs(url, storage_options, timeout=retry.timeout)
    want = None if start is None or end is None else end - start
    bound = want if want is not None else max_bytes if start is None and end is None else None
    bounded = isinstance(fs, (_BoundedHTTP, S3Reader))

    def fetch() -> bytes:
        if bounded and bound is not None and want is None:
            data = fs.cat_file(path, start=start, end=end, max_bytes=bound)
        else:
            data = fs.cat_file(path, start=start, end=end)
        if want is not None and len(data) > want:
            raise StorageError(f"{url}: the server ignored the Range header "
                               f"(asked {want} bytes, got {len(data)})")
        if bound is not None and len(data) > bound:
            raise _too_long(url, bound, len(data), "expected")
        return bytes(data) if isinstance(data, bytearray) else data
    if want == 0:
        return b""
    return _call(url, "read", fetch, retry)


def size(url: str, *, storage_options: StorageOptions = None,
         retry: RetryPolicy = DEFAULT_RETRY) -> int:
    """Size of the object in bytes."""
    fs, path = _read_fs(url, storage_options, timeout=retry.timeout)
    return _server_size(_call(url, "stat", lambda: fs.size(path), retry), url)


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
    return _server_size(_call(url, "stat", lambda: fs.size(path), retry), url)


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
def _os_error(action: str, path: str, exc: OSError, fix: str = "check cache_dir") -> StorageError:
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}; {fix}",
                        errno=exc.errno)


@contextlib.contextmanager
def _locked(path: str, blocking: bool = True) -> Iterator[bool]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _os_error("create the lock file", path, exc) from exc
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


def _open_shared(path: str) -> int | None:
    """An fd on the entry ``path`` (file or directory) holding ``flock(LOCK_SH)``; None
    when it is gone (an eviction that renamed it away while we waited counts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _os_error("open the cached copy", path, exc) from exc
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
    fd = _open_shared(path) if cached else None
    return CacheHold(path, -1 if fd is None else fd, cached)


def hold(path: str) -> CacheHold:
    """Hold the cache entry ``path`` (what :func:`fetch_to_cache` returned) for reading.

    Raises :class:`StorageError` (see :func:`removed_error`) when it is gone already:
    prefer :func:`fetch_and_hold`, which takes the hold before any eviction can run.
    """
    fd = _open_shared(path)
    if fd is None:
        raise removed_error(path)
    return CacheHold(path, fd)


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


def _download(url: str, dest: str, storage_options: StorageOptions, retry: RetryPolicy,
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
        raise _os_error("create a download file in", where, exc) from exc
    try:
        if is_remote(url) and not is_pipe(url):
            try:
                fs, path = _read_fs(url, storage_options, timeout=retry.timeout)
                if size_hint is not None:
                    end = size_hint
                else:
                    end = _size(fs, path, url, retry)
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
            raise _os_error("write the download of", f"{url} to {dest}", exc,
                            "free space or check cache_dir") from exc
        raise


def _fetch_into(fd: int, fs: Any, path: str, url: str, end: int, retry: RetryPolicy,
                chunk_size: int, streams: int, tmp: str = "") -> None:
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
            try:
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
            except OSError as exc:
                raise _os_error("write", tmp or f"the download of {url}", exc,
                                "free space or use another cache_dir") from exc
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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


def _evict(cache_dir: str, max_bytes: int | None, keep: str) -> None:
    """Drop least recently used entries until the cache fits ``max_bytes``.

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
    for _, p, nbytes in sorted(entries):
        if total <= max_bytes:
            break
        if p == keep:
            continue
        with _locked(os.path.join(cache_dir, "." + os.path.basename(p) + ".lock"),
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


def _entry_path(url: str, cache_dir: str) -> str:
    """The cache entry of ``url``: its hash and a tame copy of its last component."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:20]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[-80:].lstrip(".")
    return inside(cache_dir, f"{digest}-{base or 'root'}", url=url)


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
        raise _os_error("create the cache directory", cache_dir, exc,
                        "pass a writable cache_dir") from exc
    url = url.rstrip("/")
    entry = _entry_path(url, cache_dir)
    from .manifest import MANIFEST_NAME

    try:
        text = read_bytes(join(url, MANIFEST_NAME), storage_options=storage_options,
                          retry=retry, max_bytes=MANIFEST_LIMIT)
    except ShardNotFoundError:
        text = None
    held = CacheHold(entry)
    with _locked(os.path.join(cache_dir, "." + os.path.basename(entry) + ".lock")):
        if text is None:  # a single object
            remote_size = size(url, storage_options=storage_options, retry=retry)
            if not (os.path.isfile(entry) and os.path.getsize(entry) == remote_size):
                _download(url, entry, storage_options, retry, remote_size)
        else:
            _fill_entry(url, entry, text, storage_options, retry)
        os.utime(entry)
        if take_hold:  # under the fill lock: no eviction can take the entry meanwhile
            fd = _open_shared(entry)
            if fd is None:
                raise removed_error(entry)
            held = CacheHold(entry, fd)
    _evict(cache_dir, max_bytes, keep=entry)
    return held


def _fill_entry(url: str, entry: str, text: bytes, storage_options: StorageOptions,
                retry: RetryPolicy) -> None:
    """Make the directory ``entry`` hold the dataset whose manifest is ``text``."""
    from .manifest import MANIFEST_NAME, Manifest, atomic_write

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
            wanted[name] = _declared_size(nbytes, url=where, what=repr(name))
    try:
        os.makedirs(entry, exist_ok=True)
    except OSError as exc:
        raise _os_error("create the cache entry", entry, exc) from exc
    old = inside(entry, MANIFEST_NAME, url=url)
    if os.path.exists(old):
        with open(old, "rb") as f:
            if f.read(len(text) + 1) != text:
                os.unlink(old)  # no stale manifest over changing shards
    for name, nbytes in wanted.items():
        dest = inside(entry, name, url=where)
        if not (os.path.isfile(dest) and os.path.getsize(dest) == nbytes):
            _download(join(url, name), dest, storage_options, retry, nbytes)
    for name in os.listdir(entry):
        if name not in wanted and name != MANIFEST_NAME:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(entry, name))
    atomic_write(old, text)  # last, as on upload
