"""ShardDataset: map-style random access, ``ds[i]`` straight from an ``mmap``.

Each shard is memory-mapped (read-only) the first time a sample of it is
needed; its index becomes two arrays of absolute sample start/end offsets
(16 bytes per sample). ``ds[i]`` finds the shard by bisecting the shards'
first ordinals, slices the map and decodes with msgpack. Sample bytes are
copied out of the map once (a ``bytes`` slice), so arrays are read-only
numpy views of that copy, never of the file: use ``np.array(x)`` or
``x.copy()`` for a writable array. The heap holds only the indexes; shard
data stays in the page cache.

Fork safety: maps and file handles belong to the process that opened them.
Each access compares ``os.getpid()`` with the opener's pid and, in a forked
DataLoader worker, drops the inherited maps and re-opens lazily; pickling
(spawn workers) carries only the paths and manifest.
"""

from __future__ import annotations

import mmap
import os
from bisect import bisect_right
from operator import index as as_index
from typing import Any, Callable

import msgpack
import numpy as np

from shardstream.errors import (CorruptShardError, DecodeError, IndexMismatchError,
                                ShardNotFoundError)
from shardstream.format.codec import UNPACK_OPTIONS, decode_sample
from shardstream.format.index import ShardIndex, read_index_file, verify_blocks_default
from shardstream.format.manifest import ShardInfo
from shardstream.format.webdataset import WDS_INDEX_FORMAT, ForeignIndex, decode_foreign_sample
from shardstream.read.dataset import Dataset, check_index_entry
from shardstream.read.mapped import BlockShard, CompressedShard, ForeignShard, FramedShard
from shardstream.read.sources import resolve_cached
from shardstream.storage.files import local_errors, missing_shard, sha256_file

__all__ = ["ShardDataset"]


try:  # a map-style torch Dataset when torch is installed; plain class otherwise
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object  # type: ignore[misc,assignment]


_unpackb = msgpack.unpackb
_OPTS = UNPACK_OPTIONS


class ShardDataset(_TorchDataset):
    """Map-style dataset over a local shardstream dataset (or indexed webdataset tars).

    >>> ds = ShardDataset("out/")            # doctest: +SKIP
    >>> len(ds), ds[0], ds[-1], ds[10:20]    # doctest: +SKIP

    ``transform`` is applied to every sample; ``with_key=True`` adds
    ``"__key__"`` (the key field's value, else the global ordinal
    ``f"{i:09d}"``). ``check_files`` stats every shard and index at
    construction so a missing one fails now rather than mid-epoch;
    ``verify=True`` also compares each shard's sha256 with its index when
    the shard is first opened (reads the whole shard once).

    ``verify_blocks`` (default: on, unless ``$SHARDSTREAM_VERIFY_BLOCKS=0``):
    the first ``ds[i]`` touching a block in this process compares the block
    with its checksum (index v4); a damaged block raises
    :class:`CorruptShardError` naming shard, block, byte offset and first sample.
    For an indexed webdataset tar (index version 2) the first ``ds[i]`` of each
    sample compares each of its members with its checksum; a mismatch names the
    tar, the sample's key, the member and its byte offset.
    """

    def __init__(self, source: str | os.PathLike | Dataset, *,
                 transform: Callable[[dict], Any] | None = None, with_key: bool = False,
                 check_files: bool = True, verify: bool = False,
                 cache_dir: str | None = None, verify_blocks: bool | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        # _hold: the cache entry in use
        self._ds, self._hold = resolve_cached(source, cache_dir, storage_options)
        m = self._ds.manifest
        self.transform = transform
        self.with_key = with_key
        self.verify = verify
        self.verify_blocks = verify_blocks_default() if verify_blocks is None else verify_blocks
        self.key_field = m.key_field
        self._infos: list[ShardInfo] = list(m.shards)
        self._starts: list[int] = m.shard_starts()
        self._n = m.num_samples
        # skip empty shards in the lookup: bisect must land on a shard holding i
        self._lookup = [s for s, info in zip(self._starts, self._infos) if info.num_samples]
        self._lookup_shard = [k for k, info in enumerate(self._infos) if info.num_samples]
        self._pid = os.getpid()
        self._open: list[BlockShard | CompressedShard | FramedShard | ForeignShard | None] = \
            [None] * len(self._infos)
        if check_files:
            self.check_files()

    # -- public helpers --------------------------------------------------------
    @property
    def dataset(self) -> Dataset:
        return self._ds

    def __len__(self) -> int:
        return self._n

    def check_files(self) -> None:
        """Raise :class:`ShardNotFoundError` naming the first missing shard or index."""
        for info in self._infos:
            for path, what in ((self._ds.shard_path(info), "shard"),
                               (self._ds.index_path(info), "index")):
                if not os.path.exists(path):
                    fix = ("restore it or rewrite the dataset" if what == "shard" else
                           f"rebuild it with `shardstream index {self._ds.shard_path(info)}`")
                    raise ShardNotFoundError(f"{what} {path} is listed in the manifest but "
                                             f"missing; {fix}")

    def index_nbytes(self) -> int:
        """Heap bytes held by the indexes of the shards opened so far."""
        total = 0
        for sh in self._open:
            if sh is None:
                continue
            if sh.foreign:
                ix = sh.index
                total += sum(a.nbytes for a in (ix.key_offset, ix.member_first, ix.member_offset,
                                                ix.member_size, ix.member_ext))
                total += len(ix.key_blob)
                total += 0 if ix.member_checksum is None else ix.member_checksum.nbytes
            elif isinstance(sh, CompressedShard):
                total += sh.block_of.nbytes + sh.rel_start.nbytes + sh.rel_end.nbytes
            elif isinstance(sh, FramedShard):
                total += sum(a.nbytes for a in (sh.frame_of, sh.start, sh.end, sh.in_start,
                                                sh.in_end))
            else:
                total += sh.start.nbytes + sh.end.nbytes
        return total

    def close(self) -> None:
        """Unmap every shard (they re-open on the next access)."""
        for sh in self._open:
            if sh is not None and self._pid == os.getpid():
                _unmap(sh)
        self._open = [None] * len(self._infos)

    # -- access ----------------------------------------------------------------
    def __getitem__(self, i: Any) -> Any:
        if type(i) is not int:
            if isinstance(i, slice):
                return [self[j] for j in range(*i.indices(self._n))]
            i = as_index(i)
        n = self._n
        if i < 0:
            i += n
            if i < 0:
                raise IndexError(f"index {i - n} out of range for a dataset of {n} samples")
        elif i >= n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        if self._pid != os.getpid():
            self._after_fork()
        p = bisect_right(self._lookup, i) - 1
        s = self._lookup_shard[p]
        sh = self._open[s]
        if sh is None:
            sh = self._open_shard(s)
        j = i - self._lookup[p]
        if sh.foreign:
            sample = self._foreign(sh, j, i)
        else:
            # compressed shards have no ``start``: their bytes come from a decompressed frame
            if sh.__class__ is BlockShard:
                a = sh.start[j]
                ok = sh.ok
                if ok is not None and not ok[a >> 12]:  # GRANULE_SHIFT
                    sh.verified.check(a)
                raw = sh.mm[a:sh.end[j]]
            elif sh.__class__ is FramedShard and sh.frame_of[j] == sh.last:
                raw = sh.last_data[sh.in_start[j]:sh.in_end[j]]  # neighbour in the same frame
            else:
                raw = sh.sample_bytes(j)
            try:
                sample = _unpackb(raw, **_OPTS)
            except Exception as exc:
                raise self._corrupt(s, j, i, exc) from exc
            if type(sample) is not dict:
                raise self._corrupt(s, j, i, TypeError("not a msgpack map"))
            if self.with_key and self.key_field not in sample:
                sample["__key__"] = f"{i:09d}"
            elif self.with_key and self.key_field != "__key__":
                sample["__key__"] = sample[self.key_field]
        return sample if self.transform is None else self.transform(sample)

    def _foreign(self, sh: ForeignShard, j: int, i: int) -> dict:
        done = sh.done
        check = done is not None and not done[j]
        try:
            sample = decode_foreign_sample(sh.mm, sh.index, j, where=sh.path, check=check)
        except CorruptShardError as exc:
            raise CorruptShardError(f"{exc} (global sample {i})") from exc
        if check:
            done[j] = 1  # type: ignore[index]
        return sample

    def _corrupt(self, s: int, j: int, i: int, exc: BaseException) -> CorruptShardError:
        path = self._ds.shard_path(self._infos[s])
        return CorruptShardError(f"shard {path}: sample {j} (global {i}) cannot be decoded: "
                                 f"{type(exc).__name__}: {exc}; check it with `shardstream "
                                 f"verify`, or rebuild the index with `shardstream index "
                                 f"{path}`")

    # -- opening ---------------------------------------------------------------
    def _after_fork(self) -> None:
        # inherited maps belong to the parent: forget them (never close: same pages)
        self._open = [None] * len(self._infos)
        self._pid = os.getpid()

    def _open_shard(self, s: int) -> BlockShard | CompressedShard | FramedShard | ForeignShard:
        info = self._infos[s]
        path, idx_path = self._ds.shard_path(info), self._ds.index_path(info)
        if self._hold is not None:  # a cached copy removed: say so, not "rebuild the index"
            self._hold.check(path, idx_path)
        data = read_index_file(idx_path, path)
        index = _parse_index(data, idx_path)
        foreign = isinstance(index, ForeignIndex)
        if index.num_samples != info.num_samples:
            raise IndexMismatchError(
                f"index {idx_path} lists {index.num_samples} samples, the manifest "
                f"{info.num_samples}; rebuild it with `shardstream index {path}`")
        check_index_entry(index, data, info, idx_path=idx_path, shard_path=path)
        mm = self._map(path, index, info, s)
        check = self.verify_blocks
        if foreign:
            sh: BlockShard | CompressedShard | FramedShard | ForeignShard = \
                ForeignShard(mm, index, path, check)
        elif index.framed:
            sh = FramedShard(mm, index, path, self._starts[s], check)
        elif index.compression is not None:
            sh = CompressedShard(mm, index, path, self._starts[s])
        else:
            sh = BlockShard(mm, index, path, self._starts[s], check)
        self._open[s] = sh
        return sh

    def _map(self, path: str, index: ShardIndex | ForeignIndex, info: ShardInfo,
             s: int) -> mmap.mmap:
        with local_errors(path, "open", missing=missing_shard(path)):
            fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            self._check_size(path, size, index, info, s)
            if self.verify and index.shard_sha256 and sha256_file(path) != index.shard_sha256:
                raise IndexMismatchError(f"shard {path}: sha256 differs from its index; the "
                                         "shard was replaced or damaged: restore it, or "
                                         f"rebuild the index with `shardstream index {path}`")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else _EMPTY
        finally:
            os.close(fd)
        return mm  # no MADV_RANDOM: kernel fault-around helps warm and sequential reads

    def _check_size(self, path: str, size: int, index: ShardIndex | ForeignIndex,
                    info: ShardInfo, s: int) -> None:
        if size == index.shard_bytes == info.bytes:
            return
        j = _first_past(index, size) if size < info.bytes == index.shard_bytes else None
        if j is not None:
            raise CorruptShardError(
                f"shard {path} is truncated: {size} of {info.bytes} bytes; sample {j} "
                f"(global {self._starts[s] + j}) onwards lie past its end; restore the shard, "
                f"or re-index what is left with `shardstream index {path}`")
        raise IndexMismatchError(
            f"shard {path} is {size} bytes but its index/manifest say {index.shard_bytes}/"
            f"{info.bytes}: the index does not describe this shard; restore the shard, or "
            f"rebuild the index with `shardstream index {path}`")

    # -- pickling (spawn / forkserver workers) ---------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = [None] * len(self._infos)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


_EMPTY = b""


def _unmap(sh: Any) -> None:
    """Close a shard's map; one a traceback still points into is left to the GC."""
    view = getattr(sh, "view", None)
    try:
        if view is not None:
            view.release()
        sh.mm.close()
    except BufferError:
        pass


def _parse_index(data: bytes, idx_path: str) -> ShardIndex | ForeignIndex:
    """Either kind of index from its file's bytes; the ``format`` field tells which."""
    try:
        d = decode_sample(data)
    except DecodeError as exc:
        raise CorruptShardError(f"{idx_path}: unreadable index ({exc}); rebuild it with "
                                "`shardstream index`") from exc
    if d.get("format") == WDS_INDEX_FORMAT:
        return ForeignIndex.from_dict(d, where=idx_path)
    return ShardIndex.from_bytes(data, where=idx_path)


def _first_past(index: ShardIndex | ForeignIndex, size: int) -> int | None:
    """Shard-local ordinal of the first sample whose bytes end past ``size``."""
    if isinstance(index, ForeignIndex):
        past = np.flatnonzero(index.member_offset + index.member_size > size)
        if not past.size:
            return None
        return int(np.searchsorted(index.member_first, past[0], side="right")) - 1
    past = np.flatnonzero(index.stored_ends() > size)
    return int(past[0]) if past.size else None
