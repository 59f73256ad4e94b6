"""The fields of a shard index and their checks: an index document is untrusted.

:class:`IndexFields` (the base of :class:`~shardstream.format.index.ShardIndex`) holds
the arrays, parses them from a decoded index (each field's type, dtype and shape, see
:mod:`shardstream.format.fields`) and checks their bounds before anything is allocated
from them; a failure is a :class:`BadIndex` or a :class:`CorruptShardError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np

from shardstream.errors import CorruptShardError
from shardstream.format import limits
from shardstream.format.fields import (MAX_INT, BadIndex, as_int64, check_array, count_field,
                                       index_field, uint_array)

__all__ = ["IndexFields", "FrameTable", "INDEX_VERSION", "INDEX_VERSION_COMPRESSED",
           "INDEX_VERSION_FRAMED", "INDEX_VERSION_CHECKSUMS", "INDEX_VERSIONS", "CODECS"]


INDEX_VERSION = 1
#: version of an index of compressed blocks, one zstd frame each (read only)
INDEX_VERSION_COMPRESSED = 2
#: version of an index of compressed blocks made of frames of samples (read only)
INDEX_VERSION_FRAMED = 3
#: version of an index with an xxh3_64 checksum of every stored block (written now, raw
#: or framed blocks; ``compression`` says which)
INDEX_VERSION_CHECKSUMS = 4
INDEX_VERSIONS = (INDEX_VERSION, INDEX_VERSION_COMPRESSED, INDEX_VERSION_FRAMED,
                  INDEX_VERSION_CHECKSUMS)
#: codecs an index may name (compression.CODECS; not imported: compression imports index)
CODECS = ("zstd",)


class FrameTable(NamedTuple):
    """Per-frame positions of a framed (format v3) shard, all int64.

    ``first``/``block``: first sample and block of every frame; ``rel_start``/
    ``rel_end``: its stored bytes inside the stored block; ``raw_start``/
    ``raw_end``: its samples' bytes inside the uncompressed block;
    ``block_frame``: first frame of every block, then the frame count;
    ``frame_of``: the frame of every sample.
    """

    first: np.ndarray
    block: np.ndarray
    rel_start: np.ndarray
    rel_end: np.ndarray
    raw_start: np.ndarray
    raw_end: np.ndarray
    block_frame: np.ndarray
    frame_of: np.ndarray


_F = TypeVar("_F", bound="IndexFields")


@dataclass(frozen=True, eq=False)
class IndexFields:
    """Where blocks and samples live in one shard.

    ``block_offset[b]``: byte offset of block b's data in the tar;
    ``block_size[b]``: its size; ``block_first[b]``: shard-local ordinal of its
    first sample; ``sample_offset[i]``: where sample i starts inside its block.

    Compressed shards (``compression="zstd"``): ``block_size`` is the stored
    (compressed) size, ``block_raw_size`` the uncompressed one, and
    ``sample_offset`` is relative to the *uncompressed* block. Framed shards
    (index version 3) add ``frame_starts`` (bit per sample, packed with
    ``np.packbits``: does it start a frame), ``frame_offset`` (where each frame
    starts inside its stored block) and ``dictionary`` (zstd dictionary, may be
    empty); version 2 shards store each block as one frame. ``block_checksum``
    (version 4): xxh3_64 of every block's stored bytes; ``None`` in older indexes.
    """

    num_samples: int
    shard_bytes: int
    shard_sha256: str
    block_offset: np.ndarray
    block_size: np.ndarray
    block_first: np.ndarray
    sample_offset: np.ndarray
    compression: str | None = None
    block_raw_size: np.ndarray | None = None
    frame_starts: np.ndarray | None = None
    frame_offset: np.ndarray | None = None
    dictionary: bytes | None = None
    block_checksum: np.ndarray | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.block_offset)

    @property
    def framed(self) -> bool:
        """Compressed as frames of samples (format v3)."""
        return self.frame_offset is not None

    @property
    def checksummed(self) -> bool:
        """Every block's stored bytes have a checksum (format v4)."""
        return self.block_checksum is not None

    @property
    def raw_block_size(self) -> np.ndarray:
        """Uncompressed size of every block (``block_size`` when not compressed)."""
        return self.block_size if self.block_raw_size is None else self.block_raw_size

    def block_of(self) -> np.ndarray:
        """The block of every sample."""
        counts = np.diff(np.append(self.block_first, self.num_samples).astype(np.int64))
        return np.repeat(np.arange(self.num_blocks), counts)

    def frame_table(self) -> FrameTable:
        """Positions of every frame (framed shards only); computed once per index
        (``validate`` and the decoder both need it)."""
        cached = self.__dict__.get("_frame_table")
        if cached is None:
            cached = self.__dict__["_frame_table"] = self._build_frame_table()
        return cached

    def _build_frame_table(self) -> FrameTable:
        assert self.frame_offset is not None and self.frame_starts is not None
        n = self.num_samples
        starts = np.unpackbits(np.asarray(self.frame_starts, np.uint8), count=n).astype(bool)
        first = np.flatnonzero(starts)
        frame_of = np.cumsum(starts, dtype=np.int64) - 1
        bfirst = self.block_first.astype(np.int64)
        block = np.searchsorted(bfirst, first, side="right") - 1
        block_frame = np.searchsorted(first, np.append(bfirst, n))
        block_frame[-1] = len(first)
        rel_start = np.asarray(self.frame_offset, np.int64)
        last = np.append(block_frame[1:-1], len(first)) - 1  # last frame of each block
        rel_end = np.empty_like(rel_start)
        rel_end[:-1] = rel_start[1:]
        rel_end[last] = self.block_size.astype(np.int64)
        offs = self.sample_offset.astype(np.int64)
        raw_start = offs[first]
        raw_end = np.empty_like(raw_start)
        raw_end[:-1] = raw_start[1:]
        raw_end[last] = self.raw_block_size.astype(np.int64)
        return FrameTable(first, block, rel_start, rel_end, raw_start, raw_end, block_frame,
                          frame_of)

    @classmethod
    def _parse(cls: type[_F], d: dict, version: int) -> _F:
        """The fields of a decoded index, each checked for type, dtype and shape."""
        compressed = version in (INDEX_VERSION_COMPRESSED, INDEX_VERSION_FRAMED) or \
            version == INDEX_VERSION_CHECKSUMS and d.get("compression") is not None
        framed = version == INDEX_VERSION_FRAMED or version == INDEX_VERSION_CHECKSUMS and compressed
        compression = index_field(d, "compression") if compressed else None
        if compressed and compression not in CODECS:
            raise BadIndex(f"compression {compression!r} is unknown to this shardstream "
                           "(upgrade shardstream if it is new)")
        dictionary = index_field(d, "dictionary") if framed else None
        if framed and type(dictionary) is not bytes:
            raise BadIndex("field 'dictionary' is not bytes")
        sha = index_field(d, "shard_sha256")
        if type(sha) is not str:
            raise BadIndex("field 'shard_sha256' is not a str")
        return cls(count_field(d, "num_samples"), count_field(d, "shard_bytes"), sha,
                   uint_array(d, "block_offset", 8), uint_array(d, "block_size", 8),
                   uint_array(d, "block_first", 8), uint_array(d, "sample_offset"), compression,
                   uint_array(d, "block_raw_size", 8) if compressed else None,
                   uint_array(d, "frame_starts", 1) if framed else None,
                   uint_array(d, "frame_offset") if framed else None, dictionary,
                   uint_array(d, "block_checksum", 8, exact=True)
                   if version == INDEX_VERSION_CHECKSUMS else None)

    def validate(self, where: str = "index") -> None:
        """Structural checks so a damaged index cannot send readers astray.

        Every array must be a 1-D unsigned (or non-negative signed) integer array
        of the right length; every block must lie inside the shard, in order;
        every sample inside its block; no block may declare more than
        ``limits.MAX_BLOCK_RAW_BYTES`` uncompressed. Sums are taken in int64 after
        bounding each term, so nothing wraps. Raises :class:`CorruptShardError`.
        """
        try:
            self._check()
        except BadIndex as exc:
            raise CorruptShardError(f"{where}: index is inconsistent: {exc}; rebuild it with "
                                    "`shardstream index`") from None
        except (TypeError, ValueError, IndexError, OverflowError, MemoryError) as exc:
            raise CorruptShardError(f"{where}: index is inconsistent ({type(exc).__name__}: "
                                    f"{exc}); rebuild it with `shardstream index`") from None

    def _check(self) -> None:
        n, size = self.num_samples, self.shard_bytes
        for name in ("num_samples", "shard_bytes"):
            v = getattr(self, name)
            if type(v) is not int or not 0 <= v < MAX_INT:
                raise BadIndex(f"{name} is {v!r}")
        arrays = {"block_offset": self.block_offset, "block_size": self.block_size,
                  "block_first": self.block_first, "sample_offset": self.sample_offset}
        for name, a in arrays.items():
            check_array(name, a)
        nb = len(self.block_offset)
        if len(self.block_size) != nb or len(self.block_first) != nb:
            raise BadIndex("block arrays differ in length")
        if len(self.sample_offset) != n:
            raise BadIndex(f"{len(self.sample_offset)} sample offsets for {n} samples")
        if (nb == 0) != (n == 0) or nb > n:
            raise BadIndex(f"{nb} blocks for {n} samples")
        if self.block_checksum is not None:
            check_array("block_checksum", self.block_checksum, nb, limit=None)
        if self.compression is not None:
            if self.block_raw_size is None:
                raise BadIndex("compressed, but no block_raw_size")
            check_array("block_raw_size", self.block_raw_size, nb)
        if nb == 0:
            return
        self._check_blocks(n, size)
        self._check_samples(n)
        if self.framed:
            self._check_frames(n)

    def _check_blocks(self, n: int, size: int) -> None:
        """Blocks lie inside the shard, in order, without overlapping; raw sizes bounded."""
        off = as_int64(self.block_offset)
        stored = as_int64(self.block_size)
        if int(off.max()) > size or int(stored.max()) > size:
            raise BadIndex(f"a block lies beyond the shard's {size} bytes")
        ends = off + stored  # both <= size < 2**62: no wrap
        if int(ends.max()) > size or bool(np.any(off[1:] < ends[:-1])):
            raise BadIndex("blocks overlap or lie beyond the shard's end")
        firsts = as_int64(self.block_first)
        if int(firsts[0]) != 0 or int(firsts.max()) >= n or bool(np.any(np.diff(firsts) <= 0)):
            raise BadIndex("block_first does not start at 0 and increase")
        raw = as_int64(self.raw_block_size)
        if bool(np.any(raw < 1)):
            raise BadIndex("an empty block")
        if self.compression is not None:
            limit = limits.MAX_BLOCK_RAW_BYTES
            if int(raw.max()) > limit:
                raise BadIndex(f"a block declares {int(raw.max())} uncompressed bytes, more "
                               f"than the {limit} any block may hold")
            if bool(np.any(raw > stored * limits.MAX_ZSTD_RATIO)):
                raise BadIndex("a block declares more uncompressed bytes than zstd can "
                               "expand its stored bytes to")

    def _check_samples(self, n: int) -> None:
        """Every block's first sample starts at 0; samples increase inside the block."""
        offs = as_int64(self.sample_offset)
        if bool(np.any(offs >= as_int64(self.raw_block_size)[self.block_of()])):
            raise BadIndex("a sample starts beyond its block's end")
        starts = np.zeros(n, bool)
        starts[as_int64(self.block_first)] = True
        if bool(np.any(offs[starts] != 0)) or bool(np.any(np.diff(offs)[~starts[1:]] <= 0)):
            raise BadIndex("sample offsets do not start at 0 and increase in every block")

    def _check_frames(self, n: int) -> None:
        """Every block starts a frame; frames start inside their block, in order."""
        fs, fo = self.frame_starts, self.frame_offset
        if fs is None or fo is None or self.dictionary is None:
            raise BadIndex("framed, but a frame field is missing")
        check_array("frame_starts", fs, (n + 7) // 8)
        check_array("frame_offset", fo)
        if fs.dtype.itemsize != 1:
            raise BadIndex("frame_starts is not an array of bytes")
        starts = np.unpackbits(np.asarray(fs, np.uint8), count=n).astype(bool)
        if int(starts.sum()) != len(fo):
            raise BadIndex(f"{int(starts.sum())} frames start, {len(fo)} frame offsets")
        if not bool(np.all(starts[as_int64(self.block_first)])):
            raise BadIndex("a block does not start with a frame")
        t = self.frame_table()
        stored, raw = t.rel_end - t.rel_start, t.raw_end - t.raw_start
        if not bool(np.all(t.rel_start[t.block_frame[:-1]] == 0) and np.all(stored > 0)
                    and np.all(raw > 0) and np.all(raw <= stored * limits.MAX_ZSTD_RATIO)):
            raise BadIndex("frames do not start at 0 and increase in every block")

    def _frames_ok(self) -> bool:
        """Whether the frame fields are consistent (see :meth:`validate`)."""
        try:
            self._check_frames(self.num_samples)
        except (BadIndex, TypeError, ValueError, IndexError):
            return False
        return True
