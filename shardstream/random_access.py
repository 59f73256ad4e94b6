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
import threading
from collections import OrderedDict
from bisect import bisect_right
from operator import index as as_index
from typing import Any, Callable

import msgpack
import numpy as np
from xxhash import xxh3_64_intdigest as xxh3

from .codec import _unpack_options, decode_sample
from .errors import CorruptShardError, DecodeError, IndexMismatchError, ShardNotFoundError, \
    StorageError
from .index import ShardIndex
from .manifest import ShardInfo
from .pipeline import verify_blocks_default
from .shard import Dataset, check_index_entry, open_dataset, read_index_file, \
    sha256_file
from .wdsindex import WDS_INDEX_FORMAT, ForeignIndex, decode_foreign_sample

try:  # a map-style torch Dataset when torch is installed; plain class otherwise
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object  # type: ignore[misc,assignment]

__all__ = ["ShardDataset"]

_REMOTE = ("s3://", "gs://", "http://", "https://")
_get_ident = threading.get_ident
_unpackb = msgpack.unpackb
_OPTS = _unpack_options
#: decompressed blocks kept per shard of a compressed dataset
CACHED_BLOCKS = 4
#: a raw shard's verified-bitmap has one entry per 2**GRANULE_SHIFT bytes of the shard
GRANULE_SHIFT = 12


class _Verified:
    """Which blocks of one mapped shard passed their checksum (each is hashed once).

    ``ok[g]`` is 1 once every block overlapping byte granule ``g`` (4 KiB) has
    been verified, so ``ds[i]`` tests one byte (``ok[start >> 12]``) instead of
    finding its block; samples in a granule still pending take :meth:`check`.
    About 5 bytes per 4 KiB of shard plus 1 per block (not counted by ``index_nbytes``).
    """

    __slots__ = ("ok", "pending", "done", "index", "view", "path", "base", "offsets")

    def __init__(self, index: ShardIndex, view: memoryview, path: str, base: int) -> None:
        self.index, self.view, self.path, self.base = index, view, path, base
        off = index.block_offset.astype(np.int64)
        end = off + index.block_size.astype(np.int64)
        g0, g1 = off >> GRANULE_SHIFT, (end - 1) >> GRANULE_SHIFT
        count = np.zeros(((index.shard_bytes - 1) >> GRANULE_SHIFT) + 2, np.int64)
        np.add.at(count, g0, 1)
        np.add.at(count, g1 + 1, -1)
        self.pending = np.cumsum(count)[:-1].astype(np.int32)  # unverified blocks per granule
        self.ok = bytearray((self.pending == 0).astype(np.uint8).tobytes())
        self.done = bytearray(index.num_blocks)
        self.offsets = _ints(off)

    def check(self, pos: int) -> None:
        """Verify the block holding shard byte ``pos`` unless done; raise if damaged."""
        b = bisect_right(self.offsets, pos) - 1
        if self.done[b]:
            return
        ix = self.index
        off = self.offsets[b]
        ix.check_block(b, self.view[off:off + int(ix.block_size[b])], self.path,
                       _first_label(ix, b, self.base))
        self.done[b] = 1
        g0, g1 = off >> GRANULE_SHIFT, (off + int(ix.block_size[b]) - 1) >> GRANULE_SHIFT
        p = self.pending[g0:g1 + 1]
        p -= 1
        for g in (g0 + np.flatnonzero(p == 0)).tolist():
            self.ok[g] = 1


class _BlockShard:
    """One mapped shardstream shard: sample i is ``mm[start[i]:end[i]]``.

    ``verified`` (checksummed shards, unless verification is off): which blocks
    passed their checksum; ``ds[i]`` checks its block on first touch.
    """

    __slots__ = ("mm", "start", "end", "path", "view", "verified", "ok")
    foreign = False

    def __init__(self, mm: mmap.mmap, index: ShardIndex, path: str, base: int = 0,
                 verify: bool = False) -> None:
        starts, ends = index.sample_spans()
        self.mm = mm
        # memoryviews index to Python ints (no numpy scalar per access), 8 bytes each
        self.start = memoryview(starts.astype("=u8", copy=False)).cast("B").cast("Q")
        self.end = memoryview(ends.astype("=u8", copy=False)).cast("B").cast("Q")
        self.path = path
        self.view: memoryview | None = None
        self.verified: _Verified | None = None
        self.ok: bytearray | None = None  # verified.ok, one attribute away for ds[i]
        if verify and index.checksummed and index.num_blocks:
            self.view = memoryview(mm)  # released by close() before the map is closed
            self.verified = _Verified(index, self.view, path, base)
            self.ok = self.verified.ok


class _CompressedShard:
    """One mapped shard of compressed blocks: ``ds[i]`` decompresses its block only.

    The last ``CACHED_BLOCKS`` decompressed blocks stay cached (LRU), so
    neighbouring reads cost one decompression.
    """

    __slots__ = ("mm", "path", "index", "decoder", "block_of", "rel_start", "rel_end",
                 "base", "cache")
    foreign = False

    def __init__(self, mm: mmap.mmap, index: ShardIndex, path: str, base: int) -> None:
        n = index.num_samples
        firsts = index.block_first.astype(np.int64)
        self.mm, self.path, self.index, self.base = mm, path, index, base
        self.decoder = index.block_decoder(path)
        starts = index.sample_offset.astype(np.int64)
        ends = np.empty(n, dtype=np.int64)
        ends[:-1] = starts[1:]
        ends[np.append(firsts[1:], n) - 1] = index.raw_block_size
        self.block_of, self.rel_start, self.rel_end = (
            _ints(a) for a in (index._block_of(), starts, ends))
        self.cache: OrderedDict[int, bytes] = OrderedDict()

    def sample_bytes(self, j: int) -> memoryview:
        """Sample ``j``'s encoded bytes, decompressing its block unless cached."""
        b = self.block_of[j]
        data = self.cache.get(b)
        if data is None:
            data = self._load(b, j)
        else:
            self.cache.move_to_end(b)
        return memoryview(data)[self.rel_start[j]:self.rel_end[j]]

    def _load(self, b: int, j: int) -> bytes:
        ix = self.index
        off, size = int(ix.block_offset[b]), int(ix.block_size[b])
        label = (f"sample {self.base + int(ix.block_first[b]):09d}; requested sample "
                 f"{self.base + j:09d}")
        view = memoryview(self.mm)[off:off + size]
        try:
            data = self.decoder.decode(b, view, label)
        finally:
            view.release()  # even if a traceback holds it: close() must not fail
        self.cache[b] = data
        if len(self.cache) > CACHED_BLOCKS:
            self.cache.popitem(last=False)
        return data


class _FramedShard:
    """One mapped shard of framed blocks (format v3): ``ds[i]`` decompresses one frame.

    A frame holds about ``frame_bytes`` of samples; the last decompressed
    frame stays cached, so reading neighbours in order costs one decompression.
    """

    __slots__ = ("mm", "view", "path", "decoder", "frame_of", "start", "end", "in_start",
                 "in_end", "base", "last", "last_data", "index", "done")
    foreign = False

    def __init__(self, mm: mmap.mmap, index: ShardIndex, path: str, base: int,
                 verify: bool = False) -> None:
        self.mm, self.path, self.base = mm, path, base
        # per block: 0 not checked yet, 1 checksum ok, 2 checksum failed (frames checked alone)
        self.index = index if verify and index.checksummed else None
        self.done = bytearray(index.num_blocks)
        self.view = memoryview(mm)  # released by close() before the map is closed
        self.decoder = index.block_decoder(path)
        t = self.decoder.table
        boff = index.block_offset.astype(np.int64)[t.block]
        offs = index.sample_offset.astype(np.int64)
        n = index.num_samples
        ends = np.empty(n, dtype=np.int64)
        ends[:-1] = offs[1:]
        ends[t.first[1:] - 1] = t.raw_end[:-1]  # a frame's last sample ends with the frame
        if n:
            ends[-1] = t.raw_end[-1]
        raw0 = t.raw_start[t.frame_of]
        self.frame_of = _ints(t.frame_of)
        self.start, self.end = _ints(boff + t.rel_start), _ints(boff + t.rel_end)
        self.in_start, self.in_end = _ints(offs - raw0), _ints(ends - raw0)
        self.last, self.last_data = -1, b""

    def sample_bytes(self, j: int) -> bytes | memoryview:
        """Sample ``j``'s encoded bytes, decompressing its frame unless it is the last one."""
        f = self.frame_of[j]
        if f == self.last:
            out = self.last_data
        else:
            dec = self.decoder
            if self.index is not None and not self.done[dec.frame_block[f]]:
                self._check_block(dec.frame_block[f], j)
            data = self.view[self.start[f]:self.end[f]]
            n = dec.raw_len[f]
            out = None
            # fast path for ds[i]; anything unexpected goes through frame(), which checks
            # the same things again and raises the error naming shard, frame and sample
            if dec._owner == _get_ident() and dec.content_size(data) == n:
                try:
                    out = dec._decompress(data)
                except Exception:
                    out = None
            if out is None or len(out) != n:
                out = self._frame(f, data, j)
            self.last, self.last_data = f, out
        a, z = self.in_start[j], self.in_end[j]
        return out if a == 0 and z == len(out) else memoryview(out)[a:z]

    def _frame(self, f: int, data: memoryview, j: int) -> bytes:
        """Frame ``f`` through the checked path; an error also names a failed block checksum."""
        try:
            return self.decoder.frame(f, data, lambda: f"requested sample {self.base + j:09d}")
        except CorruptShardError as exc:
            b = self.decoder.frame_block[f]
            if self.index is None or self.done[b] != 2:
                raise
            ix = self.index
            off, size = int(ix.block_offset[b]), int(ix.block_size[b])
            got = xxh3(self.view[off:off + size])
            raise CorruptShardError(f"{exc}; " + ix.checksum_message(
                b, self.path, got, _first_label(ix, b, self.base))) from None

    def _check_block(self, b: int, j: int) -> None:
        """Hash block ``b`` once. On a mismatch its frames are still served one by one,
        each checked by zstd's content checksum; a damaged one raises naming itself and
        the block's failed checksum."""
        ix = self.index
        off, size = int(ix.block_offset[b]), int(ix.block_size[b])
        try:
            ix.check_block(b, self.view[off:off + size], self.path,
                           _first_label(ix, b, self.base))
        except CorruptShardError:
            self.done[b] = 2
            return
        self.done[b] = 1


class _ForeignShard:
    """One mapped webdataset-layout tar with its :class:`ForeignIndex`.

    ``done`` (indexes with member checksums, unless verification is off): one
    byte per sample, set once its members passed their checksums in this process.
    """

    __slots__ = ("mm", "index", "path", "done")
    foreign = True

    def __init__(self, mm: mmap.mmap, index: ForeignIndex, path: str,
                 verify: bool = False) -> None:
        self.mm, self.index, self.path = mm, index, path
        self.done = bytearray(index.num_samples) if verify and index.checksummed else None


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
                 cache_dir: str | None = None, verify_blocks: bool | None = None) -> None:
        self._ds, self._hold = _resolve(source, cache_dir)  # _hold: the cache entry in use
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
        self._open: list[_BlockShard | _CompressedShard | _FramedShard | _ForeignShard | None] = \
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
            elif isinstance(sh, _CompressedShard):
                total += sh.block_of.nbytes + sh.rel_start.nbytes + sh.rel_end.nbytes
            elif isinstance(sh, _FramedShard):
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
            if sh.__class__ is _BlockShard:
                a = sh.start[j]
                ok = sh.ok
                if ok is not None and not ok[a >> 12]:  # GRANULE_SHIFT
                    sh.verified.check(a)
                raw = sh.mm[a:sh.end[j]]
            elif sh.__class__ is _FramedShard and sh.frame_of[j] == sh.last:
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

    def _foreign(self, sh: _ForeignShard, j: int, i: int) -> dict:
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

    def _open_shard(self, s: int) -> _BlockShard | _CompressedShard | _FramedShard | _ForeignShard:
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
            sh: _BlockShard | _CompressedShard | _FramedShard | _ForeignShard = \
                _ForeignShard(mm, index, path, check)
        elif index.framed:
            sh = _FramedShard(mm, index, path, self._starts[s], check)
        elif index.compression is not None:
            sh = _CompressedShard(mm, index, path, self._starts[s])
        else:
            sh = _BlockShard(mm, index, path, self._starts[s], check)
        self._open[s] = sh
        return sh

    def _map(self, path: str, index: ShardIndex | ForeignIndex, info: ShardInfo,
             s: int) -> mmap.mmap:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardNotFoundError(f"shard {path} is listed in the manifest but missing; "
                                     "restore it or rewrite the dataset") from None
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
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


def _first_label(index: ShardIndex, b: int, base: int) -> str:
    """How errors name block ``b``'s first sample: shard-local and global ordinal."""
    first = int(index.block_first[b])
    return f"sample {first} (global {base + first})"


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


def _ints(a: np.ndarray) -> memoryview:
    """An int64 array as a memoryview: indexing gives Python ints, 8 bytes each."""
    return memoryview(a.astype("=u8", copy=False)).cast("B").cast("Q")


def _first_past(index: ShardIndex | ForeignIndex, size: int) -> int | None:
    """Shard-local ordinal of the first sample whose bytes end past ``size``."""
    if isinstance(index, ForeignIndex):
        past = np.flatnonzero(index.member_offset + index.member_size > size)
        if not past.size:
            return None
        return int(np.searchsorted(index.member_first, past[0], side="right")) - 1
    past = np.flatnonzero(index.stored_ends() > size)
    return int(past[0]) if past.size else None


def _resolve(source: str | os.PathLike | Dataset, cache_dir: str | None
             ) -> tuple[Dataset, Any]:
    """The dataset, and for a remote one the :class:`~shardstream.storage.CacheHold` on
    its cached copy (eviction in any process skips it while held), else None."""
    if isinstance(source, Dataset):
        return source, None
    src = os.fspath(source)
    if src.startswith(_REMOTE):
        try:
            from .storage import fetch_and_hold
        except ImportError:
            raise NotImplementedError(
                f"{src}: ShardDataset reads local datasets; object storage support comes "
                "with shardstream.storage. Copy the dataset locally (e.g. `aws s3 sync`, "
                "`gsutil rsync`) and pass the directory") from None
        if cache_dir is None:
            raise ValueError(f"{src} is remote: pass cache_dir= to hold the local copy")
        held = fetch_and_hold(src, cache_dir)
        return open_dataset(held.path), held
    return open_dataset(src), None
