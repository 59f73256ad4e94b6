"""Tar members and the per-shard index (``<shard>.tar.idx``).

A shard is a POSIX (ustar) tar whose members are *blocks*: ``NNNNNN.ssb``,
each holding one or more encoded samples back to back. The index, itself a
shardstream-encoded map, records where every block's data starts and where
every sample starts inside its block, so readers seek without scanning.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

import numpy as np

from .codec import decode_sample, encode_sample
from .errors import CorruptShardError, DecodeError

__all__ = ["BLOCK_EXT", "INDEX_SUFFIX", "ShardIndex", "tar_header", "padded", "member_name",
           "TAR_END"]

BLOCK_EXT = "ssb"
INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "shardstream-index"
INDEX_VERSION = 1
TAR_BLOCK = 512
TAR_END = b"\0" * (2 * TAR_BLOCK)


def padded(n: int) -> int:
    """Bytes a member of ``n`` data bytes occupies after its header (512-aligned)."""
    return (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def member_name(block: int) -> str:
    return f"{block:06d}.{BLOCK_EXT}"


def tar_header(name: str, size: int) -> bytes:
    """A deterministic ustar header (mtime 0, mode 0444, no owner names)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


@dataclass(frozen=True, eq=False)
class ShardIndex:
    """Where blocks and samples live in one shard.

    ``block_offset[b]``: byte offset of block b's data in the tar;
    ``block_size[b]``: its size; ``block_first[b]``: shard-local ordinal of its
    first sample; ``sample_offset[i]``: where sample i starts inside its block.
    """

    num_samples: int
    shard_bytes: int
    shard_sha256: str
    block_offset: np.ndarray
    block_size: np.ndarray
    block_first: np.ndarray
    sample_offset: np.ndarray

    @property
    def num_blocks(self) -> int:
        return len(self.block_offset)

    def to_bytes(self) -> bytes:
        off = self.sample_offset
        small = np.uint16 if (off.size == 0 or int(off.max()) < 1 << 16) else np.uint32
        return encode_sample({
            "format": INDEX_FORMAT, "version": INDEX_VERSION,
            "num_samples": self.num_samples, "shard_bytes": self.shard_bytes,
            "shard_sha256": self.shard_sha256,
            "block_offset": self.block_offset.astype("<u8"),
            "block_size": self.block_size.astype("<u8"),
            "block_first": self.block_first.astype("<u8"),
            "sample_offset": off.astype(small),
        }, check=False)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "index") -> "ShardIndex":
        try:
            d = decode_sample(data)
        except DecodeError as exc:
            raise CorruptShardError(f"{where}: unreadable index ({exc}); rebuild it with "
                                    "`shardstream index`") from exc
        if d.get("format") != INDEX_FORMAT:
            raise CorruptShardError(f"{where}: not a shardstream index")
        if d.get("version") != INDEX_VERSION:
            raise CorruptShardError(f"{where}: index version {d.get('version')} is not "
                                    f"supported (this shardstream reads {INDEX_VERSION})")
        try:
            idx = cls(int(d["num_samples"]), int(d["shard_bytes"]), str(d["shard_sha256"]),
                      d["block_offset"], d["block_size"], d["block_first"], d["sample_offset"])
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
        if not ok:
            raise CorruptShardError(f"{where}: index is inconsistent; rebuild it with "
                                    "`shardstream index`")

    def sample_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Absolute (start, end) byte offsets of every sample in the shard."""
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
