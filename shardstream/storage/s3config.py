"""S3 settings for the built-in reader: credentials, region and endpoint from
``storage_options``, the environment and ``~/.aws`` (anything else goes to s3fs).
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Credentials", "S3Config", "ENV_VARS", "configure", "config_files", "files_stamp"]


_OPTIONS = frozenset({"key", "secret", "token", "anon", "endpoint_url", "client_kwargs",
                      "profile", "use_ssl", "skip_instance_cache", "use_listings_cache",
                      "listings_expiry_time", "max_paths"})
_CLIENT_KWARGS = frozenset({"endpoint_url", "region_name", "aws_access_key_id",
                            "aws_secret_access_key", "aws_session_token"})
_PROFILE_KEYS = frozenset({"region", "output", "aws_access_key_id", "aws_secret_access_key",
                           "aws_session_token", "retry_mode", "max_attempts"})
ENV_VARS = ("SHARDSTREAM_S3_LITE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CA_BUNDLE", "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT",
            "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "HOME")


@dataclass(frozen=True)
class Credentials:
    key: str
    secret: str
    token: str | None = None


# ---------------------------------------------------------------- the reader
@dataclass(frozen=True)
class S3Config:
    scheme: str
    endpoint: tuple[str, int] | None  # (host, port) of an S3-compatible server, else AWS
    region: str
    creds: Credentials | None  # None: unsigned (anon)
    cafile: str | None


def config_files() -> tuple[str, str]:
    """(config, credentials): the AWS ini files this environment names."""
    env = os.environ
    return (os.path.expanduser(env.get("AWS_CONFIG_FILE") or "~/.aws/config"),
            os.path.expanduser(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"))


def files_stamp(paths: tuple[str, ...]) -> tuple[Any, ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def _true(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _profile(path: str, section: str) -> dict[str, str] | None:
    """A section of an AWS ini file; None when the file or the section is absent."""
    if not os.path.isfile(path):
        return None
    parser = configparser.RawConfigParser()
    parser.read(path)
    return dict(parser.items(section)) if parser.has_section(section) else None


def configure(options: dict[str, Any]) -> S3Config | None:
    """The request settings for ``options`` + environment + ~/.aws, or None (s3fs)."""
    env = os.environ
    if env.get("SHARDSTREAM_S3_LITE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    client = options.get("client_kwargs") or {}
    if set(options) - _OPTIONS or not isinstance(client, dict) or set(client) - _CLIENT_KWARGS:
        return None
    profile = options.get("profile") or env.get("AWS_PROFILE") or \
        env.get("AWS_DEFAULT_PROFILE") or "default"
    conf_file, cred_file = config_files()
    conf = _profile(conf_file, profile if profile == "default" else f"profile {profile}")
    creds_section = _profile(cred_file, profile)
    for section in (conf, creds_section):  # roles, SSO, processes, endpoints...: s3fs
        if section and any(k not in _PROFILE_KEYS and not k.startswith("cli_")
                           for k in section):
            return None
    if profile != "default" and conf is None and creds_section is None:
        return None  # an unknown profile: s3fs says so
    conf = conf or {}

    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    if not endpoint and not _true(env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "")):
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    scheme = "http" if options.get("use_ssl") is False else "https"
    where = None
    if endpoint:
        parts = urlsplit(str(endpoint))
        if parts.scheme not in ("http", "https") or not parts.hostname or \
                parts.path not in ("", "/") or parts.query:
            return None
        scheme = parts.scheme
        where = (parts.hostname, parts.port or (443 if scheme == "https" else 80))
    elif _true(env.get("AWS_USE_FIPS_ENDPOINT", "")) or \
            _true(env.get("AWS_USE_DUALSTACK_ENDPOINT", "")):
        return None
    region = (client.get("region_name") or env.get("AWS_REGION") or
              env.get("AWS_DEFAULT_REGION") or conf.get("region") or "us-east-1")

    creds: Credentials | None
    key = options.get("key") or client.get("aws_access_key_id")
    secret = options.get("secret") or client.get("aws_secret_access_key")
    token = options.get("token") or client.get("aws_session_token")
    if options.get("anon"):
        creds = None
    elif key or secret:
        if not (key and secret):
            return None
        creds = Credentials(str(key), str(secret), token and str(token))
    elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY") and \
            not options.get("profile"):  # an explicit profile outranks the environment
        creds = Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                            env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN"))
    elif env.get("AWS_ROLE_ARN") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return None
    else:
        creds = None
        for section in (creds_section, conf):
            if section and section.get("aws_access_key_id") and \
                    section.get("aws_secret_access_key"):
                creds = Credentials(section["aws_access_key_id"],
                                    section["aws_secret_access_key"],
                                    section.get("aws_session_token"))
                break
        if creds is None:  # instance metadata, containers...: botocore's chain
            return None
    return S3Config(scheme, where, str(region), creds, env.get("AWS_CA_BUNDLE") or None)
