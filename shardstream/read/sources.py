"""One resolver for every source form a reader accepts: a dataset directory or its
manifest, a remote dataset, a brace pattern or list of tars, a remote prefix.
"""

from __future__ import annotations

import os
from typing import Any

from shardstream.errors import ManifestError, ShardNotFoundError
from shardstream.format.manifest import MANIFEST_NAME
from shardstream.read.dataset import Dataset, open_dataset
from shardstream.storage.download import fetch_and_hold
from shardstream.storage.io import list_prefix, load_manifest
from shardstream.storage.locks import CacheHold
from shardstream.storage.urls import is_remote, join

__all__ = ["open_source", "resolve", "resolve_cached"]


def open_source(path: Any) -> Dataset:
    """A mixture's source as a dataset (any form :func:`resolve` takes that has a
    manifest)."""
    if isinstance(path, Dataset):
        return path
    dataset, _ = resolve(path)
    if dataset is None:
        raise ValueError(f"mixture source {path!r} has no manifest; a mixture needs exact "
                         "counts: pass dataset directories (or their manifest.json)")
    return dataset


def resolve(source: Any, storage_options: dict[str, Any] | None = None
            ) -> tuple[Any, list[str] | None]:
    """(Dataset or None, shard urls or None) for every accepted source form.

    A list (or brace pattern) of local webdataset tars that all have their
    ``.idx`` (``shardstream index``) becomes an in-memory dataset: exact epochs.
    """
    if isinstance(source, (list, tuple)):
        urls = [os.fspath(u) for u in source]
        if not urls:
            raise ValueError("source is an empty list of shards")
        return _indexed_or_list(_existing(urls))
    path = os.fspath(source)
    if "{" in path:
        import braceexpand

        return _indexed_or_list(_existing(list(braceexpand.braceexpand(path))))
    if is_remote(path):
        return _resolve_remote(path, storage_options)
    if os.path.isdir(path) or os.path.basename(path) == MANIFEST_NAME:
        try:
            return open_dataset(path), None
        except ManifestError as exc:
            raise ManifestError(f"{exc}. To read loose shards without a manifest, pass a "
                                "brace pattern or a list of .tar paths") from exc
    return _indexed_or_list(_existing([path]))


def _indexed_or_list(urls: list[str]) -> tuple[Any, list[str] | None]:
    """Local webdataset tars all indexed in place: a dataset; anything else: the list."""
    from shardstream.read.webdataset import list_manifest

    if any(is_remote(u) for u in urls):
        return None, urls
    manifest = list_manifest(urls)
    return (None, urls) if manifest is None else (Dataset(os.sep, manifest), None)


def _existing(urls: list[str]) -> list[str]:
    """Local shards must exist now (a typo should fail here, not in a worker later)."""
    missing = [u for u in urls if not is_remote(u) and not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardNotFoundError(f"{missing[0]}{more} does not exist: pass a dataset "
                                 "directory, its manifest.json, or existing .tar shards")
    return urls


def _resolve_remote(url: str, storage_options: dict[str, Any] | None
                    ) -> tuple[Any, list[str] | None]:
    """A remote dataset (its manifest), one ``.tar``, or the ``*.tar`` under a prefix."""
    if url.endswith(".tar"):
        return None, [url]
    named = url.rstrip("/").endswith("/" + MANIFEST_NAME)
    root = url.rstrip("/")[:-len(MANIFEST_NAME) - 1] if named else url.rstrip("/")
    try:
        return Dataset(root, load_manifest(root, storage_options)), None
    except ManifestError:
        if named:
            raise
    names = [n for n in list_prefix(root, storage_options=storage_options)
             if n.endswith(".tar")]
    if not names:
        raise ManifestError(f"{root} has no {MANIFEST_NAME} and no .tar objects directly "
                            "under it: check the URL, or write the dataset with "
                            "`shardstream-write -o URL`")
    return None, [join(root, n) for n in names]


def resolve_cached(source: str | os.PathLike | Dataset, cache_dir: str | None,
                   storage_options: dict[str, Any] | None = None
                   ) -> tuple[Dataset, CacheHold | None]:
    """A dataset for random access, and for a remote one the
    :class:`~shardstream.storage.locks.CacheHold` on its cached copy (eviction in any
    process skips it while held), else None. Random access needs a manifest: a
    dataset directory or its ``manifest.json``, local or remote."""
    if isinstance(source, Dataset):
        return source, None
    src = os.fspath(source)
    if is_remote(src):
        if cache_dir is None:
            raise ValueError(f"{src} is remote: pass cache_dir= to hold the local copy")
        held = fetch_and_hold(src, cache_dir, storage_options=storage_options)
        return open_dataset(held.path), held
    return open_dataset(src), None
