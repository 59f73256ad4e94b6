"""Random access to one shard's samples through its index, over an mmap: plain,
per-block compressed and framed shards, and indexed webdataset tars.
"""

from __future__ import annotations

import mmap
import threading
from bisect import bisect_right
from collections import OrderedDict

import numpy as np
from xxhash import xxh3_64_intdigest as xxh3

from shardstream.errors import CorruptShardError
from shardstream.format.index import ShardIndex
from shardstream.format.webdataset import ForeignIndex

__all__ = ["BlockShard", "CompressedShard", "ForeignShard", "FramedShard"]


_get_ident = threading.get_ident


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


class BlockShard:
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


class CompressedShard:
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
            _ints(a) for a in (index.block_of(), starts, ends))
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


class FramedShard:
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


class ForeignShard:
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


def _first_label(index: ShardIndex, b: int, base: int) -> str:
    """How errors name block ``b``'s first sample: shard-local and global ordinal."""
    first = int(index.block_first[b])
    return f"sample {first} (global {base + first})"


def _ints(a: np.ndarray) -> memoryview:
    """An int64 array as a memoryview: indexing gives Python ints, 8 bytes each."""
    return memoryview(a.astype("=u8", copy=False)).cast("B").cast("Q")
