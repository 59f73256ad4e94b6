"""Retries for storage calls: exponential backoff with jitter, and error triage.

:func:`classify` sorts an exception (walking its ``__cause__`` chain, since
s3fs and fsspec wrap botocore / aiohttp errors) into one of:

- ``"auth"``: 401/403, AccessDenied, InvalidAccessKeyId, missing credentials.
  Never retried: retrying cannot fix a key, and a retry storm gets accounts
  throttled or locked.
- ``"missing"``: 404 / NoSuchKey / NoSuchBucket. Never retried.
- ``"transient"``: connection reset or refused, dropped body, timeout, 5xx,
  429 and throttling (503 SlowDown). Retried with backoff.
- ``"fatal"``: everything else (bad arguments, 400...). Never retried.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from shardstream.errors import StorageError

__all__ = ["RetryPolicy", "DEFAULT_RETRY", "NO_RETRY", "classify", "http_status"]


T = TypeVar("T")

_AUTH_CODES = frozenset({
    "AccessDenied", "AccountProblem", "AllAccessDisabled", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
    "InvalidSecurity", "NotSignedUp", "UnauthorizedAccess", "Forbidden", "401", "403"})
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
    "RequestLimitExceeded", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "ServiceUnavailable", "503", "500", "502", "504", "429"})
_AUTH_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError",
                         "NoAuthTokenError", "DefaultCredentialsError", "RefreshError"})
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ResponseStreamingError", "IncompleteReadError",
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError",
    "ClientConnectorError", "ClientOSError", "ServerTimeoutError", "SocketTimeoutError",
    "ConnectionTimeoutError", "FSTimeoutError", "IncompleteRead", "ProtocolError",
    "ChunkedEncodingError", "ContentLengthError", "TransferEncodingError",
    "HTTPClientError", "ResponseParserError"})
_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                               errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                               errno.ENETUNREACH, errno.EREMOTEIO})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None else (
            None if e.__suppress_context__ else e.__context__)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind ``exc`` (shardstream's S3 reader, botocore, aiohttp,
    requests, gcsfs), if any."""
    for e in _chain(exc):
        if isinstance(e, StorageError) and e.status is not None:
            return e.status
        response = getattr(e, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status:
                return int(status)
        for attr in ("status", "code", "status_code"):  # aiohttp, gcsfs HttpError
            value = getattr(e, attr, None)
            if isinstance(value, int) and 100 <= value <= 599:
                return value
        status = getattr(response, "status_code", None)  # requests
        if isinstance(status, int):
            return status
    return None


def _error_code(e: BaseException) -> str | None:
    if isinstance(e, StorageError):  # ours (objstore's)
        return e.code
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def classify(exc: BaseException) -> str:
    """``"auth"``, ``"missing"``, ``"transient"`` or ``"fatal"`` (see the module doc)."""
    for e in _chain(exc):  # a StorageError that knows its kind (objstore's, ours) says so
        if isinstance(e, StorageError) and e.kind in ("auth", "transient", "fatal"):
            return e.kind
    transient = False
    for e in _chain(exc):
        name = type(e).__name__
        code = _error_code(e)
        if isinstance(e, PermissionError) or name in _AUTH_NAMES or code in _AUTH_CODES:
            return "auth"
        if code in _MISSING_CODES:
            return "missing"
        if code in _TRANSIENT_CODES or name in _TRANSIENT_NAMES:
            transient = True
        elif isinstance(e, (TimeoutError, asyncio.TimeoutError, socket.timeout,
                            ConnectionError, EOFError)):
            transient = True
        elif isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            transient = True
    status = http_status(exc)
    if status in (401, 403):
        return "auth"
    if status == 404 or (status is None and any(isinstance(e, FileNotFoundError)
                                                for e in _chain(exc))):
        return "missing"
    if transient or status == 429 or (status is not None and status >= 500):
        return "transient"
    return "fatal"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try a storage call before giving up.

    ``attempts``: total tries (1 = no retry). Waits grow as
    ``base_delay * 2**k`` up to ``max_delay``; with ``jitter`` each wait is
    drawn uniformly from ``[0, that]`` ("full jitter", which spreads a fleet
    of workers retrying at once). ``timeout``: seconds a connection may stay
    silent (connect or read) before the request counts as failed and is
    retried. ``retry_on`` names the :func:`classify` kinds retried.
    """

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0
    jitter: bool = True
    timeout: float | None = 60.0
    retry_on: frozenset[str] = frozenset({"transient"})

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"RetryPolicy.timeout must be > 0 or None, got {self.timeout}")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        cap = min(self.max_delay, self.base_delay * (2 ** retry))
        return (rng or random).uniform(0, cap) if self.jitter else cap

    def should_retry(self, exc: BaseException) -> bool:
        return classify(exc) in self.retry_on

    def call(self, fn: Callable[[], T], *, describe: Callable[[BaseException, int], Exception],
             on_retry: Callable[[BaseException, int, float], None] | None = None,
             sleep: Callable[[float], None] = time.sleep) -> T:
        """Run ``fn`` until it succeeds, fails permanently or the budget is spent.

        ``describe(last_exc, tries)`` builds the error raised at the end (it is
        raised ``from`` the last exception). ``on_retry(exc, retry, wait)`` is
        called before each wait (logging, metrics).
        """
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - triaged below
                if not self.should_retry(exc) or attempt + 1 >= self.attempts:
                    raise describe(exc, attempt + 1) from exc
                wait = self.delay(attempt)
                if on_retry is not None:
                    on_retry(exc, attempt, wait)
                sleep(wait)
        raise AssertionError("unreachable")


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)
