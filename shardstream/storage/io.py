"""Reads, sizes, listing and uploads for any URL (``s3://``, ``gs://``, ``http(s)://``,
``file://``) or local path, with retries; and :func:`load_manifest`.

Every function takes a URL (or a local path) plus ``storage_options`` and a
:class:`~shardstream.storage.retry.RetryPolicy`. ``s3:// gs:// az:// abfs://
http(s)://`` go through obstore (:mod:`shardstream.storage.objstore`, called via
:mod:`shardstream.storage.engine`: in this process, or in the node's engine from a
forked worker); its credential providers find what the options do not give
(environment: ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_ACCOUNT_NAME`` ...; instance metadata; web identity). Any other
protocol goes through fsspec with the options as its filesystem's arguments.

Errors leave as :class:`StorageError` (``.url``, ``.kind`` = ``"auth"``,
``"transient"``, ``"fatal"``; ``.tries``) or, for a missing object,
:class:`ShardNotFoundError`. Authentication errors are never retried.

Reading: :func:`read_bytes` (one range request); streams are in
:mod:`shardstream.storage.streams`.

Servers are not trusted with sizes or names: a ranged answer longer than the
range is refused before its body is read, a whole-object read is bounded by
the size known for it (``max_bytes``; a manifest by :data:`MANIFEST_LIMIT`)
and bodies are read into buffers that grow only as bytes arrive. A name from
a remote manifest becomes a local path only if it is a plain file name that
resolves inside its cache entry (:mod:`shardstream.storage.urls`); the node
cache's locks are in :mod:`shardstream.storage.locks`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from shardstream.errors import ManifestError, ShardNotFoundError, StorageError
from shardstream.format.manifest import MANIFEST_NAME, Manifest
from shardstream.storage import engine, objstore, urls
from shardstream.storage.backends import (BoundedHTTP, ObjectFS, StorageOptions, get_fs, read_fs,
                                          server_size, too_long)
from shardstream.storage.files import atomic_write, storage_error
from shardstream.storage.retry import DEFAULT_RETRY, RetryPolicy, classify
from shardstream.storage.urls import is_remote, local_path

__all__ = ["load_manifest", "DEFAULT_CHUNK_SIZE", "read_bytes", "size", "exists",
           "list_prefix", "put_file", "put_bytes", "remove", "MANIFEST_LIMIT", "call",
           "fetch_range", "raw_size"]


def load_manifest(directory: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read ``<directory>/manifest.json``; ``directory`` may be a URL (s3://, gs://, http://)."""
    if urls.is_remote(directory):
        url = urls.join(directory, MANIFEST_NAME)
        try:
            data = read_bytes(url, storage_options=storage_options,
                                      max_bytes=MANIFEST_LIMIT)
        except FileNotFoundError:
            raise ManifestError(f"{url} does not exist: {directory} is not a (finished) "
                                "shardstream dataset") from None
        return Manifest.from_json(data, where=url)
    directory = urls.local_path(directory)
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read(MANIFEST_LIMIT + 1)
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist: {directory} is not a (finished) "
                            "shardstream dataset") from None
    except OSError as exc:
        raise storage_error("read", path, exc) from exc
    if len(data) > MANIFEST_LIMIT:
        raise ManifestError(f"{path}: larger than {MANIFEST_LIMIT >> 20} MiB, more than "
                            "any manifest shardstream writes; the file is damaged or not a "
                            "manifest")
    return Manifest.from_json(data, where=path)


log = logging.getLogger("shardstream.storage")

DEFAULT_CHUNK_SIZE = 8 * 2**20
#: the largest ``manifest.json`` read from storage (~300 bytes a shard: ~800,000 shards)
MANIFEST_LIMIT = 256 << 20


# ---------------------------------------------------------------- errors + retries
def _fail(url: str, action: str) -> Callable[[BaseException, int], Exception]:
    def describe(exc: BaseException, tries: int) -> Exception:
        if isinstance(exc, ShardNotFoundError):
            return exc  # names the object already
        if isinstance(exc, StorageError) and exc.url == url and exc.kind != "transient":
            exc.tries = tries  # objstore's: says what and where already
            return exc
        kind = classify(exc)
        last = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if kind == "missing":
            return ShardNotFoundError(f"{url} does not exist ({last})")
        if kind == "auth":
            message = (f"cannot {action} {url}: access denied ({last}); not retried. Check "
                       "the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws, "
                       "GOOGLE_APPLICATION_CREDENTIALS, or storage_options) and the bucket's "
                       "permissions")
        elif kind == "transient":
            message = f"cannot {action} {url}: gave up after {tries} tries; last error: {last}"
        else:
            message = f"cannot {action} {url}: {last}"
        return StorageError(message, url=url, kind=kind, tries=tries)
    return describe


def _log_retry(url: str, action: str) -> Callable[[BaseException, int, float], None]:
    def note(exc: BaseException, retry: int, wait: float) -> None:
        log.info("%s %s: %s: %s; retry %d in %.2f s", action, url, type(exc).__name__, exc,
                 retry + 1, wait)
    return note


def call(url: str, action: str, fn: Callable[[], Any], retry: RetryPolicy,
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
    fs, path = read_fs(url, storage_options, timeout=retry.timeout)
    want = None if start is None or end is None else end - start
    bound = want if want is not None else max_bytes if start is None and end is None else None
    bounded = isinstance(fs, (BoundedHTTP, ObjectFS))

    def fetch() -> bytes:
        if bounded and bound is not None and want is None:
            data = fs.cat_file(path, start=start, end=end, max_bytes=bound)
        else:
            data = fs.cat_file(path, start=start, end=end)
        if want is not None and len(data) > want:
            raise StorageError(f"{url}: the server ignored the Range header "
                               f"(asked {want} bytes, got {len(data)})")
        if bound is not None and len(data) > bound:
            raise too_long(url, bound, len(data), "expected")
        return bytes(data) if isinstance(data, bytearray) else data
    if want == 0:
        return b""
    return call(url, "read", fetch, retry)


def size(url: str, *, storage_options: StorageOptions = None,
         retry: RetryPolicy = DEFAULT_RETRY) -> int:
    """Size of the object in bytes."""
    fs, path = read_fs(url, storage_options, timeout=retry.timeout)
    return server_size(call(url, "stat", lambda: fs.size(path), retry), url)


def fetch_range(fs: Any, path: str, url: str, start: int, end: int, retry: RetryPolicy,
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
            partial = getattr(exc, "partial", None)  # a broken body's bytes (objstore.get)
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
    call(url, "read", attempt, retry, on_retry)
    return parts[0] if len(parts) == 1 else b"".join(parts)  # bytes or bytearray


def raw_size(fs: Any, path: str, url: str, retry: RetryPolicy) -> int:
    return server_size(call(url, "stat", lambda: fs.size(path), retry), url)


# ---------------------------------------------------------------- listing, writing
def exists(url: str, *, storage_options: StorageOptions = None,
           retry: RetryPolicy = DEFAULT_RETRY) -> bool:
    """Whether the object (or prefix) exists; listing caches are bypassed."""
    if objstore.handles(url):
        return bool(call(url, "check", lambda: engine.request(
            "exists", url, storage_options, timeout=retry.timeout), retry))
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)
    fs.invalidate_cache(path)
    return bool(call(url, "check", lambda: fs.exists(path), retry))


def list_prefix(url: str, *, storage_options: StorageOptions = None,
                retry: RetryPolicy = DEFAULT_RETRY) -> list[str]:
    """Sorted names of the objects directly under ``url`` (``[]`` if there are none)."""
    if objstore.handles(url):
        found = call(url, "list", lambda: engine.request(
            "list_prefix", url, storage_options, timeout=retry.timeout), retry)
        return sorted(u.rstrip("/").rsplit("/", 1)[-1] for u in found)
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
    return sorted(call(url, "list", ls, retry))


def put_file(local: str | os.PathLike, url: str, *, storage_options: StorageOptions = None,
             retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Upload a local file whole (object stores: multipart above 16 MiB)."""
    local = os.fspath(local)
    if objstore.handles(url):
        call(url, "upload to", lambda: engine.request(
            "put_file", url, storage_options, local=local, timeout=retry.timeout), retry)
        return
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)
    if not is_remote(url):
        fs.makedirs(fs._parent(path), exist_ok=True)
    call(url, "upload to", lambda: fs.put_file(local, path), retry)


def put_bytes(data: bytes, url: str, *, storage_options: StorageOptions = None,
              retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Write ``data`` as one object (a single PUT: atomic on object stores)."""
    if not is_remote(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, data)
        return
    if objstore.handles(url):
        call(url, "upload to", lambda: engine.request(
            "put_bytes", url, storage_options, data=bytes(data), timeout=retry.timeout), retry)
        return
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)
    call(url, "upload to", lambda: fs.pipe_file(path, data), retry)


def remove(url: str, *, missing_ok: bool = True, storage_options: StorageOptions = None,
           retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Delete one object."""
    if objstore.handles(url):
        call(url, "delete", lambda: engine.request(
            "delete", url, storage_options, missing_ok=missing_ok, timeout=retry.timeout),
            retry)
        return
    fs, path = get_fs(url, storage_options, timeout=retry.timeout)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
    call(url, "delete", rm, retry)
    fs.invalidate_cache(path)
