"""Tar members and the per-shard index (``<shard>.tar.idx``).

A shard is a POSIX (ustar) tar whose members are *blocks*: ``NNNNNN.ssb``,
each holding one or more encoded samples back to back (``NNNNNN.ssb.zst``
when the dataset is compressed: a run of zstd frames of whole samples, after a
``zstd.dict`` member with the shard's dictionary; format v2: one frame per
block). The index, itself a shardstream-encoded map, records where every
block's data starts and where every sample starts inside its (uncompressed)
block, and for compressed shards where every frame starts, so readers seek
without scanning. Version 4 adds an xxh3_64 checksum of every block's stored
bytes, which readers compare on every block they read (:func:`block_checksum`).

An index is never trusted: :meth:`ShardIndex.from_bytes` checks every field's
type, dtype, shape and bounds (:mod:`~shardstream.format.index_check`) before
anything is allocated from it; any failure is a :class:`CorruptShardError` naming
the index file.
"""

from __future__ import annotations

import functools
import os
import tarfile
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from shardstream.errors import CorruptShardError, DecodeError, ShardNotFoundError, StorageError
from shardstream.format.codec import decode_sample
from shardstream.format.encode import encode_sample
from shardstream.format.fields import BadIndex
from shardstream.format.index_check import (INDEX_VERSION, INDEX_VERSION_CHECKSUMS,
                                            INDEX_VERSION_COMPRESSED, INDEX_VERSION_FRAMED,
                                            INDEX_VERSIONS, FrameTable, IndexFields)

__all__ = ["BLOCK_EXT", "INDEX_SUFFIX", "ShardIndex", "FrameTable", "tar_header", "padded",
           "member_name", "TAR_END", "block_checksum", "read_index_file"]


if TYPE_CHECKING:
    from shardstream.format.frames import BlockDecoder, FrameDecoder

BLOCK_EXT = "ssb"
INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "shardstream-index"


TAR_BLOCK = 512
TAR_END = b"\0" * (2 * TAR_BLOCK)


def padded(n: int) -> int:
    """Bytes a member of ``n`` data bytes occupies after its header (512-aligned)."""
    return (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def member_name(block: int, suffix: str = "") -> str:
    """``000003.ssb``; ``suffix`` marks a compressed block (``".zst"``)."""
    return f"{block:06d}.{BLOCK_EXT}{suffix}"


def block_checksum(data: bytes | memoryview) -> int:
    """The checksum a version-4 index stores for a block: xxh3_64 of its stored bytes."""
    return xxhash.xxh3_64_intdigest(data)


def _ustar(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


@functools.lru_cache(maxsize=8192)
def _ustar_of_name(name: str) -> bytes:
    return _ustar(name, 0)


def tar_header(name: str, size: int) -> bytes:
    """A deterministic ustar header (mtime 0, mode 0444, no owner names), as tarfile
    builds it. tarfile takes ~30 us a header (a quarter of packing time at one block
    per 64 KiB), so its header for ``name`` is kept and only the two fields that
    depend on ``size`` are rewritten as tarfile writes them: size (11 octal digits,
    NUL) and checksum (the byte sum with the field as spaces: 6 digits, NUL, space)."""
    if size >= 8 ** 11:
        return _ustar(name, size)  # tarfile says why ustar cannot hold it
    h = bytearray(_ustar_of_name(name))
    h[124:136] = b"%011o\0" % size
    h[148:156] = b" " * 8
    h[148:155] = b"%06o\0" % sum(h)
    return bytes(h)


class ShardIndex(IndexFields):
    """Where blocks and samples live in one shard: the fields and their checks
    (:class:`~shardstream.format.index_check.IndexFields`), reading them from and
    writing them to an index file, checking blocks against their checksums, and
    where each block's samples lie.
    """

    def check_block(self, block: int, data: bytes | memoryview, path: str,
                    label: str = "") -> None:
        """Raise :class:`CorruptShardError` unless ``data`` (block ``block``'s stored
        bytes) matches its checksum; nothing to check in indexes older than v4.

        ``label`` names the block's first sample (default: its shard-local ordinal).
        """
        if self.block_checksum is None:
            return
        want = int(self.block_checksum[block])
        got = xxhash.xxh3_64_intdigest(data)
        if got != want:
            raise CorruptShardError(self.checksum_message(block, path, got, label))

    def checksum_message(self, block: int, path: str, got: int, label: str = "") -> str:
        """How a checksum mismatch of ``block`` is reported."""
        first = label or f"shard-local sample {int(self.block_first[block])}"
        return (f"shard {path}: block {block} at byte offset {int(self.block_offset[block])} "
                f"(its first sample: {first}) fails its checksum (xxh3_64 {got:016x}, the index "
                f"says {int(self.block_checksum[block]):016x}): the shard is damaged or was "
                "replaced; restore it or rewrite the dataset (`shardstream verify` checks all)")

    def block_decoder(self, path: str) -> "BlockDecoder | FrameDecoder | None":
        """Decompresses this shard's blocks; ``None`` when they are stored raw."""
        if self.compression is None:
            return None
        if self.framed:
            from shardstream.format.frames import FrameDecoder
            return FrameDecoder(self, path)
        from shardstream.format.frames import BlockDecoder
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
        if self.block_checksum is not None:
            if self.compression is not None and not self.framed:
                raise ValueError("format v2 blocks (one zstd frame each) carry no checksums")
            doc["version"] = INDEX_VERSION_CHECKSUMS
            doc["block_checksum"] = np.asarray(self.block_checksum).astype("<u8")
        return encode_sample(doc, check=False)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "index") -> "ShardIndex":
        """Parse and check an index file's bytes; anything wrong is a
        :class:`CorruptShardError` naming ``where`` (the index file)."""
        try:
            d = decode_sample(data)
        except DecodeError as exc:
            raise CorruptShardError(f"{where}: unreadable index ({exc}); rebuild it with "
                                    "`shardstream index`") from exc
        if d.get("format") != INDEX_FORMAT:
            raise CorruptShardError(f"{where}: not a shardstream index")
        version = d.get("version")
        if type(version) is not int or version not in INDEX_VERSIONS:
            raise CorruptShardError(f"{where}: index version {version!r} is not supported (this "
                                    f"shardstream reads versions "
                                    f"{', '.join(map(str, INDEX_VERSIONS))}); upgrade shardstream")
        try:
            idx = cls._parse(d, version)
            idx.validate(where)
        except CorruptShardError:
            raise
        except BadIndex as exc:
            raise CorruptShardError(f"{where}: index is inconsistent: {exc}; rebuild it with "
                                    "`shardstream index`") from None
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, MemoryError) as exc:
            raise CorruptShardError(f"{where}: index is inconsistent ({type(exc).__name__}: "
                                    f"{exc}); rebuild it with `shardstream index`") from None
        return idx

    def stored_ends(self) -> np.ndarray:
        """Where each sample's stored bytes end in the shard (its block's end if compressed)."""
        if self.compression is None:
            return self.sample_spans()[1]
        return (self.block_offset + self.block_size)[self.block_of()]

    def sample_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Absolute (start, end) byte offsets of every sample in an uncompressed shard."""
        if self.compression is not None:
            raise ValueError("a compressed shard has no sample spans in the file; decompress "
                             "its blocks (BlockDecoder)")
        n = self.num_samples
        block_of = self.block_of()
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


#: set to ``0`` to skip the per-block checksum check in every reader (raw speed, no safety)
VERIFY_ENV = "SHARDSTREAM_VERIFY_BLOCKS"


def verify_blocks_default() -> bool:
    """Whether readers check block checksums when not told: unless ``$SHARDSTREAM_VERIFY_BLOCKS``
    is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
