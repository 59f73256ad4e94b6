"""Shards as readers see them: what the manifest says, and what one reader opened.

:class:`ShardRef` is the frozen description of a shard (paths and the manifest's
values, named as in :class:`~shardstream.format.manifest.ShardInfo`); :class:`OpenShard`
is one reader's state for it (file descriptor, block arrays from the index, damage
marks). :func:`open_local` and :func:`open_remote` check the index against the
manifest entry and the file before any sample is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstream.errors import IndexMismatchError
from shardstream.format.index import ShardIndex, read_index_file
from shardstream.format.webdataset import index_from_bytes
from shardstream.read.dataset import check_index_entry
from shardstream.read.webdataset import set_stream_index
from shardstream.storage.cache import RemoteCache
from shardstream.storage.files import local_errors, missing_shard

__all__ = ["ShardRef", "OpenShard", "shard_refs", "open_local", "open_remote"]


@dataclass(frozen=True)
class ShardRef:
    """One shard a reader may touch: its paths, the manifest's values and global base.

    ``path`` may be a URL (``s3://``, ``http://``...): see :mod:`shardstream.storage.cache`;
    ``sha256``/``index_sha256`` then name the cached copies. The manifest's values
    (None: unknown, e.g. a bare tar) must match the index: sample count, shard size and
    sha256, index size and sha256 (:func:`~shardstream.read.dataset.check_index_entry`).
    ``base`` is the global ordinal of the shard's first sample, when known.
    """

    path: str
    index_path: str
    num_samples: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    index_bytes: int | None = None
    index_sha256: str | None = None
    base: int | None = None

    def label(self, i: int) -> str:
        """How errors name sample ``i``: its dataset key (global ordinal) if known."""
        if self.base is None:
            return f"shard-local sample {i}"
        return f"sample {self.base + i:09d} (global ordinal; shard-local {i})"


def shard_refs(dataset: Any) -> list[ShardRef]:
    """One :class:`ShardRef` per shard of a dataset with a manifest, in manifest order."""
    refs, base = [], 0
    for info in dataset.manifest.shards:
        refs.append(ShardRef(dataset.shard_path(info), dataset.index_path(info),
                             num_samples=info.num_samples, bytes=info.bytes,
                             sha256=info.sha256, index_bytes=info.index_bytes,
                             index_sha256=info.index_sha256, base=base))
        base += info.num_samples
    return refs


class OpenShard:
    """A shard opened by one reader: its descriptor, block arrays and damage marks.

    ``block_of`` is None when the shard could not be opened (every sample is then
    skipped or raised); ``bad_from`` is the first shard-local sample skipped after an
    error (``on_error="warn"``), ``trunc_from`` the first one a truncated file lacks.
    ``index`` is kept only when its block checksums are to be checked.
    """

    __slots__ = ("ref", "fd", "size", "block_first", "block_of", "block_offset", "block_size",
                 "rel_start", "rel_end", "codec", "index", "bad_from", "trunc_from")

    def __init__(self, ref: ShardRef) -> None:
        self.ref = ref
        self.fd = -1
        self.size = 0
        self.block_of: np.ndarray | None = None
        self.codec: Any = None
        self.index: ShardIndex | None = None
        self.bad_from: int | None = None
        self.trunc_from: int | None = None

    @property
    def path(self) -> str:
        return self.ref.path

    def label(self, i: int) -> str:
        return self.ref.label(i)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_local(shard: OpenShard, verify: bool) -> None:
    """Open a local shard: check its index against the manifest entry and the file."""
    ref = shard.ref
    with local_errors(ref.path, "stat", missing=missing_shard(ref.path)):
        size = os.path.getsize(ref.path)
    data = read_index_file(ref.index_path, ref.path)
    index = index_from_bytes(data, ref.index_path)
    check_index_entry(index, data, ref, idx_path=ref.index_path, shard_path=ref.path)
    _set_index(shard, index, size, verify)
    with local_errors(ref.path, "open", missing=missing_shard(ref.path)):
        shard.fd = os.open(ref.path, os.O_RDONLY)


def open_remote(shard: OpenShard, store: RemoteCache, verify: bool,
                taken: str | None = None) -> None:
    """Open a remote shard: its index by one request (cached), the shard whole into the
    node-local cache (``taken``: a copy a prefetcher already downloaded)."""
    ref = shard.ref
    data = store.index_bytes(ref.index_path, sha256=ref.index_sha256, size=ref.index_bytes)
    assert data is not None
    index = index_from_bytes(data, ref.index_path)
    check_index_entry(index, data, ref, idx_path=ref.index_path, shard_path=ref.path)
    size = ref.bytes if ref.bytes is not None else index.shard_bytes
    fd = store.open_shard(ref.path, size=size, sha256=ref.sha256, path=taken)
    try:
        _set_index(shard, index, os.fstat(fd).st_size, verify)
    except BaseException:
        os.close(fd)
        raise
    shard.fd = fd


def _set_index(shard: OpenShard, index: Any, size: int, verify: bool) -> None:
    """Check ``index`` against the shard's ``size``; fill the block arrays from it."""
    if not isinstance(index, ShardIndex):  # a webdataset tar indexed in place
        return set_stream_index(shard, index, size, verify)
    if size > index.shard_bytes:
        raise IndexMismatchError(f"shard {shard.path} is {size} bytes, its index says "
                                 f"{index.shard_bytes}: the shard was replaced; rebuild the "
                                 "index with `shardstream index`")
    n = index.num_samples
    firsts = index.block_first.astype(np.int64)
    counts = np.diff(np.append(firsts, n))
    shard.block_first = firsts
    shard.block_of = np.repeat(np.arange(index.num_blocks), counts)
    shard.block_offset = index.block_offset.astype(np.int64)
    shard.block_size = index.block_size.astype(np.int64)
    shard.rel_start = index.sample_offset.astype(np.int64)
    rel_end = np.empty(n, dtype=np.int64)
    rel_end[:-1] = shard.rel_start[1:]
    last = np.append(firsts[1:], n) - 1
    rel_end[last] = index.raw_block_size  # offsets are into uncompressed blocks
    shard.rel_end = rel_end
    shard.size = size
    shard.codec = index.block_decoder(shard.path)  # None: blocks stored raw
    shard.index = index if verify and index.checksummed else None
    if size < index.shard_bytes:
        short = np.flatnonzero(index.stored_ends() > size)
        shard.trunc_from = int(short[0]) if len(short) else None
