"""Reading local shards: open a dataset, load and check indexes, walk blocks.

The building blocks every reader shares (streaming, random access, verify,
cat). Object storage goes through :mod:`shardstream.storage` later; this
module handles local paths.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

from .codec import iter_samples
from .errors import CorruptShardError, DecodeError, IndexMismatchError, ShardNotFoundError, \
    StorageError
from .index import ShardIndex
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest

__all__ = ["Dataset", "open_dataset", "read_index_file", "load_index", "read_block", "decompress",
           "iter_block_samples", "iter_dataset", "sha256_file"]


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


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def read_index_file(idx_path: str, shard_path: str | None = None) -> bytes:
    """The bytes of an index file; a missing one names the command that rebuilds it."""
    try:
        with open(idx_path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        rebuild = f"`shardstream index {shard_path}`" if shard_path else "`shardstream index`"
        raise ShardNotFoundError(f"index {idx_path} is missing; rebuild it with "
                                 f"{rebuild}") from None
    except OSError as exc:
        raise StorageError(f"cannot read {idx_path}: {exc.strerror or exc}") from exc


def load_index(ds: Dataset, info: ShardInfo, *, check_size: bool = True) -> ShardIndex:
    """Read a shard's index; raise if the shard or index is missing or disagrees."""
    shard_path, idx_path = ds.shard_path(info), ds.index_path(info)
    try:
        size = os.path.getsize(shard_path)
    except FileNotFoundError:
        raise ShardNotFoundError(f"shard {shard_path} is listed in the manifest but missing; "
                                 "restore it or rewrite the dataset") from None
    index = ShardIndex.from_bytes(read_index_file(idx_path, shard_path), where=idx_path)
    if check_size and (size != index.shard_bytes or size != info.bytes):
        raise IndexMismatchError(
            f"shard {shard_path} is {size} bytes but its index/manifest say "
            f"{index.shard_bytes}/{info.bytes}: the shard is truncated or replaced; restore "
            f"it, or rebuild the index with `shardstream index {shard_path}`")
    if index.num_samples != info.num_samples:
        raise IndexMismatchError(f"index {idx_path} lists {index.num_samples} samples, the "
                                 f"manifest {info.num_samples}; rebuild with `shardstream index`")
    return index


def read_block(f, index: ShardIndex, block: int, *, where: str = "") -> bytes:
    """Read one block's (uncompressed) bytes from an open shard file."""
    off, size = int(index.block_offset[block]), int(index.block_size[block])
    f.seek(off)
    data = f.read(size)
    if len(data) != size:
        raise CorruptShardError(f"shard {where}: block {block} is truncated "
                                f"({len(data)} of {size} bytes)")
    return decompress(data, index, block, where=where)


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
        raise CorruptShardError(f"shard {where}: block {block}, sample {first + count} "
                                f"(shard-local): {exc}") from exc
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
