"""Tar members and the per-shard index (``<shard>.tar.idx``).

A shard is a POSIX (ustar) tar whose members are *blocks*: ``NNNNNN.ssb``,
each holding one or more encoded samples back to back (``NNNNNN.ssb.zst``
when the dataset is compressed: a run of zstd frames of whole samples, after a
``zstd.dict`` member with the shard's dictionary; format v2: one frame per
block). The index, itself a shardstream-encoded map, records where every
block's data starts and where every sample starts inside its (uncompressed)
block, and for compressed shards where every frame starts, so readers seek
without scanning.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .codec import decode_sample, encode_sample
from .errors import CorruptShardError, DecodeError

if TYPE_CHECKING:
    from .compression import BlockDecoder, FrameDecoder

__all__ = ["BLOCK_EXT", "INDEX_SUFFIX", "ShardIndex", "tar_header", "padded", "member_name",
           "TAR_END"]

BLOCK_EXT = "ssb"
INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "shardstream-index"
INDEX_VERSION = 1
#: version of an index of compressed blocks, one zstd frame each (read only)
INDEX_VERSION_COMPRESSED = 2
#: version of an index of compressed blocks made of frames of samples (written now)
INDEX_VERSION_FRAMED = 3
INDEX_VERSIONS = (INDEX_VERSION, INDEX_VERSION_COMPRESSED, INDEX_VERSION_FRAMED)
TAR_BLOCK = 512
TAR_END = b"\0" * (2 * TAR_BLOCK)


def padded(n: int) -> int:
    """Bytes a member of ``n`` data bytes occupies after its header (512-aligned)."""
    return (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def member_name(block: int, suffix: str = "") -> str:
    """``000003.ssb``; ``suffix`` marks a compressed block (``".zst"``)."""
    return f"{block:06d}.{BLOCK_EXT}{suffix}"


def tar_header(name: str, size: int) -> bytes:
    """A deterministic ustar header (mtime 0, mode 0444, no owner names)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


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


@dataclass(frozen=True, eq=False)
class ShardIndex:
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
    empty); version 2 shards store each block as one frame.
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

    @property
    def num_blocks(self) -> int:
        return len(self.block_offset)

    @property
    def framed(self) -> bool:
        """Compressed as frames of samples (format v3)."""
        return self.frame_offset is not None

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

    @property
    def raw_block_size(self) -> np.ndarray:
        """Uncompressed size of every block (``block_size`` when not compressed)."""
        return self.block_size if self.block_raw_size is None else self.block_raw_size

    def block_decoder(self, path: str) -> "BlockDecoder | FrameDecoder | None":
        """Decompresses this shard's blocks; ``None`` when they are stored raw."""
        if self.compression is None:
            return None
        if self.framed:
            from .compression import FrameDecoder
            return FrameDecoder(self, path)
        from .compression import BlockDecoder
        return BlockDecoder(self.compression, self.raw_block_size, path)

    def to_bytes(self) -> bytes:
        off = self.sample_offset
        small = np.uint16 if (off.size == 0 or int(off.max()) < 1 << 16) else np.uint32
        doc = {
            "format": INDEX_FORMAT, "version": INDEX_VERSION,
            "num_samples": self.num_samples, "shard_bytes": self.shard_bytes,
            "shard_sha256": self.shard_sha256,
            "block_offset": self.block_offset.astype("<u8"),
            "block_size": self.block_size.astype("<u8"),
            "block_first": self.block_first.astype("<u8"),
            "sample_offset": off.astype(small),
        }
        if self.compression is not None:  # version 1 readers must refuse, not misread
            doc["version"] = INDEX_VERSION_COMPRESSED
            doc["compression"] = self.compression
            doc["block_raw_size"] = self.raw_block_size.astype("<u8")
        if self.framed:
            fo = np.asarray(self.frame_offset)
            doc["version"] = INDEX_VERSION_FRAMED
            doc["frame_starts"] = np.asarray(self.frame_starts, np.uint8)
            doc["frame_offset"] = fo.astype(
                np.uint16 if fo.size == 0 or int(fo.max()) < 1 << 16 else np.uint32)
            doc["dictionary"] = bytes(self.dictionary or b"")
        return encode_sample(doc, check=False)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "index") -> "ShardIndex":
        try:
            d = decode_sample(data)
        except DecodeError as exc:
            raise CorruptShardError(f"{where}: unreadable index ({exc}); rebuild it with "
                                    "`shardstream index`") from exc
        if d.get("format") != INDEX_FORMAT:
            raise CorruptShardError(f"{where}: not a shardstream index")
        version = d.get("version")
        if version not in INDEX_VERSIONS:
            raise CorruptShardError(f"{where}: index version {version} is not supported (this "
                                    f"shardstream reads versions "
                                    f"{', '.join(map(str, INDEX_VERSIONS))}); upgrade shardstream")
        try:
            compressed = version != INDEX_VERSION
            framed = version == INDEX_VERSION_FRAMED
            dictionary = d["dictionary"] if framed else None
            if framed and not isinstance(dictionary, bytes):
                raise TypeError("dictionary is not bytes")
            idx = cls(int(d["num_samples"]), int(d["shard_bytes"]), str(d["shard_sha256"]),
                      d["block_offset"], d["block_size"], d["block_first"], d["sample_offset"],
                      str(d["compression"]) if compressed else None,
                      d["block_raw_size"] if compressed else None,
                      d["frame_starts"] if framed else None,
                      d["frame_offset"] if framed else None, dictionary)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptShardError(f"{where}: index is missing field {exc}") from exc
        idx.validate(where)
        return idx

    def validate(self, where: str = "index") -> None:
        """Cheap structural checks so a damaged index cannot send readers astray."""
        nb = self.num_blocks
        ok = (len(self.block_size) == nb and len(self.block_first) == nb
              and len(self.sample_offset) == self.num_samples
              and (nb == 0) == (self.num_samples == 0))
        if ok and nb:
            ends = self.block_offset + self.block_size
            ok = (int(self.block_first[0]) == 0
                  and bool(np.all(np.diff(self.block_first.astype(np.int64)) > 0))
                  and int(self.block_first[-1]) < self.num_samples
                  and int(ends.max()) <= self.shard_bytes)
        if ok and self.compression is not None:
            raw = self.block_raw_size
            ok = raw is not None and len(raw) == nb and (nb == 0 or bool(np.all(
                self.sample_offset.astype(np.int64) < raw.astype(np.int64)[self._block_of()])))
        if ok and self.framed:
            ok = self._frames_ok()
        if not ok:
            raise CorruptShardError(f"{where}: index is inconsistent; rebuild it with "
                                    "`shardstream index`")

    def _frames_ok(self) -> bool:
        """Every block starts a frame; frames start inside their block, in order."""
        fs, fo = np.asarray(self.frame_starts), np.asarray(self.frame_offset)
        n = self.num_samples
        if fs.dtype != np.uint8 or fs.ndim != 1 or len(fs) != (n + 7) // 8 or fo.ndim != 1:
            return False
        starts = np.unpackbits(fs, count=n).astype(bool)
        if int(starts.sum()) != len(fo):
            return False
        if n == 0:
            return True
        if not bool(np.all(starts[self.block_first.astype(np.int64)])):
            return False
        t = self.frame_table()
        return bool(np.all(t.rel_start[t.block_frame[:-1]] == 0)
                    and np.all(t.rel_end > t.rel_start) and np.all(t.raw_end > t.raw_start))

    def _block_of(self) -> np.ndarray:
        """The block of every sample."""
        counts = np.diff(np.append(self.block_first, self.num_samples).astype(np.int64))
        return np.repeat(np.arange(self.num_blocks), counts)

    def stored_ends(self) -> np.ndarray:
        """Where each sample's stored bytes end in the shard (its block's end if compressed)."""
        if self.compression is None:
            return self.sample_spans()[1]
        return (self.block_offset + self.block_size)[self._block_of()]

    def sample_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Absolute (start, end) byte offsets of every sample in an uncompressed shard."""
        if self.compression is not None:
            raise ValueError("a compressed shard has no sample spans in the file; decompress "
                             "its blocks (BlockDecoder)")
        n = self.num_samples
        counts = np.diff(np.append(self.block_first, n).astype(np.int64))
        block_of = np.repeat(np.arange(self.num_blocks), counts)
        starts = self.block_offset[block_of] + self.sample_offset.astype(np.uint64)
        ends = np.empty(n, dtype=np.uint64)
        ends[:-1] = starts[1:]
        last = np.append(self.block_first[1:], n).astype(np.int64) - 1  # last sample per block
        ends[last] = self.block_offset + self.block_size
        return starts, ends

    def block_samples(self, block: int) -> tuple[int, int]:
        """Shard-local ordinals [first, stop) of the samples in ``block``."""
        first = int(self.block_first[block])
        stop = int(self.block_first[block + 1]) if block + 1 < self.num_blocks else self.num_samples
        return first, stop
