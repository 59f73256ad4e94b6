"""Publishing a dataset: checking the output, staging, renaming shards into
place (or uploading them) and writing ``manifest.json`` last.

Used by every writer (:class:`~shardstream.writer.ShardWriter`,
:func:`~shardstream.parallel.write_shards`, the Ray integration, ``convert``):
shards are written into a staging folder first, and only :func:`publish` makes
them part of a dataset, so a crash never leaves a listed shard incomplete and a
failed overwrite or append leaves the old dataset as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from . import __version__, storage
from .compression import Compression
from .errors import DatasetExistsError, ManifestError, StorageError
from .index import INDEX_SUFFIX
from .manifest import MANIFEST_NAME, Manifest, SchemaBuilder, ShardInfo, fsync_dir, load_manifest

__all__ = ["STAGING_PREFIX", "prepare_output", "make_staging", "publish"]

STAGING_PREFIX = ".staging-"
UPLOAD_THREADS = 4


def _storage_error(action: str, path: str, exc: OSError) -> StorageError:
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}", exc.errno)


def _existing_entries(output_dir: str) -> list[str]:
    try:
        return sorted(os.listdir(output_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _storage_error("list", output_dir, exc) from exc


def publish(output_dir: str, staged: list[tuple[str, ShardInfo]], schema: SchemaBuilder, *,
            prefix: str, base: Manifest | None, replace: Manifest | None, key_field: str,
            block_bytes: int, storage_options: dict[str, Any] | None = None,
            compression: Compression | None = None) -> Manifest:
    """Move staged shards to their final names and write the manifest last.

    ``base``: the dataset being appended to (kept); ``replace``: the dataset
    being overwritten (its manifest goes first, then its shards). A remote
    ``output_dir`` gets uploads instead of renames (:func:`_publish_remote`).
    """
    if storage.is_remote(output_dir):
        return _publish_remote(output_dir, staged, schema, prefix=prefix, base=base,
                               replace=replace, key_field=key_field, block_bytes=block_bytes,
                               storage_options=storage_options, compression=compression)
    output_dir = storage.local_path(output_dir)
    if replace is not None:
        _remove(os.path.join(output_dir, MANIFEST_NAME))
        for s in replace.shards:
            _remove(os.path.join(output_dir, s.name))
            _remove(os.path.join(output_dir, s.index))
    moves, final = _plan_names(staged, base, prefix)
    for src, dst in moves:
        try:
            os.replace(src, os.path.join(output_dir, dst))
        except OSError as exc:
            raise _storage_error("move into place", os.path.join(output_dir, dst), exc) from exc
    fsync_dir(output_dir)
    manifest = _new_manifest(base, final, schema, key_field, block_bytes, compression)
    try:
        manifest.save(output_dir)
    except OSError as exc:
        raise _storage_error("write", os.path.join(output_dir, MANIFEST_NAME), exc) from exc
    return manifest


def _plan_names(staged: list[tuple[str, ShardInfo]], base: Manifest | None, prefix: str
                ) -> tuple[list[tuple[str, str]], list[ShardInfo]]:
    """Final names: (staged file, final name) pairs and the new shards' infos."""
    taken = {s.name for s in base.shards} if base else set()
    number = _next_number(list(base.shards) if base else [], prefix)
    moves: list[tuple[str, str]] = []
    final: list[ShardInfo] = []
    for staging_dir, info in staged:
        while f"{prefix}-{number:06d}.tar" in taken:
            number += 1
        name = f"{prefix}-{number:06d}.tar"
        number += 1
        moves += [(os.path.join(staging_dir, info.name), name),
                  (os.path.join(staging_dir, info.index), name + INDEX_SUFFIX)]
        final.append(ShardInfo(**{**info.__dict__, "name": name, "index": name + INDEX_SUFFIX}))
    return moves, final


def _new_manifest(base: Manifest | None, final: list[ShardInfo], schema: SchemaBuilder,
                  key_field: str, block_bytes: int,
                  compression: Compression | None = None) -> Manifest:
    merged = SchemaBuilder()
    if base:
        merged.merge(_schema_sets(base.schema))
    merged.merge(schema)
    kept = list(base.shards) if base else []
    return Manifest(shards=kept + final, schema=merged.to_dict(), key_field=key_field,
                    block_bytes=block_bytes, created_by=f"shardstream {__version__}",
                    compression=compression)


def _publish_remote(url: str, staged: list[tuple[str, ShardInfo]], schema: SchemaBuilder, *,
                    prefix: str, base: Manifest | None, replace: Manifest | None,
                    key_field: str, block_bytes: int,
                    storage_options: dict[str, Any] | None,
                    compression: Compression | None = None) -> Manifest:
    """Upload shards and indexes (``UPLOAD_THREADS`` at a time), then the manifest.

    Object stores have no rename, so an overwrite deletes the old manifest
    first: while it runs, and if it fails, readers find no dataset rather
    than a mix of old and new shards. On failure the objects this call
    uploaded are deleted (best effort); an appended-to dataset is untouched
    until its new manifest replaces the old one in a single PUT.
    """
    opts: dict[str, Any] = {"storage_options": storage_options}
    manifest_url = storage.join(url, MANIFEST_NAME)
    moves, final = _plan_names(staged, base, prefix)
    if replace is not None:
        storage.remove(manifest_url, **opts)
    pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="shardstream-upload")
    try:
        futures = [pool.submit(storage.put_file, src, storage.join(url, dst), **opts)
                   for src, dst in moves]
        for f in as_completed(futures):
            f.result()
        pool.shutdown()
        if replace is not None:
            new = {dst for _, dst in moves}
            for s in replace.shards:
                for name in (s.name, s.index):
                    if name not in new:
                        storage.remove(storage.join(url, name), **opts)
        manifest = _new_manifest(base, final, schema, key_field, block_bytes, compression)
        storage.put_bytes(manifest.to_json().encode(), manifest_url, **opts)
    except BaseException:
        pool.shutdown(cancel_futures=True)
        for _, dst in moves:  # orphans: nothing lists them
            try:
                storage.remove(storage.join(url, dst), storage_options=storage_options,
                               retry=storage.RetryPolicy(attempts=2))
            except Exception:  # noqa: BLE001 - best effort, the first error matters
                pass
        raise
    return manifest


def _schema_sets(schema: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for path, f in schema.items():
        g = {"count": f["count"], "types": set(f["types"])}
        if "dtypes" in f:
            g["dtypes"], g["shape"] = set(f["dtypes"]), f["shape"]
        out[path] = g
    return out


def _next_number(shards: list[ShardInfo], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"-(\d+)\.tar$")
    nums = [int(m.group(1)) for s in shards if (m := pat.match(s.name))]
    return max(nums) + 1 if nums else 0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _storage_error("remove", path, exc) from exc


def prepare_output(output_dir: str, *, prefix: str, overwrite: bool, append: bool,
                   key_field: str, storage_options: dict[str, Any] | None = None,
                   compression: Compression | None = None
                   ) -> tuple[Manifest | None, Manifest | None]:
    """Check the output location; returns (base to append to, dataset to replace)."""
    if overwrite and append:
        raise ValueError("overwrite and append are mutually exclusive")
    remote = storage.is_remote(output_dir)
    if remote:
        entries = storage.list_prefix(output_dir, storage_options=storage_options)
    else:
        output_dir = storage.local_path(output_dir)
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as exc:
            raise _storage_error("create directory", output_dir, exc) from exc
        entries = _existing_entries(output_dir)
    has_manifest = MANIFEST_NAME in entries
    old = load_manifest(output_dir, storage_options) \
        if has_manifest and (append or overwrite) else None
    if append:
        if old is not None and old.key_field != key_field:
            raise ManifestError(f"{output_dir} uses key field {old.key_field!r}, not "
                                f"{key_field!r}; append with the same key field")
        if old is not None and old.compression is not None and not old.compression.framed:
            raise ManifestError(f"{output_dir} uses the format-v2 compressed layout (one zstd "
                                "frame per block), which this shardstream reads but does not "
                                "write; upgrade it first with `shardstream convert "
                                f"{output_dir} NEW --compress {old.compression.spec()}`, then "
                                "append to NEW")
        if old is not None and old.compression != compression:
            def spec(c: Compression | None) -> str:
                if c is None:
                    return "none"
                other = old.compression if c is compression else compression
                if other is not None and other.spec() == c.spec():  # differ in frames only
                    return f"Compression({c.codec!r}, {c.level}, frame_bytes={c.frame_bytes}, " \
                           f"dict_bytes={c.dict_bytes})"
                return c.spec()
            raise ManifestError(f"{output_dir} is compressed with {spec(old.compression)}, "
                                f"this write with {spec(compression)}; append with "
                                f"--compress {spec(old.compression)} (compression="
                                f"{spec(old.compression)!r})")
        return old, None
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        what = "a dataset" if has_manifest else "files"
        raise DatasetExistsError(
            f"{output_dir} already holds {what} ({shown}); pass overwrite=True "
            "(--overwrite) to replace it or append=True (--append) to add shards")
    if overwrite and not remote:
        for e in entries:  # leftovers of crashed writes
            if e.startswith(STAGING_PREFIX):
                shutil.rmtree(os.path.join(output_dir, e), ignore_errors=True)
    if overwrite:
        pat = re.compile(re.escape(prefix) + r"-\d+\.tar(\.idx)?$")
        stray = [e for e in entries if pat.match(e)]
        if old is None:
            old = Manifest()
        listed = {n for s in old.shards for n in (s.name, s.index)}
        old.shards = old.shards + [ShardInfo(e, 0, 0, "", 0, e, 0, "") for e in stray
                                   if e not in listed]
    return None, old


def make_staging(output_dir: str) -> str:
    """A fresh staging directory: inside ``output_dir``, or a local temp dir for a URL."""
    if storage.is_remote(output_dir):
        try:
            return tempfile.mkdtemp(prefix="shardstream" + STAGING_PREFIX)
        except OSError as exc:
            raise _storage_error("create a staging directory for", output_dir, exc) from exc
    output_dir = storage.local_path(output_dir)
    try:
        return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir)
    except OSError as exc:
        raise _storage_error("create staging directory in", output_dir, exc) from exc
