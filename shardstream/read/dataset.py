"""Reading local shards: open a dataset, load and check indexes, walk blocks.

The building blocks every reader shares (streaming, random access, verify,
cat), on local paths; remote datasets are read from their node-cache copy
(:mod:`shardstream.storage.cache`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

from shardstream.errors import CorruptShardError, DecodeError, IndexMismatchError
from shardstream.format.codec import decode_sample, iter_samples
from shardstream.format.index import ShardIndex, read_index_file
from shardstream.format.manifest import MANIFEST_NAME, Manifest, ShardInfo
from shardstream.storage.files import local_errors, missing_shard
from shardstream.storage.io import load_manifest

__all__ = ["Dataset", "open_dataset", "load_index", "read_block", "decompress",
           "iter_block_samples", "iter_dataset", "check_index_entry"]


@dataclass(frozen=True)
class Dataset:
    """A finished local dataset: its directory and manifest."""

    root: str
    manifest: Manifest

    def shard_path(self, info: ShardInfo) -> str:
        return os.path.join(self.root, info.name)

    def index_path(self, info: ShardInfo) -> str:
        return os.path.join(self.root, info.index)

    def __len__(self) -> int:
        return self.manifest.num_samples


def open_dataset(source: str | os.PathLike) -> Dataset:
    """Open a dataset directory (or its ``manifest.json``)."""
    path = os.fspath(source)
    if os.path.basename(path) == MANIFEST_NAME:
        path = os.path.dirname(path) or "."
    return Dataset(path, load_manifest(path))


def load_index(ds: Dataset, info: ShardInfo, *, check_size: bool = True) -> ShardIndex:
    """Read a shard's index; raise if the shard or index is missing or disagrees.

    The index must describe the shard the manifest lists (:func:`check_index_entry`).
    """
    shard_path, idx_path = ds.shard_path(info), ds.index_path(info)
    with local_errors(shard_path, "stat", missing=missing_shard(shard_path)):
        size = os.path.getsize(shard_path)
    data = read_index_file(idx_path, shard_path)
    index = ShardIndex.from_bytes(data, where=idx_path)
    if index.num_samples != info.num_samples:
        raise IndexMismatchError(f"index {idx_path} lists {index.num_samples} samples, the "
                                 f"manifest {info.num_samples}; rebuild with `shardstream index`")
    if check_size and (size != index.shard_bytes or size != info.bytes):
        raise IndexMismatchError(
            f"shard {shard_path} is {size} bytes but its index/manifest say "
            f"{index.shard_bytes}/{info.bytes}: the shard is truncated or replaced; restore "
            f"it, or rebuild the index with `shardstream index {shard_path}`")
    check_index_entry(index, data, info, idx_path=idx_path, shard_path=shard_path)
    return index


def check_index_entry(index: Any, data: bytes, info: Any, *, idx_path: str,
                      shard_path: str) -> None:
    """Raise :class:`IndexMismatchError` unless ``index`` (parsed from ``data``) is the
    one the manifest entry ``info`` lists: same sample count, shard size and sha256,
    and the index file's own size and sha256 (hashes the index, never the shard).

    ``info``: a :class:`ShardInfo`, or anything with ``num_samples``, ``bytes``,
    ``sha256``, ``index_bytes`` and ``index_sha256`` (``None``: not known, not checked).
    """
    checks = (("sample count", index.num_samples, info.num_samples),
              ("shard size", index.shard_bytes, info.bytes),
              ("shard sha256", index.shard_sha256, info.sha256),
              ("index size", len(data), info.index_bytes))
    for what, got, want in checks:
        if want is not None and got != want:
            raise _entry_mismatch(idx_path, shard_path, f"{what} {got!r}, the manifest "
                                                        f"says {want!r}")
    if info.index_sha256 and hashlib.sha256(data).hexdigest() != info.index_sha256:
        raise _entry_mismatch(idx_path, shard_path, "the index file's sha256 differs from "
                                                    "the manifest's")


def _entry_mismatch(idx_path: str, shard_path: str, what: str) -> IndexMismatchError:
    return IndexMismatchError(
        f"index {idx_path} does not match the manifest's entry for shard {shard_path} "
        f"({what}): the dataset changed under this reader (rewritten, e.g. with "
        "--overwrite): reopen it; or the index is stale or damaged: rebuild it with "
        f"`shardstream index {shard_path}`")


def read_block(f, index: ShardIndex, block: int, *, where: str = "",
               check: bool = True) -> bytes:
    """Read one block's (uncompressed) bytes from an open shard file.

    ``check``: compare the stored bytes with the block's checksum (index v4).
    """
    off, size = int(index.block_offset[block]), int(index.block_size[block])
    f.seek(off)
    data = f.read(size)
    if len(data) != size:
        raise CorruptShardError(f"shard {where}: block {block} at byte offset {off} is "
                                f"truncated ({len(data)} of {size} bytes); restore the shard "
                                "or rewrite the dataset")
    if check and index.checksummed:
        check_stored_block(index, block, data, where)
    return decompress(data, index, block, where=where)


def check_stored_block(index: ShardIndex, block: int, data: bytes | memoryview, where: str,
                       label: str = "", decoder: Any = None) -> None:
    """Compare a block's stored bytes with its checksum; a mismatch names the first
    frame or sample of the block that does not decode too (:func:`damage_detail`)."""
    try:
        index.check_block(block, data, where, label)
    except CorruptShardError as exc:
        detail = damage_detail(index, block, data, where, decoder=decoder)
        raise CorruptShardError(f"{exc}{'; ' + detail if detail else ''}") from None


def damage_detail(index: ShardIndex, block: int, data: bytes | memoryview, where: str, *,
                  label: Callable[[int], str] | None = None, decoder: Any = None) -> str | None:
    """Where a block that failed its checksum is visibly damaged: the first frame that
    does not decompress (framed) or the first sample that does not decode (raw), as
    text naming it (``label(i)`` names shard-local sample ``i``); None if none is."""
    view = memoryview(data)
    if index.framed:
        dec = decoder if decoder is not None else _decoder(index, where)
        for f in range(dec.block_frame[block], dec.block_frame[block + 1]):
            try:
                dec.frame(f, view[dec.rel_start[f]:dec.rel_end[f]])
            except CorruptShardError as exc:
                return str(exc)
        return None
    if index.compression is not None:
        return None
    first, stop = index.block_samples(block)
    cuts = [int(x) for x in index.sample_offset[first:stop]] + [len(view)]
    for k, (a, z) in enumerate(zip(cuts, cuts[1:])):
        try:
            decode_sample(view[a:z])
        except DecodeError as exc:
            name = label(first + k) if label else f"shard-local sample {first + k}"
            return (f"{name} at byte offset {int(index.block_offset[block]) + a} cannot be "
                    f"decoded ({exc})")
    return None


@lru_cache(maxsize=8)
def _decoder(index: ShardIndex, where: str) -> Any:
    return index.block_decoder(where)


def decompress(data: bytes, index: ShardIndex, block: int, *, where: str = "") -> bytes:
    """``data`` as stored for ``block``, uncompressed (itself when stored raw)."""
    if index.compression is None:
        return data
    first, stop = index.block_samples(block)
    return _decoder(index, where).decode(block, data, f"shard-local sample {first}")


def iter_block_samples(data: bytes, index: ShardIndex, block: int, *,
                       where: str = "") -> Iterator[dict]:
    """Decode the samples of one block; errors name shard, block and sample ordinal."""
    first, stop = index.block_samples(block)
    count = 0
    try:
        for sample in iter_samples(data):
            yield sample
            count += 1
    except DecodeError as exc:
        off = int(index.block_offset[block])
        raise CorruptShardError(f"shard {where}: block {block} (byte offset {off}), sample "
                                f"{first + count} (shard-local): {exc}; restore the shard or "
                                "rewrite the dataset") from exc
    if count != stop - first:
        raise CorruptShardError(f"shard {where}: block {block} holds {count} samples, the "
                                f"index says {stop - first}")


def iter_dataset(source: str | os.PathLike) -> Iterator[dict]:
    """Every sample of a local dataset in order (single process, no shuffling)."""
    ds = open_dataset(source)
    for info in ds.manifest.shards:
        index = load_index(ds, info)
        path = ds.shard_path(info)
        with open(path, "rb") as f:
            for b in range(index.num_blocks):
                yield from iter_block_samples(read_block(f, index, b, where=path), index, b,
                                              where=path)
