"""Signed S3 GET and HEAD on the standard library: reads without s3fs or botocore.

Importing s3fs (aiobotocore, aiohttp, botocore) and building a botocore client
costs ~0.3-0.4 s per process before the first request; a reader only needs
GET with a Range and HEAD. :func:`reader` returns an object with the two
calls :mod:`shardstream.storage` makes for reads (``cat_file``, ``size``),
or None when the request cannot be made simply and s3fs must do it:

- ``storage_options`` holding anything besides ``key``, ``secret``,
  ``token``, ``anon``, ``endpoint_url``, ``profile``, ``use_ssl`` and
  ``client_kwargs`` with ``endpoint_url``/``region_name``/``aws_*`` keys;
- credentials from anywhere but ``storage_options``, the environment
  (``AWS_ACCESS_KEY_ID``...) or a plain profile in ``~/.aws/credentials`` /
  ``~/.aws/config`` (instance roles, SSO, assume-role, ``credential_process``:
  s3fs);
- FIPS/dual-stack endpoints, access-point ARNs, endpoints with a path;
- ``SHARDSTREAM_S3_LITE=0`` in the environment.

Requests are signed with AWS Signature Version 4 (``UNSIGNED-PAYLOAD``),
path-style against an ``endpoint_url`` (MinIO, SeaweedFS, Ceph...),
virtual-hosted style on AWS. Connections are kept alive and reused by any
thread of a process; a forked child never touches its parent's sockets.
Errors come out as exceptions :func:`shardstream.storage.retry.classify` sorts
(an HTTP error carries a botocore-style ``response``); a body that breaks
mid-way raises :class:`http.client.IncompleteRead` whose ``partial`` holds
the bytes that did arrive, so the caller resumes at the next byte.

Sizes a server claims are checked, never trusted: a ranged answer whose
Content-Length exceeds the range, or whose Content-Range names other bytes,
is refused before its body is read; a whole-object GET is bounded by
``max_bytes`` when the caller knows the size; bodies are read in steps into a
buffer that grows only as bytes arrive (a lying header costs nothing); HEAD
must answer a plain non-negative Content-Length.
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import http.client
import os
import re
import threading
import time
from typing import Any
from urllib.parse import quote

from shardstream.errors import StorageError
from shardstream.storage.s3config import (ENV_VARS, Credentials, S3Config, config_files, configure,
                                          files_stamp)

__all__ = ["S3Reader", "reader", "sign_v4", "UNSIGNED_PAYLOAD", "check_content_range",
           "too_long"]


UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_READ_STEP = 1 << 18  # a body is read in steps: a broken connection loses at most this
#: a ranged body (the caller planned for that many bytes) up to this size gets its
#: buffer at once (download chunks: 8 MiB); any other starts at ``_READ_STEP`` bytes
#: and doubles only as bytes arrive
_PREALLOC = 16 << 20
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


# ---------------------------------------------------------------- signing
def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def canonical_uri(path: str) -> str:
    """``/bucket/a b/ü`` -> ``/bucket/a%20b/%C3%BC``: every byte but the unreserved
    characters and ``/`` percent-encoded, once (S3 does not double-encode)."""
    return quote(path, safe="/~")


def sign_v4(method: str, host: str, uri: str, headers: dict[str, str], creds: Credentials,
            region: str, amz_date: str, payload_hash: str = UNSIGNED_PAYLOAD,
            query: str = "", service: str = "s3") -> dict[str, str]:
    """``headers`` plus ``x-amz-date``, ``x-amz-content-sha256``, the session token
    and ``Authorization`` (AWS Signature Version 4). ``uri`` is already encoded."""
    out = {**headers, "host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash}
    if creds.token:
        out["x-amz-security-token"] = creds.token
    canon = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
    names = sorted(canon)
    signed = ";".join(names)
    request = "\n".join([method, uri, query, *(f"{k}:{canon[k]}" for k in names), "", signed,
                         payload_hash])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(request.encode()).hexdigest()])
    k = _hmac(("AWS4" + creds.secret).encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        k = _hmac(k, part)
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.key}/{scope}, "
                            f"SignedHeaders={signed}, Signature={signature}")
    return out


# ---------------------------------------------------------------- connections
# Idle keep-alive connections, shared by the threads of one process. A forked
# child starts with none: the parent's sockets stay the parent's.
_idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
_idle_lock = threading.Lock()
_ssl_context: list[Any] = [None]


def _after_fork_in_child() -> None:
    global _idle_lock
    _idle_lock = threading.Lock()
    _idle.clear()  # drops the child's copies of the fds; the parent's sockets stay open


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _connect(scheme: str, host: str, port: int, timeout: float | None,
             cafile: str | None) -> http.client.HTTPConnection:
    if scheme == "http":
        return http.client.HTTPConnection(host, port, timeout=timeout)
    if _ssl_context[0] is None or _ssl_context[0][0] != cafile:
        import ssl

        _ssl_context[0] = (cafile, ssl.create_default_context(cafile=cafile))
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=_ssl_context[0][1])


class S3Reader:
    """``cat_file`` and ``size`` for ``bucket/key`` paths (fsspec's calling convention)."""

    def __init__(self, config: S3Config, timeout: float | None) -> None:
        self.config, self.timeout = config, timeout
        self._regions: dict[str, str] = {}  # bucket -> region learnt from a redirect

    def _where(self, bucket: str, key: str) -> tuple[str, int, str, str]:
        """(host, port, signed Host header value, encoded path)."""
        c = self.config
        if c.endpoint is not None:
            host, port = c.endpoint
            default = 443 if c.scheme == "https" else 80
            return host, port, host if port == default else f"{host}:{port}", \
                canonical_uri(f"/{bucket}/{key}")
        region = self._regions.get(bucket, c.region)
        port = 443 if c.scheme == "https" else 80
        if "." in bucket or bucket.lower() != bucket:  # not a valid host name label: path style
            host = f"s3.{region}.amazonaws.com"
            return host, port, host, canonical_uri(f"/{bucket}/{key}")
        host = f"{bucket}.s3.{region}.amazonaws.com"
        return host, port, host, canonical_uri(f"/{key}")

    def _send(self, method: str, bucket: str, key: str, headers: dict[str, str]
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One request: a response whose status is 2xx, or an exception."""
        for redirect in range(2):
            host, port, host_header, uri = self._where(bucket, key)
            region = self._regions.get(bucket, self.config.region)
            if self.config.creds is None:
                hdrs = {**headers, "host": host_header}
            else:
                hdrs = sign_v4(method, host_header, uri, headers, self.config.creds, region,
                               time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
            conn, resp = self._exchange(method, (self.config.scheme, host, port), uri, hdrs)
            if 200 <= resp.status < 300:
                return conn, resp
            body = resp.read()
            self._release(conn, resp)
            moved = resp.getheader("x-amz-bucket-region")
            if (redirect == 0 and self.config.endpoint is None and moved and moved != region
                    and resp.status in (301, 307, 400)):
                self._regions[bucket] = moved  # the bucket lives elsewhere: ask there
                continue
            raise _http_error(method, f"s3://{bucket}/{key}", resp.status, body)
        raise AssertionError("unreachable")

    def _exchange(self, method: str, where: tuple[str, str, int], uri: str,
                  headers: dict[str, str]
                  ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        with _idle_lock:
            pool = _idle.get(where)
            conn = pool.pop() if pool else None
        for _ in range(2):
            reused = conn is not None
            if conn is None:
                conn = _connect(*where, self.timeout, self.config.cafile)
            try:
                conn.request(method, uri, headers=headers)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError):
                conn.close()
                if not reused:
                    raise
                conn = None  # an idle keep-alive connection the server had closed: once more
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    @staticmethod
    def _release(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Back to the pool if the response was read to its end and the connection stays."""
        if resp.isclosed() and not resp.will_close and conn.sock is not None:
            where = ("https" if isinstance(conn, http.client.HTTPSConnection) else "http",
                     conn.host, conn.port)
            with _idle_lock:
                pool = _idle.setdefault(where, [])
                if len(pool) < 16:
                    pool.append(conn)
                    return
        conn.close()

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 max_bytes: int | None = None) -> bytes | bytearray:
        """Bytes ``[start, end)`` of ``bucket/key`` (all of it by default) as a bytearray.

        Never more than asked: ``end - start`` for a range, ``max_bytes`` (when
        given) for the whole object; a longer answer is a :class:`StorageError`
        naming the URL, the size expected and the size claimed.
        """
        bucket, key = _split(path)
        url = f"s3://{bucket}/{key}"
        headers = {}
        lo = start or 0
        ranged = start is not None or end is not None
        if ranged:
            if end is not None and end <= lo:
                return b""
            headers["range"] = f"bytes={lo}-{'' if end is None else end - 1}"
        bound = (end - lo if end is not None else None) if ranged else max_bytes
        conn, resp = self._send("GET", bucket, key, headers)
        ok = False
        try:
            length = resp.length  # Content-Length; None when chunked
            if ranged and resp.status == 200 and (
                    lo > 0 or (length is not None and bound is not None and length != bound)):
                # a whole object where a part was asked for: never hand it on as that part
                raise StorageError(f"{url}: the server ignored the Range header "
                                   "(answered 200 with the whole object); use an "
                                   "S3-compatible server that supports ranged GETs")
            if length is not None and bound is not None and length > bound:
                raise too_long(url, bound, length, "asked for" if ranged else "expected")
            if ranged and resp.status == 206:
                check_content_range(url, resp.getheader("content-range"), lo, length)
            buf = _read_body(resp, url, length, bound, ranged)
            ok = True
            return buf  # a bytearray: no second copy
        finally:
            if ok:
                self._release(conn, resp)
            else:
                conn.close()

    def size(self, path: str) -> int:
        """Content-Length of ``bucket/key`` (one HEAD request)."""
        bucket, key = _split(path)
        conn, resp = self._send("HEAD", bucket, key, {})
        resp.read()
        self._release(conn, resp)
        length = resp.getheader("content-length")
        if length is None or not length.strip().isdigit():
            raise StorageError(f"s3://{bucket}/{key}: HEAD returned no usable Content-Length "
                               f"({length!r}); the server must report the object's size")
        return int(length)


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


def _read_body(resp: http.client.HTTPResponse, url: str, length: int | None,
               bound: int | None, ranged: bool) -> bytearray:
    """The body, read in ``_READ_STEP`` steps into a buffer that doubles only as bytes
    arrive (a range of up to ``_PREALLOC`` bytes: allocated at once); past ``bound``:
    StorageError; broken or short (of ``length``): IncompleteRead with what came."""
    cap = length if length is not None else bound
    first = min(_PREALLOC, cap) if ranged and cap is not None else _READ_STEP
    buf = bytearray(first if cap is None else min(first, cap))
    n = 0
    try:
        while length is None or n < length:
            if n == len(buf):
                grow = max(len(buf), _READ_STEP)
                if cap is not None:
                    grow = min(grow, cap + 1 - n)  # one byte past a bound shows an overrun
                buf.extend(bytes(grow))
            with memoryview(buf) as view:
                got = resp.readinto(view[n:n + _READ_STEP])
            if not got:
                break
            n += got
            if bound is not None and n > bound:
                break
    except (OSError, http.client.HTTPException) as exc:
        raise http.client.IncompleteRead(bytes(buf[:n]),
                                         None if length is None else length - n) from exc
    if bound is not None and n > bound:
        raise too_long(url, bound, f"at least {n}", "asked for" if ranged else "expected")
    if length is not None and n < length:
        raise http.client.IncompleteRead(bytes(buf[:n]), length - n)
    del buf[n:]
    return buf


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _http_error(method: str, url: str, status: int, body: bytes) -> StorageError:
    """A StorageError carrying the HTTP ``status`` and S3 error ``code`` (retry.classify
    reads them)."""
    text = body[:4096].decode("utf-8", "replace")
    m = re.search(r"<Code>([^<]*)</Code>", text)
    code = m.group(1) if m else ""
    m = re.search(r"<Message>([^<]*)</Message>", text)
    message = m.group(1) if m else http.client.responses.get(status, "")
    return StorageError(f"{method} {url}: HTTP {status} {code}: {message}".replace(" : ", ": "),
                        url=url, status=status, code=code or None)


# ---------------------------------------------------------------- configuration
_resolved: dict[Any, S3Reader | None] = {}


def reader(url: str, storage_options: dict[str, Any] | None = None, *,
           timeout: float | None = 60.0) -> tuple[S3Reader, str] | None:
    """``(reader, "bucket/key")`` for an ``s3://`` URL, or None: let s3fs do it."""
    _, _, path = url.partition("://")
    bucket = path.partition("/")[0]
    if not bucket or ":" in bucket:  # access-point ARNs and the like
        return None
    options = storage_options or {}
    try:
        cache_key: Any = (repr(sorted(options.items())), timeout,
                          tuple(os.environ.get(k) for k in ENV_VARS), files_stamp(config_files()))
        hash(cache_key)
    except TypeError:
        return None
    if cache_key not in _resolved:
        try:
            config = configure(options)
        except (OSError, ValueError, configparser.Error):
            config = None
        if len(_resolved) > 64:
            _resolved.clear()
        _resolved[cache_key] = S3Reader(config, timeout) if config is not None else None
    got = _resolved[cache_key]
    return None if got is None else (got, path)
