"""Rebuilding indexes: ``shardstream index`` for webdataset tars (a foreign index
and manifest beside them) and for shardstream shards whose index was lost.

The command refuses remote URLs and never deletes a tar.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings

import numpy as np

from shardstream import __version__
from shardstream.errors import DatasetExistsError, InputError, ManifestError, ShardNotFoundError
from shardstream.format.compression import Compression
from shardstream.format.index import INDEX_SUFFIX
from shardstream.format.manifest import MANIFEST_NAME, Manifest, ShardInfo
from shardstream.format.members import DECODERS, decode_msgpack, decode_npy, decode_npz
from shardstream.format.webdataset import (LAYOUT_SHARDSTREAM, LAYOUT_WEBDATASET, detect_layout,
                                           manifest_layout)
from shardstream.storage import urls
from shardstream.storage.files import atomic_write, storage_error
from shardstream.storage.io import load_manifest
from shardstream.write.scan import scan_block_tar, scan_foreign_tar

__all__ = ["build_index"]


# ---------------------------------------------------------------- build_index
def _expand(shards: list[str]) -> tuple[list[str], str | None]:
    """Shard paths from files, brace patterns, globs and directories; plus the
    directory of a dataset named as a directory (its manifest's home)."""
    out: list[str] = []
    home = None
    for arg in shards:
        arg = os.fspath(arg)
        if urls.is_remote(arg):
            raise NotImplementedError(f"{arg}: shardstream index works on local files only; "
                                      "download the shards and index them locally")
        if os.path.isdir(arg):
            home = arg
            if os.path.exists(os.path.join(arg, MANIFEST_NAME)):
                m = load_manifest(arg)
                out += [os.path.join(arg, s.name) for s in m.shards]
            else:
                out += sorted(glob.glob(os.path.join(glob.escape(arg), "*.tar")))
            continue
        if "{" in arg:
            import braceexpand
            out += list(braceexpand.braceexpand(arg))
        elif any(c in arg for c in "*?[") and not os.path.exists(arg):
            out += sorted(glob.glob(arg))
        else:
            out.append(arg)
    for p in out:
        if not os.path.isfile(p):
            raise ShardNotFoundError(f"shard {p} does not exist")
    if not out:
        raise ValueError(f"no shards found in {shards}")
    return out, home


def build_index(shards: list[str], output_dir: str | None = None, *, checksum: bool = True,
                overwrite: bool = False) -> Manifest:
    """Index tars so :class:`~shardstream.ShardDataset` and the stream reader can use them.

    ``shards``: tar paths, brace patterns (``data-{000..009}.tar``), globs or a
    dataset directory. Webdataset-layout tars get a ``<name>.idx`` each in
    ``output_dir`` (default: the shards' directory) and a manifest there
    marked ``"layout": "webdataset"``, referencing the shards by relative
    path; the tars are not modified. A webdataset tar holding no samples is
    left out (no ``.idx``, not listed in the manifest) with a ``UserWarning``
    naming it; if every tar is empty, :class:`~shardstream.errors.InputError`.
    Each member's data gets an xxh3_64 checksum that readers compare on every
    read; ``checksum=False`` only skips each foreign tar's whole-file sha256.
    Shardstream shards get their ``.idx`` rebuilt next to them (byte-identical
    to the writer's) and the manifest entries updated.
    """
    paths, home = _expand(list(shards))
    out = output_dir or home or _common_dir(paths)
    os.makedirs(out, exist_ok=True)
    layouts = {detect_layout(p) for p in paths}
    if len(layouts) > 1:
        raise ValueError("some shards are shardstream shards and some webdataset tars; index "
                         "them separately")
    if layouts == {LAYOUT_SHARDSTREAM}:
        return _rebuild_own(paths, out, overwrite)
    return _index_foreign(paths, out, checksum, overwrite)


def _common_dir(paths: list[str]) -> str:
    dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(dirs) > 1:
        raise ValueError("the shards live in several directories; pass output_dir (-o)")
    return dirs.pop()


def _write(path: str, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise storage_error("write", path, exc) from exc


def _info(shard: str, out: str, index_path: str, idx_bytes: bytes, num_samples: int,
          size: int, sha: str, parts: int) -> ShardInfo:
    return ShardInfo(name=os.path.relpath(shard, out), num_samples=num_samples, bytes=size,
                     sha256=sha, num_blocks=parts, index=os.path.relpath(index_path, out),
                     index_bytes=len(idx_bytes),
                     index_sha256=hashlib.sha256(idx_bytes).hexdigest())


def _index_foreign(paths: list[str], out: str, checksum: bool, overwrite: bool) -> Manifest:
    if manifest_layout(out) != LAYOUT_WEBDATASET and not overwrite and \
            os.path.exists(os.path.join(out, MANIFEST_NAME)):
        raise DatasetExistsError(f"{out} already holds a shardstream dataset; choose another "
                                 "output directory (-o) or pass overwrite=True (--overwrite)")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError("two shards share a file name; their indexes would collide")
    infos, counts, empty = [], {}, []
    for p in paths:
        idx = scan_foreign_tar(p, checksum=checksum)
        if idx.num_samples == 0:
            empty.append(p)
            continue
        data = idx.to_bytes()
        idx_path = os.path.join(out, os.path.basename(p) + INDEX_SUFFIX)
        _write(idx_path, data)
        infos.append(_info(p, out, idx_path, data, idx.num_samples, idx.shard_bytes,
                           idx.shard_sha256, idx.num_members))
        for e, c in zip(idx.exts, np.bincount(idx.member_ext, minlength=len(idx.exts))):
            counts[e] = counts.get(e, 0) + int(c)
    if empty:
        _skip_empty(empty, paths)
    schema = {e: {"count": c, "types": [_ext_type(e)]} for e, c in sorted(counts.items())}
    manifest = Manifest(shards=infos, schema=schema, block_bytes=0,
                        created_by=f"shardstream {__version__} index (webdataset tars)",
                        layout=LAYOUT_WEBDATASET)
    _write(os.path.join(out, MANIFEST_NAME), manifest.to_json().encode())
    return manifest


def _skip_empty(empty: list[str], paths: list[str]) -> None:
    """Warn about tars without samples (a manifest cannot list them); refuse if all are."""
    names = ", ".join(empty)
    if len(empty) == len(paths):
        raise InputError(f"{names}: no samples to index (every tar is empty or holds only "
                         "metadata members); check the paths")
    warnings.warn(f"{names}: no samples (empty, or only metadata members); left out of the "
                  "manifest", UserWarning, stacklevel=4)


def _ext_type(ext: str) -> str:
    fn = DECODERS.get(ext.rpartition(".")[2])
    return {int: "int", json.loads: "json", decode_npy: "ndarray", decode_npz: "dict",
            decode_msgpack: "msgpack", None: "bytes"}.get(fn, "str")


def _rebuild_own(paths: list[str], out: str, overwrite: bool) -> Manifest:
    old = None
    if os.path.exists(os.path.join(out, MANIFEST_NAME)) and not overwrite:
        old = load_manifest(out)
    by_name = {s.name: k for k, s in enumerate(old.shards)} if old else {}
    new: list[ShardInfo] = []
    codecs = set()
    for p in paths:
        idx = scan_block_tar(p)
        codecs.add(idx.compression)
        data = idx.to_bytes()
        idx_path = p + INDEX_SUFFIX
        _write(idx_path, data)
        new.append(_info(p, out, idx_path, data, idx.num_samples, idx.shard_bytes,
                         idx.shard_sha256, idx.num_blocks))
    if len(codecs) > 1:
        raise ValueError("some shards are compressed and some are not; index them separately")
    codec = codecs.pop() if codecs else None
    if old is None:  # the level is not stored in the shards: record the default
        manifest = Manifest(shards=new, created_by=f"shardstream {__version__} index",
                            compression=Compression(codec) if codec else None)
    else:
        missing = [s.name for s in new if s.name not in by_name]
        if missing:
            raise ManifestError(f"{os.path.join(out, MANIFEST_NAME)} does not list "
                                f"{', '.join(missing)}; pass overwrite=True (--overwrite) to "
                                "write a new manifest for exactly these shards")
        shards = list(old.shards)
        for s in new:
            shards[by_name[s.name]] = s
        manifest = Manifest(shards=shards, schema=old.schema, key_field=old.key_field,
                            block_bytes=old.block_bytes, created_by=old.created_by,
                            compression=old.compression)
    _write(os.path.join(out, MANIFEST_NAME), manifest.to_json().encode())
    return manifest
