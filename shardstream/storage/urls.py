"""URLs and names: which are remote, joining, and the plain-name rule for names
that come from a manifest or a server.
"""

from __future__ import annotations

import os

from shardstream.errors import ManifestError, StorageError

__all__ = ["is_remote", "is_pipe", "join", "local_path", "check_name", "inside", "url_protocol"]


_LOCAL_PROTOCOLS = ("file", "local")


def url_protocol(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isidentifier() else ""


def is_pipe(url: str) -> bool:
    """``pipe:cmd args`` (webdataset-style: the shard is a command's stdout)."""
    return url.startswith("pipe:")


def is_remote(url: str | os.PathLike) -> bool:
    """True for ``s3://``, ``gs://``, ``http(s)://`` and other non-local fsspec URLs."""
    url = os.fspath(url)
    return is_pipe(url) or url_protocol(url) not in ("", *_LOCAL_PROTOCOLS)


def local_path(url: str | os.PathLike) -> str:
    """``file:///x/y`` -> ``/x/y``; a plain path is returned as is."""
    url = os.fspath(url)
    if url_protocol(url) in _LOCAL_PROTOCOLS:
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
