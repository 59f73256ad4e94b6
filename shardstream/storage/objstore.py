"""Object storage through obstore (S3, GCS, Azure, HTTP): the one module importing it,
lazily (``import shardstream`` and local use never load it).

Each function makes ONE attempt; the caller's RetryPolicy retries (obstore's retries
are off: nothing is retried twice over). Errors are sorted for
:func:`~shardstream.storage.retry.classify`, the obstore exception chained as cause:
missing object or bucket: ShardNotFoundError; 401/403: StorageError ``kind="auth"``
(with ``status``); 5xx but 501/505, 408, 429, refused or reset connections, dropped
bodies, timeouts: ``kind="transient"`` (``status`` or ``errno``); anything else
``kind="fatal"``. Stores are cached per process and dropped in a forked child; a child
forked after the parent made requests gets a StorageError (obstore would hang there).
"""

from __future__ import annotations

import errno as errnos
import os
import pathlib
import re
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator
from urllib.parse import quote

from shardstream.errors import ShardNotFoundError, ShardstreamError, StorageError
from shardstream.storage.files import storage_error
from shardstream.storage.objstore_config import (KINDS, SCHEMES, StoreSpec, accepted_keys,
                                                 env_stamp, freeze, handles, location, store_spec,
                                                 translate)
from shardstream.storage.retry import DEFAULT_RETRY

__all__ = ["SCHEMES", "handles", "usable", "store_for", "get", "size", "exists", "list_prefix",
           "put_bytes", "put_file", "delete", "read_into", "translate", "READ_CHUNK",
           "MULTIPART_THRESHOLD", "PART_SIZE", "PART_CONCURRENCY"]

Options = dict[str, Any] | None
#: default seconds of silence (connect, or between body reads) before a request fails
TIMEOUT = DEFAULT_RETRY.timeout
#: bodies arrive in pieces of at least this many bytes (the last may be shorter)
READ_CHUNK = 1 << 20
#: put_file: files above this size go up as multipart uploads of PART_SIZE parts
MULTIPART_THRESHOLD = 16 << 20
PART_SIZE = 8 << 20
PART_CONCURRENCY = 8

_stores: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()
_used_by: list[int | None] = [None]  # the pid that made requests through obstore
_forked_from: list[int | None] = [None]  # set in a child forked after such requests


_inherited: list[dict[tuple[Any, ...], Any]] = []  # a parent's stores, never dropped here


def _after_fork_in_child() -> None:
    global _lock, _stores
    _lock = threading.Lock()  # a parent's thread may have held it
    # the parent's stores hold its connection pools and runtime: not ours to use, and
    # dropping them runs their destructors, which wait for the parent's threads forever
    _inherited.append(_stores)
    _stores = {}
    if _used_by[0] is not None:
        _forked_from[0] = _used_by[0]
    _used_by[0] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------- stores
def usable() -> bool:
    """May this process call obstore? Not in a child forked after its parent made
    requests (obstore would hang there): such a process asks the node's engine
    (:mod:`shardstream.storage.engine`)."""
    return _forked_from[0] is None


def store_for(url: str, storage_options: Options = None, *,
              timeout: float | None = TIMEOUT) -> tuple[Any, str]:
    """The obstore store for ``url`` (cached per process, key: scheme, bucket /
    container / host, options, timeout and the provider environment) and the object
    path in it. Unknown ``storage_options`` keys: ValueError listing the accepted ones."""
    if _forked_from[0] is not None:
        raise StorageError(
            f"cannot reach {url}: this process was forked from process {_forked_from[0]} "
            "after that one made requests through obstore, which then hangs in the child. "
            "Start worker processes with the 'spawn' or 'forkserver' method (DataLoader("
            "multiprocessing_context='spawn')), or make no remote request before forking",
            url=url, kind="fatal")
    kind, root, path, account = location(url)
    key = (kind, root, account, freeze(storage_options or {}), timeout, env_stamp(kind))
    store = _stores.get(key)
    if store is None:
        spec, _ = store_spec(url, storage_options, timeout)
        store = _build(spec, url)
        with _lock:
            store = _stores.setdefault(key, store)
    return store, path


def _build(spec: StoreSpec, url: str) -> Any:
    try:
        import obstore.store as ob
    except ImportError as exc:
        raise StorageError(f"{url}: object storage needs obstore, which is not installed: "
                           "pip install 'shardstream[cloud]'", url=url, kind="fatal") from exc
    from obstore.exceptions import UnknownConfigurationKeyError

    kw: dict[str, Any] = {"client_options": spec.client_options,
                          "retry_config": spec.retry_config}
    try:
        if spec.kind == "http":
            return ob.HTTPStore(spec.root, **kw)
        if spec.kind == "s3":
            return ob.S3Store(spec.root, config=spec.config,
                              credential_provider=spec.credential_provider, **kw)
        cls = ob.GCSStore if spec.kind == "gcs" else ob.AzureStore
        return cls(spec.root, config=spec.config, **kw)
    except UnknownConfigurationKeyError as exc:
        m = re.search(r"key: '([^']*)'", str(exc))
        name = m.group(1) if m else str(exc).split("\n", 1)[0]
        raise ValueError(f"storage_options key {name!r} is not known for "
                         f"{url.partition('://')[0]}:// URLs ({url}); accepted: "
                         f"{accepted_keys(spec.kind)}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. an unreadable service-account file
        err = translate(exc, url, "configure access to")
        if err is exc:
            raise
        raise err from exc


# ---------------------------------------------------------------- errors
@contextmanager
def _errors(url: str, action: str) -> Iterator[None]:
    _used_by[0] = os.getpid()
    try:
        yield
    except ShardstreamError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated
        err = translate(exc, url, action)
        if err is exc:
            raise
        raise err from exc


def _chunks(result: Any, url: str, piece: int) -> Iterator[bytes]:
    """The body of ``result`` in pieces; errors translated (local errors stay outside)."""
    stream = iter(result.stream(piece))
    while True:
        with _errors(url, "read"):
            chunk = next(stream, None)
        if chunk is None:
            return
        yield chunk


def _too_long(url: str, expected: int, got: int, what: str) -> StorageError:
    return StorageError(f"{url}: the server sent (or announced) {got} bytes where {expected} "
                        f"were {what}; refusing to read past that. Check that the URL points at "
                        "the object meant and that the size given for it is right", url=url,
                        kind="fatal")


def _short(url: str, at: int, end: int) -> StorageError:
    return StorageError(f"{url}: the body ended at byte {at}, before {end}; resume from {at}",
                        errno=errnos.ECONNRESET, url=url, kind="transient")


def _check_range(url: str, want: tuple[int, int], got: Any, total: int) -> None:
    got = tuple(got)
    if got == want:
        return
    if got[0] == want[0] and got[1] == total < want[1]:
        why = (f"the object is only {total} bytes; the object changed or the size given for "
               "it (the manifest) is wrong")
    else:
        why = "refusing bytes from the wrong place"
    raise StorageError(f"{url}: asked for bytes [{want[0]}, {want[1]}), the server answered "
                       f"[{got[0]}, {got[1]}): {why}", url=url, kind="fatal")


# ---------------------------------------------------------------- operations
def get(url: str, storage_options: Options = None, *, start: int | None = None,
        end: int | None = None, max_bytes: int | None = None,
        timeout: float | None = TIMEOUT) -> bytes:
    """Bytes ``[start, end)`` of the object (the whole of it without either).

    A whole object larger than ``max_bytes`` is refused from its announced size,
    before the body is read; a body longer than announced stops being read at the
    bound. A range answered with other bytes than asked is a StorageError.
    """
    import obstore

    lo = start or 0
    if lo < 0 or (end is not None and end < lo):
        raise ValueError(f"{url}: bad byte range [{start}, {end})")
    ranged = start is not None or end is not None
    if ranged and end == lo:
        return b""
    store, path = store_for(url, storage_options, timeout=timeout)
    options = {"range": (lo, end) if end is not None else {"offset": lo}} if ranged else None
    with _errors(url, "read"):
        result = obstore.get(store, path, options=options)
        total = int(result.meta["size"])
        answered = result.range
    if ranged:
        stop = end if end is not None else total
        _check_range(url, (lo, stop), answered, total)
        bound, what = stop - lo, "asked for"
    else:
        if max_bytes is not None and total > max_bytes:
            raise StorageError(f"{url}: the object is {total} bytes, more than the {max_bytes} "
                               "expected (max_bytes); not read. Check that the URL points at "
                               "the object meant", url=url, kind="fatal")
        bound, what = total, "announced"
    parts: list[bytes] = []
    got = 0
    try:
        for chunk in _chunks(result, url, READ_CHUNK):
            got += len(chunk)
            if got > bound:
                raise _too_long(url, bound, got, what)
            parts.append(chunk)
        if got < bound:
            raise _short(url, lo + got, lo + bound)
    except (StorageError, ShardNotFoundError) as exc:
        if ranged and getattr(exc, "kind", None) == "transient":  # a broken body: what
            exc.partial = b"".join(parts)  # type: ignore[attr-defined]  # came counts
        raise
    return parts[0] if len(parts) == 1 else b"".join(parts)


def size(url: str, storage_options: Options = None, *,
         timeout: float | None = TIMEOUT) -> int:
    """The object's size in bytes (one HEAD request)."""
    import obstore

    store, path = store_for(url, storage_options, timeout=timeout)
    with _errors(url, "stat"):
        return int(obstore.head(store, path)["size"])


def exists(url: str, storage_options: Options = None, *,
           timeout: float | None = TIMEOUT) -> bool:
    """Whether ``url`` is an object or (not for http) a prefix with objects under it."""
    import obstore

    try:
        size(url, storage_options, timeout=timeout)
        return True
    except ShardNotFoundError:
        if KINDS[url.partition("://")[0].lower()] == "http":
            return False
    store, path = store_for(url, storage_options, timeout=timeout)
    try:
        with _errors(url, "check"):
            found = obstore.list_with_delimiter(store, path.strip("/") or None)
    except ShardNotFoundError:  # no such bucket
        return False
    return bool(found["objects"] or found["common_prefixes"])


def list_prefix(url: str, storage_options: Options = None, *,
                timeout: float | None = TIMEOUT) -> list[str]:
    """Sorted full URLs of the objects directly under ``url`` (``[]`` if none; a
    missing bucket is a ShardNotFoundError). http(s) needs a WebDAV server."""
    import obstore

    store, path = store_for(url, storage_options, timeout=timeout)
    with _errors(url, "list"):
        found = obstore.list_with_delimiter(store, path.strip("/") or None)
    here = path.strip("/")  # a store's marker for the "directory" itself is no object
    found = {"objects": [o for o in found["objects"] if o["path"].rstrip("/") != here
                         and not o["path"].endswith("/")]}
    scheme, _, rest = url.partition("://")
    if KINDS[scheme.lower()] == "http":
        base = location(url)[1]
        return sorted(f"{base}/{quote(o['path'])}" for o in found["objects"])
    return sorted(f"{scheme}://{rest.partition('/')[0]}/{o['path']}" for o in found["objects"])


def put_bytes(data: bytes | bytearray | memoryview, url: str, storage_options: Options = None,
              *, timeout: float | None = TIMEOUT) -> None:
    """Write ``data`` as one object in a single PUT (atomic on object stores)."""
    import obstore

    store, path = store_for(url, storage_options, timeout=timeout)
    with _errors(url, "upload to"):
        obstore.put(store, path, data, use_multipart=False)


def put_file(local_path: str | os.PathLike, url: str, storage_options: Options = None, *,
             part_size: int = PART_SIZE, max_concurrency: int = PART_CONCURRENCY,
             timeout: float | None = TIMEOUT) -> None:
    """Upload a local file: one PUT up to :data:`MULTIPART_THRESHOLD` bytes, else a
    multipart upload of ``part_size`` parts, ``max_concurrency`` at a time (obstore
    reads the file itself). A failed upload leaves no object; it is redone whole."""
    import obstore

    local = os.fspath(local_path)
    try:
        nbytes = os.path.getsize(local)
    except OSError as exc:
        raise storage_error("upload", local, exc) from exc
    store, path = store_for(url, storage_options, timeout=timeout)
    multipart = nbytes > MULTIPART_THRESHOLD and KINDS[url.partition("://")[0].lower()] != "http"
    with _errors(url, "upload to"):
        obstore.put(store, path, pathlib.Path(local), use_multipart=multipart,
                    chunk_size=max(5 << 20, part_size), max_concurrency=max(1, max_concurrency))


def delete(url: str, storage_options: Options = None, missing_ok: bool = True, *,
           timeout: float | None = TIMEOUT) -> None:
    """Delete one object. ``missing_ok=False``: a ShardNotFoundError if it is absent
    (checked with a HEAD first: S3 answers a DELETE of a missing key with success)."""
    import obstore

    if not missing_ok:
        size(url, storage_options, timeout=timeout)
    store, path = store_for(url, storage_options, timeout=timeout)
    try:
        with _errors(url, "delete"):
            obstore.delete(store, path)
    except ShardNotFoundError:
        if not missing_ok:
            raise


def read_into(url: str, storage_options: Options, fd: int, start: int, end: int, *,
              on_bytes: Callable[[int], None] | None = None, file_offset: int | None = None,
              chunk_size: int = READ_CHUNK, timeout: float | None = TIMEOUT) -> int:
    """Stream bytes ``[start, end)`` of ``url`` into ``fd`` with ``os.pwrite``, byte
    ``start`` at file offset ``file_offset`` (default ``start``); returns the bytes
    written (``end - start``).

    Each piece is written as it arrives and reported to ``on_bytes(n)``. When the
    body breaks, what was reported (also the error's ``written`` attribute) is in
    the file: resume with ``start + written``. Nothing is written past ``end``: a
    longer answer is a StorageError.
    """
    import obstore

    if start < 0 or end < start:
        raise ValueError(f"{url}: bad byte range [{start}, {end})")
    want = end - start
    at = start if file_offset is None else file_offset
    written = 0
    if want == 0:
        return 0
    store, path = store_for(url, storage_options, timeout=timeout)
    try:
        with _errors(url, "read"):
            result = obstore.get(store, path, options={"range": (start, end)})
            _check_range(url, (start, end), result.range, int(result.meta["size"]))
        for chunk in _chunks(result, url, max(1, chunk_size)):
            if written + len(chunk) > want:
                raise _too_long(url, want, written + len(chunk), "asked for")
            view = memoryview(chunk)
            try:
                while view:
                    n = os.pwrite(fd, view, at + written)
                    view, written = view[n:], written + n
            except OSError as exc:
                raise storage_error(f"write the download of {url} to", f"fd {fd}", exc,
                                    "free space or use another cache directory") from exc
            if on_bytes is not None:
                on_bytes(len(chunk))
        if written < want:
            raise _short(url, start + written, end)
    except (StorageError, ShardNotFoundError) as exc:
        exc.written = written  # type: ignore[attr-defined]
        raise
    return written
