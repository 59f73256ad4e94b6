"""Reading indexed webdataset tars: samples of an index, the blocks a stream reads,
and a manifest for a list of indexed tars.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterator

import numpy as np

from shardstream import __version__
from shardstream.errors import (CorruptShardError, IndexMismatchError, ShardNotFoundError,
                                StorageError)
from shardstream.format.index import INDEX_SUFFIX, read_index_file, verify_blocks_default
from shardstream.format.manifest import Manifest, ShardInfo
from shardstream.format.members import decode_member
from shardstream.format.webdataset import (LAYOUT_WEBDATASET, ForeignIndex, decode_foreign_sample,
                                           index_from_bytes, is_foreign_index)

__all__ = ["iter_foreign_samples"]


def iter_foreign_samples(shard_path: str, foreign_index: ForeignIndex, start: int = 0,
                         stop: int | None = None, *, decode: bool = True,
                         verify: bool | None = None) -> Iterator[dict]:
    """Yield samples ``[start, stop)`` (shard-local) of a webdataset-layout tar.

    Reads the byte span covering those samples with one read, then decodes by
    extension (``decode=False`` yields raw bytes). Each sample's members are
    compared with their checksums (version-2 indexes) unless ``verify`` is False
    (default: :func:`~shardstream.format.index.verify_blocks_default`).
    """
    check = verify_blocks_default() if verify is None else verify
    n = foreign_index.num_samples
    stop = n if stop is None else min(stop, n)
    if not 0 <= start <= stop:
        raise ValueError(f"bad sample range [{start}, {stop}) for a shard of {n} samples")
    if start == stop:
        return
    m0, m1 = int(foreign_index.member_first[start]), int(foreign_index.member_first[stop])
    base = int(foreign_index.member_offset[m0])
    end = int((foreign_index.member_offset[m0:m1] + foreign_index.member_size[m0:m1]).max())
    try:
        with open(shard_path, "rb") as f:
            f.seek(base)
            buf = f.read(end - base)
    except FileNotFoundError:
        raise ShardNotFoundError(f"shard {shard_path} is missing") from None
    except OSError as exc:
        raise StorageError(f"cannot read {shard_path}: {exc.strerror or exc}") from exc
    view = memoryview(buf)
    for j in range(start, stop):
        s = decode_foreign_sample(view, foreign_index, j, base=base, decode=False,
                                  where=shard_path, check=check)
        if decode:
            key = s["__key__"]
            s = {k: v if k == "__key__" else
                 decode_member(k, bytes(v), where=f"{shard_path}: sample {j} ({key!r}) member")
                 for k, v in s.items()}
        else:
            s = {k: v if k == "__key__" else bytes(v) for k, v in s.items()}
        yield s


# ---------------------------------------------------------------- the stream reader
#: bytes of tar the stream reader reads (and caches) at once: a run of whole samples
STREAM_BLOCK_BYTES = 64 << 10


class ForeignBlocks:
    """A webdataset tar as :class:`~shardstream.read.blocks.BlockReader` reads it.

    Set as ``OpenShard.codec`` by :func:`set_stream_index`, which cuts the tar into
    *blocks*: runs of consecutive samples spanning about
    :data:`STREAM_BLOCK_BYTES` (tar headers between members included). The reader
    reads, caches and block-shuffles them as it does a shardstream shard's blocks;
    :meth:`decode_run` decodes their members by extension, never by msgpack.

    With ``verify`` (and an index with checksums), ``fresh`` has a byte per sample:
    :meth:`decode` sets those of a block just read from disk, and :meth:`decode_run`
    compares such a sample's members with their checksums before decoding them, once.
    """

    foreign = True

    def __init__(self, index: ForeignIndex, block_first: np.ndarray | None = None,
                 verify: bool = False) -> None:
        self.index = index
        self.block_first = block_first
        self.fresh = bytearray(index.num_samples) if verify and index.checksummed else None

    def decode(self, block: int, data: bytes, label: str) -> bytes:
        """Blocks are stored raw; mark the block's samples as not checked yet."""
        if self.fresh is not None:
            first = self.block_first
            j0 = int(first[block])  # type: ignore[index]
            j1 = int(first[block + 1]) if block + 1 < len(first) else self.index.num_samples
            self.fresh[j0:j1] = b"\x01" * (j1 - j0)
        return data

    def decode_run(self, ref: Any, block: int, data: bytes, i0: int, i1: int, out: list,
                   k0: int, fail: Callable[[int, Exception], None]) -> int:
        """Decode samples ``[i0, i1)`` of ``block`` (its bytes: ``data``) into
        ``out[k0:]``; on damage call ``fail(sample, error)``. Returns samples decoded."""
        base = int(ref.block_offset[block])
        fresh = self.fresh
        for j in range(i0, i1):
            check = fresh is not None and fresh[j] == 1
            try:
                out[k0 + j - i0] = decode_foreign_sample(data, self.index, j, base=base,
                                                         where=ref.path, check=check)
            except CorruptShardError as exc:
                fail(j, CorruptShardError(f"{exc} ({ref.label(j)})"))
                return j - i0
            if check:
                fresh[j] = 0  # type: ignore[index]
        return i1 - i0


def set_stream_index(ref: Any, index: ForeignIndex, size: int, verify: bool = True) -> None:
    """Fill a :class:`~shardstream.read.shards.OpenShard`'s block arrays from a webdataset
    tar's index (``size``: the tar's bytes now); see :class:`ForeignBlocks`.
    ``verify``: check member checksums of every block read from disk."""
    if size > index.shard_bytes:
        raise IndexMismatchError(f"shard {ref.path} is {size} bytes, its index says "
                                 f"{index.shard_bytes}: the tar was replaced; rebuild the "
                                 f"index with `shardstream index {ref.path}`")
    n = index.num_samples
    first = index.member_first.astype(np.int64)
    off = index.member_offset.astype(np.int64)
    start = off[first[:-1]]
    end = off[first[1:] - 1] + index.member_size.astype(np.int64)[first[1:] - 1]
    if n:
        change = np.flatnonzero(np.diff((start - start[0]) // STREAM_BLOCK_BYTES)) + 1
        block_first = np.concatenate([[0], change]).astype(np.int64)
    else:
        block_first = np.zeros(0, np.int64)
    counts = np.diff(np.append(block_first, n))
    block_of = np.repeat(np.arange(len(block_first)), counts)
    ref.block_first, ref.block_of = block_first, block_of
    ref.block_offset = start[block_first]
    ref.block_size = end[np.append(block_first[1:], n) - 1] - ref.block_offset
    ref.rel_start = start - ref.block_offset[block_of]
    ref.rel_end = end - ref.block_offset[block_of]
    ref.size = size
    ref.codec = ForeignBlocks(index, block_first, verify)
    ref.index = None  # no block checksums: ForeignBlocks.decode_run checks the members
    if size < index.shard_bytes:
        short = np.flatnonzero(end > size)
        ref.trunc_from = int(short[0]) if len(short) else None


def list_manifest(tars: list[str]) -> Manifest | None:
    """An in-memory manifest for local webdataset tars each indexed in place
    (``<tar>.idx`` written by ``shardstream index``), so a list of them streams with
    exact epochs; None unless every tar has such an index."""
    if not tars:
        return None
    for tar in tars:
        try:
            with open(tar + INDEX_SUFFIX, "rb") as f:
                if not is_foreign_index(f.read(64)):
                    return None
        except OSError:
            return None
    infos = []
    for tar in tars:
        idx_path = tar + INDEX_SUFFIX
        data = read_index_file(idx_path, tar)
        idx = index_from_bytes(data, idx_path)
        if not isinstance(idx, ForeignIndex):
            raise CorruptShardError(f"{idx_path}: not a webdataset-layout index; rebuild it "
                                    f"with `shardstream index {tar}`")
        infos.append(ShardInfo(name=os.path.abspath(tar), num_samples=idx.num_samples,
                               bytes=idx.shard_bytes, sha256=idx.shard_sha256,
                               num_blocks=idx.num_members, index=os.path.abspath(idx_path),
                               index_bytes=len(data),
                               index_sha256=hashlib.sha256(data).hexdigest()))
    return Manifest(shards=infos, block_bytes=0, layout=LAYOUT_WEBDATASET,
                    created_by=f"shardstream {__version__} (indexed webdataset tars, in memory)")
