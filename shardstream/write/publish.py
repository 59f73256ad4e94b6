"""Publishing a dataset: moving staged shards into place (or uploading them) and
switching to the new ``manifest.json`` in one step.

Used by every writer (:class:`~shardstream.write.writer.ShardWriter`,
:func:`~shardstream.write.parallel.write_shards`, the Ray integration, ``convert``):

1. :func:`~shardstream.write.output.prepare_output` takes an exclusive lock on the output directory
   (``flock`` on ``.shardstream.lock``; a second writer fails at once with
   :class:`~shardstream.errors.DatasetLockedError`), then removes leftovers
   of crashed writers (``.staging-*`` folders, manifest temp files: only a
   crashed writer can have left them while the lock is free), reads the old
   manifest (checked, see :meth:`Manifest.from_json`) and lists the old files
   an overwrite will remove: names the old manifest lists (plain names inside
   the directory) and stray files of this writer's own pattern
   (``<prefix>-NNNNNN.tar[.idx]``). Nothing else is ever deleted.
2. Shards are written into staging folders
   (:func:`~shardstream.write.output.make_staging`).
3. :func:`publish` moves them in under names that no file in the directory
   (and no name the old manifest lists) uses, so overwrites alternate between
   two number ranges; then ``os.replace`` puts the new manifest in place (the
   one atomic switch); only then are the old files removed. A reader that
   opened the old manifest gets :class:`ShardNotFoundError` after the switch,
   never a mix of old and new shards; a crash at any point leaves the old
   dataset whole or the new one whole, plus orphans that the next overwrite
   removes.
4. :meth:`~shardstream.write.output.PreparedOutput.release` drops the lock (and removes the output
   directory again if this writer created it and published nothing).

Remote (URL) outputs cannot be locked this way: two writers on one prefix
must be kept apart by the caller. Their new objects get fresh names too, the
manifest is one PUT, and the old objects are deleted after it.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable

from shardstream import __version__
from shardstream.format.compression import Compression
from shardstream.format.index import INDEX_SUFFIX
from shardstream.format.manifest import MANIFEST_NAME, Manifest, ShardInfo
from shardstream.format.schema import SchemaBuilder
from shardstream.storage import io, retry, urls
from shardstream.storage.files import atomic_write, fsync_dir
from shardstream.write.lock import storage_error
from shardstream.write.output import PreparedOutput, existing_entries

__all__ = ["FAULT_STEPS", "publish"]


UPLOAD_THREADS = 4

#: the steps of :func:`publish`, in order, at which :data:`_fault` is called
FAULT_STEPS = ("staged", "moving", "moved", "manifest", "removed-old")

#: test hook: called with each step's name; raising (or dying) there simulates a crash
_fault: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _fault is not None:
        _fault(name)


# ---------------------------------------------------------------- publishing
def publish(target: PreparedOutput, staged: list[tuple[str, ShardInfo]],
            schema: SchemaBuilder, *, key_field: str, block_bytes: int,
            compression: Compression | None = None) -> Manifest:
    """Move staged shards in under fresh names, switch the manifest, remove the old files.

    ``staged``: (staging folder, shard info) pairs in dataset order. A
    remote output gets uploads instead of renames (:func:`_publish_remote`).
    Until the manifest switch an error takes the moved files out again (the
    old dataset stays as it was); after it, the new dataset stands.
    """
    if target.remote:
        return _publish_remote(target, staged, schema, key_field=key_field,
                               block_bytes=block_bytes, compression=compression)
    output_dir = target.output_dir
    _step("staged")
    moves, final = _plan_names(staged, target, set(existing_entries(output_dir)))
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    manifest, data = _encode(_new_manifest(target.base, final, schema, key_field, block_bytes,
                                           compression), manifest_path)
    moved: list[str] = []
    try:
        for src, dst in moves:
            try:
                os.replace(src, os.path.join(output_dir, dst))
            except OSError as exc:
                raise storage_error("move into place", os.path.join(output_dir, dst),
                                    exc) from exc
            moved.append(dst)
            if len(moved) == 1:
                _step("moving")
        fsync_dir(output_dir)
        _step("moved")
        try:
            atomic_write(manifest_path, data)
        except OSError as exc:
            raise storage_error("write", manifest_path, exc) from exc
    except BaseException:
        if _read_local(manifest_path) != data:  # not switched: nothing lists them
            for dst in moved:
                try:
                    os.unlink(os.path.join(output_dir, dst))
                except OSError:
                    pass
        raise
    _step("manifest")
    new = {n for s in final for n in (s.name, s.index)}
    for name in target.old_files:
        if name not in new:
            _remove(os.path.join(output_dir, name))
    fsync_dir(output_dir)
    _step("removed-old")
    return manifest


def _encode(manifest: Manifest, where: str) -> tuple[Manifest, bytes]:
    """The manifest's bytes and the manifest as readers will load them (equal to what is
    published, version included); a writer never publishes what readers would refuse."""
    data = manifest.to_json().encode()
    return Manifest.from_json(data, where=where), data


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _plan_names(staged: list[tuple[str, ShardInfo]], target: PreparedOutput, existing: set[str]
                ) -> tuple[list[tuple[str, str]], list[ShardInfo]]:
    """Final names: (staged file, final name) pairs and the new shards' infos.

    A name is never one that ``existing`` holds or an old manifest lists, so
    nothing is replaced in place: appends number on after the last shard,
    overwrites from 0 up, skipping the old dataset's names.
    """
    base, prefix = target.base, target.prefix
    taken = set(existing) | set(target.old_files)
    for m in (base, target.replace):
        taken.update(n for s in (m.shards if m else []) for n in (s.name, s.index))
    number = _next_number(list(base.shards) if base else [], prefix)
    moves: list[tuple[str, str]] = []
    final: list[ShardInfo] = []
    for staging_dir, info in staged:
        while f"{prefix}-{number:06d}.tar" in taken or \
                f"{prefix}-{number:06d}.tar{INDEX_SUFFIX}" in taken:
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


def _publish_remote(target: PreparedOutput, staged: list[tuple[str, ShardInfo]],
                    schema: SchemaBuilder, *, key_field: str, block_bytes: int,
                    compression: Compression | None = None) -> Manifest:
    """Upload shards and indexes (``UPLOAD_THREADS`` at a time) under fresh names,
    PUT the manifest (one atomic step), then delete the old objects.

    On failure before the manifest PUT, the objects this call uploaded are
    deleted (best effort; orphans are harmless: nothing lists them). No lock:
    keep writers of one prefix apart yourself.
    """
    url, opts = target.output_dir, {"storage_options": target.storage_options}
    manifest_url = urls.join(url, MANIFEST_NAME)
    _step("staged")
    existing = set(io.list_prefix(url, **opts))
    moves, final = _plan_names(staged, target, existing)
    manifest, data = _encode(_new_manifest(target.base, final, schema, key_field, block_bytes,
                                           compression), manifest_url)
    pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="shardstream-upload")
    try:
        futures = [pool.submit(io.put_file, src, urls.join(url, dst), **opts)
                   for src, dst in moves]
        for k, f in enumerate(as_completed(futures)):
            f.result()
            if k == 0:
                _step("moving")
        pool.shutdown()
        _step("moved")
        io.put_bytes(data, manifest_url, **opts)
    except BaseException:
        pool.shutdown(cancel_futures=True)
        if not _remote_manifest_is(manifest_url, data, target.storage_options):
            for _, dst in moves:  # orphans: nothing lists them
                try:
                    io.remove(urls.join(url, dst), storage_options=target.storage_options,
                                   retry=retry.RetryPolicy(attempts=2))
                except Exception:  # noqa: BLE001 - best effort, the first error matters
                    pass
        raise
    _step("manifest")
    new = {dst for _, dst in moves}
    for name in target.old_files:
        if name not in new:
            io.remove(urls.join(url, name), **opts)
    _step("removed-old")
    return manifest


def _remote_manifest_is(url: str, data: bytes, storage_options: dict[str, Any] | None) -> bool:
    """Whether ``url`` holds ``data``; True when that cannot be told (then keep the objects)."""
    try:
        return io.read_bytes(url, storage_options=storage_options,
                                  retry=retry.RetryPolicy(attempts=2)) == data
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - unknown: orphans are safer than a broken dataset
        return True


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
        raise storage_error("remove", path, exc) from exc
