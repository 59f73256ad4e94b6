"""The obstore-free half of :mod:`shardstream.storage.objstore`: how a URL and its
``storage_options`` become a store (class, bucket / container / host, config, client
and retry settings), and how obstore's exceptions become shardstream's (by class
name and message: nothing here imports obstore).

``storage_options`` may hold obstore's own config keys as they are (``aws_endpoint``,
``aws_region``, ``google_service_account``, ``azure_storage_account_key``...; obstore
checks them) and the fsspec-style keys users pass to s3fs, gcsfs and adlfs, which are
translated (:data:`FSSPEC_KEYS`). Credentials are never read here: what is not given
comes from obstore's providers (environment, instance metadata...).
"""

from __future__ import annotations

import datetime
import errno as errnos
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from shardstream.errors import ShardNotFoundError, ShardstreamError, StorageError

__all__ = ["SCHEMES", "KINDS", "FSSPEC_KEYS", "OBSTORE_KEYS", "StoreSpec", "handles",
           "store_spec", "location", "accepted_keys", "freeze", "env_stamp", "REQUEST_DEADLINE",
           "BotocoreProfile", "CREDENTIAL_HINTS", "translate"]

#: URL scheme -> store kind
KINDS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
         "abfss": "azure", "azure": "azure", "http": "http", "https": "http"}
SCHEMES = frozenset(KINDS)
#: fsspec-style keys understood per kind (translated); ``client_options`` and
#: ``retry_config`` (obstore's, merged over the defaults) are accepted everywhere
FSSPEC_KEYS = {
    "s3": ("key", "secret", "token", "endpoint_url", "anon", "client_kwargs", "profile",
           "requester_pays", "use_listings_cache", "listings_expiry_time", "max_paths",
           "skip_instance_cache"),
    "gcs": ("token", "project", "endpoint_url"),
    "azure": ("account_name", "account_key", "connection_string", "sas_token", "anon"),
    "http": ("headers",),
}
#: obstore 0.12's own config keys (also accepted with the aws_ / google_ / azure_ prefix)
OBSTORE_KEYS = {
    "s3": ("access_key_id", "secret_access_key", "session_token", "endpoint", "region",
           "default_region", "skip_signature", "request_payer", "virtual_hosted_style_request",
           "unsigned_payload", "checksum_algorithm", "conditional_put", "copy_if_not_exists",
           "disable_tagging", "disable_bulk_delete", "imdsv1_fallback", "metadata_endpoint",
           "container_credentials_relative_uri", "container_credentials_full_uri",
           "container_authorization_token_file", "role_arn", "role_session_name",
           "web_identity_token_file", "sts_endpoint", "s3_express", "server_side_encryption",
           "sse_kms_key_id", "sse_bucket_key_enabled", "sse_customer_key_base64"),
    "gcs": ("service_account", "service_account_key", "application_credentials",
            "bearer_token", "base_url", "skip_signature"),
    "azure": ("account_name", "account_key", "client_id", "client_secret", "tenant_id",
              "authority_host", "sas_key", "token", "use_emulator", "use_fabric_endpoint",
              "endpoint", "msi_endpoint", "object_id", "msi_resource_id",
              "federated_token_file", "use_azure_cli", "skip_signature", "disable_tagging",
              "credential_type", "encryption_key"),
    "http": (),
}
_COMMON = ("client_options", "retry_config")
_IGNORED = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths",
                      "skip_instance_cache", "project"})  # fsspec caches, gcsfs billing
_ENV_PREFIXES = {"s3": ("AWS_",), "gcs": ("GOOGLE_",), "azure": ("AZURE_", "AZURITE_"),
                 "http": ()}
_ENDPOINT_KEYS = {"s3": {"endpoint", "aws_endpoint", "aws_endpoint_url", "aws_endpoint_url_s3"},
                  "gcs": {"base_url", "google_base_url"},
                  "azure": {"endpoint", "azure_endpoint", "azure_storage_endpoint"}}
_ENDPOINT_ENV = {"s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
                 "gcs": ("GOOGLE_BASE_URL",),
                 "azure": ("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT", "AZURITE_BLOB_STORAGE_URL")}
#: where each kind of store finds credentials (for "access denied" messages)
CREDENTIAL_HINTS = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or storage_options "
          "key / secret / token / profile",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS / GOOGLE_SERVICE_ACCOUNT, or storage_options token",
    "azure": "AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY / AZURE_STORAGE_SAS_KEY, or "
             "storage_options account_name / account_key / sas_token / connection_string",
    "http": "storage_options headers (e.g. Authorization)"}
#: the whole-request deadline (obstore's default, 30 s, would cut long bodies short);
#: stalls are caught sooner by the read timeout
REQUEST_DEADLINE = 3600.0


@dataclass
class StoreSpec:
    """What to build: ``kind`` (s3, gcs, azure, http), ``root`` (bucket, container or
    ``scheme://host[:port]``) and the keyword arguments of the store class."""

    kind: str
    root: str
    config: dict[str, Any] = field(default_factory=dict)
    client_options: dict[str, Any] = field(default_factory=dict)
    retry_config: dict[str, Any] = field(default_factory=dict)
    credential_provider: Callable[[], Any] | None = None


def handles(url: str) -> bool:
    """Whether :mod:`~shardstream.storage.objstore` serves ``url`` (http(s) URLs with a
    query or fragment, e.g. presigned ones, are left to fsspec)."""
    head, sep, rest = str(url).partition("://")
    if not sep or head.lower() not in SCHEMES:
        return False
    return KINDS[head.lower()] != "http" or ("?" not in rest and "#" not in rest)


def accepted_keys(kind: str) -> str:
    """The keys ``storage_options`` may hold for ``kind``, for error messages."""
    obstore = ", ".join(OBSTORE_KEYS[kind]) or "none"
    return (f"fsspec-style: {', '.join(FSSPEC_KEYS[kind])}; obstore's own: {obstore}; and "
            f"{', '.join(_COMMON)}")


def location(url: str) -> tuple[str, str, str, str]:
    """(kind, root, path, azure account or '') of ``url``; ValueError if not handled."""
    if not handles(url):
        raise ValueError(f"{url}: not a URL for obstore (schemes: {', '.join(sorted(SCHEMES))})")
    parts = urlsplit(url)
    kind = KINDS[parts.scheme.lower()]
    if kind == "http":
        return kind, f"{parts.scheme.lower()}://{parts.netloc}", unquote(parts.path).lstrip("/"), ""
    netloc, _, path = url.partition("://")[2].partition("/")
    account = ""
    if kind == "azure" and "@" in netloc:  # abfs[s]://container@account.dfs.core.windows.net
        netloc, _, host = netloc.partition("@")
        account = host.split(".", 1)[0]
    if not netloc:
        raise ValueError(f"{url}: no bucket or container name after {parts.scheme}://")
    return kind, netloc, path, account


def _s3(opts: dict[str, Any], spec: StoreSpec) -> None:
    cfg = spec.config
    for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"),
                         ("token", "session_token"), ("endpoint_url", "endpoint")):
        if opts.get(ours) is not None:
            cfg[theirs] = opts.pop(ours)
        opts.pop(ours, None)
    if opts.pop("anon", False):
        cfg["skip_signature"] = True
    if opts.pop("requester_pays", False):
        cfg["request_payer"] = True
    client = dict(opts.pop("client_kwargs", None) or {})
    for ours, theirs in (("region_name", "region"), ("endpoint_url", "endpoint"),
                         ("aws_access_key_id", "access_key_id"),
                         ("aws_secret_access_key", "secret_access_key"),
                         ("aws_session_token", "session_token")):
        if client.get(ours) is not None:
            cfg.setdefault(theirs, client[ours])
        client.pop(ours, None)
    verify = client.pop("verify", True)
    if verify is False:
        spec.client_options["allow_invalid_certificates"] = True
    elif isinstance(verify, str):
        with open(verify) as f:  # a CA bundle: PEM certificates, not credentials
            spec.client_options["root_certificate"] = f.read()
    if client:
        raise ValueError(f"storage_options['client_kwargs'] key {sorted(client)[0]!r} is not "
                         "supported for s3:// by obstore; accepted: region_name, endpoint_url, "
                         "aws_access_key_id, aws_secret_access_key, aws_session_token, verify")
    profile = opts.pop("profile", None)
    if profile:
        spec.credential_provider = provider = BotocoreProfile(profile)
        if provider.region and not any(k.lower().endswith("region") for k in [*cfg, *opts]):
            cfg["region"] = provider.region


def _gcs(opts: dict[str, Any], spec: StoreSpec) -> None:
    token = opts.pop("token", None)
    if opts.get("endpoint_url") is not None:
        spec.config["base_url"] = opts.pop("endpoint_url")
    opts.pop("endpoint_url", None)
    if token in (None, "google_default", "cloud"):
        return
    if token == "anon":
        spec.config["skip_signature"] = True
    elif isinstance(token, dict):
        spec.config["service_account_key"] = json.dumps(token)
    elif isinstance(token, (str, os.PathLike)) and os.path.isfile(token):
        spec.config["service_account"] = os.fspath(token)
    else:
        raise ValueError(f"storage_options['token'] = {token!r}: for gs:// give the path of "
                         "a service-account JSON file, its contents as a dict, 'anon', or "
                         "'google_default' (GOOGLE_APPLICATION_CREDENTIALS, metadata server)")


def _azure(opts: dict[str, Any], spec: StoreSpec) -> None:
    cfg = spec.config
    conn = opts.pop("connection_string", None)
    if conn:
        fields = dict(p.split("=", 1) for p in str(conn).split(";") if "=" in p)
        if fields.get("UseDevelopmentStorage", "").lower() == "true":
            cfg["use_emulator"] = True
        for ours, theirs in (("AccountName", "account_name"), ("AccountKey", "account_key"),
                             ("BlobEndpoint", "endpoint"), ("SharedAccessSignature", "sas_key")):
            if fields.get(ours):
                cfg[theirs] = fields[ours]
    sas = opts.pop("sas_token", None)
    if sas:
        cfg["sas_key"] = str(sas).lstrip("?")
    if opts.pop("anon", False):
        cfg["skip_signature"] = True


def _http(opts: dict[str, Any], spec: StoreSpec) -> None:
    headers = opts.pop("headers", None)
    if headers:
        spec.client_options["default_headers"] = dict(headers)
    if opts:
        key = sorted(opts)[0]
        raise ValueError(f"storage_options key {key!r} is not known for http(s):// URLs; "
                         f"accepted: {accepted_keys('http')}")


def _endpoint_is_http(kind: str, config: dict[str, Any]) -> bool:
    if kind == "http":
        return False
    values = [v for k, v in config.items() if k.lower() in _ENDPOINT_KEYS.get(kind, ())]
    values += [os.environ.get(k) for k in _ENDPOINT_ENV.get(kind, ())]
    if kind == "azure":
        emulator = [v for k, v in config.items() if k.lower().endswith("use_emulator")]
        if any(str(v).lower() == "true" for v in
               emulator + [os.environ.get("AZURE_STORAGE_USE_EMULATOR")]):
            return True
    return any(str(v).lower().startswith("http://") for v in values if v)


def store_spec(url: str, storage_options: dict[str, Any] | None,
               timeout: float | None) -> tuple[StoreSpec, str]:
    """The store to build for ``url`` and the object path inside it.

    ``timeout``: seconds a connection may stay silent (connect, or between reads of a
    body); None leaves obstore's connect default and no read timeout. obstore's own
    retries are off (``max_retries: 0``): the caller's RetryPolicy is the one retry layer.
    """
    kind, root, path, account = location(url)
    opts = {k: v for k, v in (storage_options or {}).items()}
    spec = StoreSpec(kind, root)
    client_options = dict(opts.pop("client_options", None) or {})
    retry_config = opts.pop("retry_config", None)
    {"s3": _s3, "gcs": _gcs, "azure": _azure, "http": _http}[kind](opts, spec)
    for k in _IGNORED:
        opts.pop(k, None)
    spec.config.update(opts)  # obstore's own keys: obstore checks them
    if account and not any(k.lower().endswith("account_name") for k in spec.config):
        spec.config["account_name"] = account
    co = spec.client_options
    co["timeout"] = datetime.timedelta(seconds=REQUEST_DEADLINE)
    if timeout is not None:
        co["connect_timeout"] = co["read_timeout"] = datetime.timedelta(seconds=timeout)
    if root.startswith("http://") or _endpoint_is_http(kind, spec.config):
        co["allow_http"] = True
    co.update(client_options)
    spec.retry_config = dict(retry_config) if retry_config is not None else {"max_retries": 0}
    return spec, path


def freeze(value: Any) -> Any:
    """A hashable form of ``storage_options`` (nested dicts and lists), for cache keys."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return ("unhashable", id(value))
    return value


def env_stamp(kind: str) -> tuple[tuple[str, str], ...]:
    """The environment variables obstore reads for ``kind`` (they shape the store)."""
    prefixes = _ENV_PREFIXES[kind]
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes))) \
        if prefixes else ()


class BotocoreProfile:
    """An obstore credential provider for a named AWS profile (``~/.aws`` files, SSO,
    assume-role...), resolved by botocore's own provider chain. obstore itself reads
    only environment variables and instance metadata, not profiles."""

    def __init__(self, profile: str) -> None:
        try:
            import botocore.session
        except ImportError as exc:
            raise ValueError(f"storage_options['profile'] = {profile!r} needs botocore "
                             "(pip install botocore), or set AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY instead") from exc
        self.profile = profile
        self._session = botocore.session.Session(profile=profile)
        self.region: str | None = self._session.get_config_variable("region")

    def __call__(self) -> dict[str, Any]:
        creds = self._session.get_credentials()
        if creds is None:
            raise ValueError(f"AWS profile {self.profile!r} has no credentials")
        frozen = creds.get_frozen_credentials()
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": soon}


# ---------------------------------------------------------------- errors
_STATUS = re.compile(r"(?:status code: |status: )(\d{3})\b")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")


#: obstore's words for an answer that breaks the protocol (sizes, ranges)
_MALFORMED = ("content-length header missing", "invalid content length",
              "content-range header not present", "invalid content-range")


def translate(exc: BaseException, url: str, action: str) -> BaseException:
    """shardstream's error for an obstore exception raised while ``action``-ing ``url``
    (raise it ``from exc``); shardstream's own errors and ValueErrors come back as they are."""
    if isinstance(exc, (ShardstreamError, ValueError, TypeError)):
        return exc
    name = type(exc).__name__
    text = str(exc)
    head = " ".join(text.split("\n\nDebug source", 1)[0].split()).split(": <?xml", 1)[0]
    head = head if len(head) <= 300 else head[:297] + "..."
    m = _STATUS.search(text)
    status = int(m.group(1)) if m else None
    m = _CODE.search(text)
    code = m.group(1) if m else None
    store_kind = KINDS.get(url.partition("://")[0].lower(), "http")
    if isinstance(exc, FileNotFoundError) or name == "NotFoundError" or status == 404:
        what = "its bucket or container does not exist" if code in (
            "NoSuchBucket", "ContainerNotFound") else "no such object"
        return ShardNotFoundError(f"{url} does not exist ({what}"
                                  f"{f', {code}' if code else ''}); check the URL")
    low = text.lower()
    if name in ("PermissionDeniedError", "UnauthenticatedError") or status in (401, 403) or (
            status is None and name == "GenericError" and "credential" in low):
        if status is None and name != "GenericError":
            status = 401 if name == "UnauthenticatedError" else 403
        return StorageError(
            f"cannot {action} {url}: access denied ({code or status or 'no usable credentials'}"
            f"): {head}; not retried. Check the credentials ({CREDENTIAL_HINTS[store_kind]}) and "
            "the permissions on the bucket", url=url, kind="auth", status=status, code=code)
    if (name == "NotSupportedError" and "range" in low) or "UnexpectedRange" in text:
        return StorageError(f"{url}: the server did not answer the byte range asked ({head}); "
                            "use a server that supports Range requests", url=url, kind="fatal")
    if status is not None:
        transient = status in (408, 429) or (status >= 500 and status not in (501, 505))
        return StorageError(f"cannot {action} {url}: {head}", url=url, status=status, code=code,
                            kind="transient" if transient else "fatal")
    if any(m in low for m in _MALFORMED):  # a server that breaks the protocol: not retried
        return StorageError(f"cannot {action} {url}: the server's answer is malformed ({head}); "
                            "refusing it. Check that the URL points at an object store or "
                            "HTTP server that reports sizes and honours Range requests",
                            url=url, status=status, code=code, kind="fatal")
    if name in ("GenericError", "JoinError") and "builder error" not in low or isinstance(
            exc, (ConnectionError, TimeoutError)):
        m = _HTTP_KIND.search(text)
        http_kind = m.group(1).lower() if m else ""
        if http_kind == "timeout" or "timedout" in low or "timed out" in low:
            err = errnos.ETIMEDOUT
        elif http_kind == "connect":
            err = errnos.ECONNREFUSED
        elif http_kind in ("interrupted", "request", "decode") or "reset" in low:
            err = errnos.ECONNRESET
        else:
            err = errnos.EREMOTEIO
        return StorageError(f"cannot {action} {url}: {head} ({os.strerror(err)})", errno=err,
                            url=url, kind="transient")
    return StorageError(f"cannot {action} {url}: {head}", url=url, kind="fatal")
