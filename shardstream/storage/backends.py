"""Filesystem objects for URLs: fsspec filesystems, shared sessions, fork safety.

:func:`get_fs` returns one filesystem per (protocol, options) and process, rebuilt
after a fork; :func:`read_fs` picks the fastest reader for a URL (the built-in S3
reader, a bounded HTTP reader, or fsspec).
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from shardstream.errors import ManifestError, StorageError
from shardstream.storage import engine, objstore
from shardstream.storage.retry import DEFAULT_RETRY
from shardstream.storage.urls import is_pipe, url_protocol

__all__ = ["get_fs", "info_size", "read_fs", "BoundedHTTP", "ObjectFS", "server_size",
           "too_long", "check_content_range"]


#: a body is read in steps of this many bytes; buffers grow as bytes arrive
_READ_STEP = 1 << 18
StorageOptions = dict[str, Any] | None


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


def info_size(value: object, *, url: str, what: str) -> int:
    """A byte count from a manifest: a non-negative int (bools and strings refused)."""
    if type(value) is not int or not 0 <= value < 1 << 56:
        raise ManifestError(f"{url}: the manifest gives {what} a size of {value!r}, not a byte "
                            "count; the manifest is damaged: rewrite the dataset")
    return value


def server_size(value: object, url: str) -> int:
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
    protocol = url_protocol(url) or "file"
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


def read_fs(url: str, storage_options: StorageOptions, timeout: float | None
            ) -> tuple[Any, str]:
    """The filesystem for reads: :class:`ObjectFS` (obstore, through
    :mod:`shardstream.storage.engine`) for the object stores and HTTP it handles, else
    :func:`get_fs` (fsspec: any other protocol, and HTTP URLs with a query)."""
    if objstore.handles(os.fspath(url)):
        return ObjectFS(storage_options, timeout), os.fspath(url)
    fs, path = get_fs(url, storage_options, timeout=timeout)
    if url_protocol(os.fspath(url)) in ("http", "https") and BoundedHTTP.fits(fs):
        return BoundedHTTP(fs), path
    return fs, path


class ObjectFS:
    """Reads through :func:`shardstream.storage.engine.request` with the filesystem
    calls the readers make (``cat_file``, ``size``); paths are whole URLs."""

    def __init__(self, storage_options: StorageOptions, timeout: float | None) -> None:
        self.options = dict(storage_options or {})
        self.timeout = timeout

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 max_bytes: int | None = None) -> bytes:
        return engine.request("get", path, self.options, start=start, end=end,
                              max_bytes=max_bytes, timeout=self.timeout)

    def size(self, path: str) -> int:
        return engine.request("size", path, self.options, timeout=self.timeout)

    def read_into(self, path: str, fd: int, start: int, end: int) -> int:
        """Bytes ``[start, end)`` written into ``fd`` at the same offsets, as they arrive
        (from a forked worker the engine writes them); returns the count. On a broken
        body the error's ``written`` says how many landed."""
        return engine.request("read_into", path, self.options, fd=fd, start=start, end=end,
                              timeout=self.timeout)


class BoundedHTTP:
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
                raise too_long(url, bound, claimed, "asked for" if ranged else "expected")
            if ranged and r.status == 206 and (start or 0) >= 0:
                check_content_range(url, r.headers.get("Content-Range"), start or 0, claimed)
            parts, got = [], 0
            while True:
                chunk = await r.content.read(_READ_STEP)
                if not chunk:
                    return b"".join(parts)  # one copy, as aiohttp's own read() makes
                parts.append(chunk)
                got += len(chunk)
                if bound is not None and got > bound:
                    raise too_long(url, bound, f"at least {got}",
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


_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def too_long(url: str, expected: int, claimed: int | str, what: str) -> StorageError:
    return StorageError(f"{url}: the server sent (or announced) {claimed} bytes where "
                        f"{expected} were {what}; refusing to read past that. Check that the "
                        "URL points at the object meant and the server answers Range requests")


def check_content_range(url: str, header: str | None, lo: int, length: int | None) -> None:
    """A 206's Content-Range must start at ``lo`` and agree with Content-Length."""
    if header is None:
        return
    m = _CONTENT_RANGE.match(header)
    if m is None:
        raise StorageError(f"{url}: unreadable Content-Range {header!r} in a ranged answer")
    first, last = int(m.group(1)), int(m.group(2))
    if first != lo or last < first or (length is not None and last - first + 1 != length):
        raise StorageError(f"{url}: asked for bytes from {lo}, the server answered bytes "
                           f"{first}-{last} (Content-Range {header!r}, Content-Length "
                           f"{length}); refusing bytes from the wrong place")
