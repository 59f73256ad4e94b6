"""Scanning tars without an index: the members of a webdataset tar (with their
checksums) and the blocks and sample offsets of a shardstream shard.
"""

from __future__ import annotations

import hashlib
import os

import msgpack
import numpy as np
import xxhash
from xxhash import xxh3_64_intdigest as xxh3

from shardstream.errors import CorruptShardError, StorageError
from shardstream.format.compression import DICT_MEMBER
from shardstream.format.frames import CODECS, decompress_block, split_frames
from shardstream.format.index import BLOCK_EXT, ShardIndex, block_checksum
from shardstream.format.tar import check_member_size, list_members
from shardstream.format.webdataset import KEY_EXT, META_MEMBER, ForeignIndex
from shardstream.storage.files import sha256_file

__all__ = ["scan_foreign_tar", "scan_block_tar"]


# ---------------------------------------------------------------- scanning tars
def scan_foreign_tar(path: str, *, checksum: bool = True) -> ForeignIndex:
    """Group a tar's members into samples as webdataset does and index them.

    Every member's data is read once for its xxh3_64 checksum (always); with
    ``checksum`` the same read also gives the whole tar's sha256.
    """
    size = os.path.getsize(path)
    exts: dict[str, int] = {}
    keys: list[bytes] = []
    firsts: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    ext_ids: list[int] = []
    seen: set[str] = set()
    current: str | None = None
    for info in list_members(path):
        name = info.name
        if name.startswith("__") and name.endswith("__") and "/" not in name or \
                META_MEMBER.match(name):
            continue
        match = KEY_EXT.match(name)
        if not match:
            continue
        key, ext = match.group(1), match.group(2).lower()
        check_member_size(path, info, size)
        if key != current:
            current, seen = key, set()
            keys.append(key.encode())
            firsts.append(len(offsets))
        if ext in seen:
            raise CorruptShardError(f"shard {path}: duplicate member {name} in sample {key!r} "
                                    "(webdataset refuses it too)")
        seen.add(ext)
        offsets.append(info.offset_data)
        sizes.append(info.size)
        ext_ids.append(exts.setdefault(ext, len(exts)))
    firsts.append(len(offsets))
    key_offset = np.zeros(len(keys) + 1, np.uint64)
    np.cumsum([len(k) for k in keys], out=key_offset[1:])
    sums, sha = _hash_members(path, offsets, sizes, size, checksum)
    return ForeignIndex(len(keys), size, sha, list(exts),
                        b"".join(keys), key_offset, np.array(firsts, np.uint64),
                        np.array(offsets, np.uint64), np.array(sizes, np.uint64),
                        np.array(ext_ids, np.uint32), np.array(sums, np.uint64))


#: bytes :func:`_hash_members` reads at once
_SCAN_CHUNK = 1 << 20


def _hash_members(path: str, offsets: list[int], sizes: list[int], size: int,
                  sha256: bool) -> tuple[list[int], str]:
    """The xxh3_64 of each member's data (members in file order, not overlapping) and,
    if ``sha256``, the whole tar's sha256 ("" otherwise), from one sequential read."""
    h = hashlib.sha256() if sha256 else None
    sums: list[int] = []
    part = None  # the hasher of a member that spans chunks
    k, pos, n = 0, 0, len(offsets)
    try:
        with open(path, "rb") as f:
            while pos < size:
                chunk = f.read(min(_SCAN_CHUNK, size - pos))
                if not chunk:
                    break
                if h is not None:
                    h.update(chunk)
                end = pos + len(chunk)
                view = memoryview(chunk)
                while k < n and offsets[k] < end:
                    a, b = offsets[k], offsets[k] + sizes[k]
                    piece = view[max(a - pos, 0):min(b, end) - pos]
                    if part is None and b <= end:
                        sums.append(xxh3(piece))
                        k += 1
                        continue
                    if part is None:
                        part = xxhash.xxh3_64()
                    part.update(piece)
                    if b > end:
                        break
                    sums.append(part.intdigest())
                    part, k = None, k + 1
                pos = end
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    while k < n and sizes[k] == 0 and offsets[k] <= pos:  # empty members at the very end
        sums.append(xxh3(b""))
        k += 1
    if k < n or pos != size:
        raise CorruptShardError(f"shard {path} changed while it was indexed (it is {pos} "
                                f"bytes now, was {size}); index it again when it is complete")
    return sums, h.hexdigest() if h is not None else ""


def scan_block_tar(path: str) -> ShardIndex:
    """Rebuild a shardstream shard's index from the tar alone.

    Block offsets come from the tar headers, sample offsets from skipping
    through each block with ``msgpack.Unpacker`` (nothing is decoded).
    Compressed blocks (``NNNNNN.ssb.zst``) are decompressed to find them:
    frame by frame with the shard's ``zstd.dict`` member (format v3: always
    present, empty when no dictionary was trained), or as one frame (format v2).
    Raw and framed shards get an xxh3_64 checksum of every stored block (index v4;
    format-v2 shards keep their v2 index, which has none).
    """
    size = os.path.getsize(path)
    checksums: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    raw_sizes: list[int] = []
    firsts: list[int] = []
    sample_offsets: list[int] = []
    frame_starts: list[bool] = []
    frame_offsets: list[int] = []
    members = list_members(path)
    dictionary: bytes | None = None
    with open(path, "rb") as f:
        if members and members[0].name == DICT_MEMBER:
            check_member_size(path, members[0], size)
            f.seek(members[0].offset_data)
            dictionary = f.read(members[0].size)
            members = members[1:]
        codec = _block_codec(members[0].name) if members else None
        if dictionary is not None and codec is None:
            codec = "zstd"  # a dictionary but no blocks: an empty framed shard
        framed = dictionary is not None  # format v3 shards always carry it (maybe empty)
        suffix = CODECS[codec] if codec else ""
        for b, info in enumerate(members):
            if info.name != f"{b:06d}.{BLOCK_EXT}{suffix}":
                raise CorruptShardError(f"shard {path}: member {b} is {info.name!r}, expected "
                                        f"{b:06d}.{BLOCK_EXT}{suffix}: not a shardstream shard")
            check_member_size(path, info, size)
            f.seek(info.offset_data)
            data = f.read(info.size)
            checksums.append(block_checksum(data))
            firsts.append(len(sample_offsets))
            if framed:
                parts = split_frames(data, dictionary or b"", where=f"shard {path}: block {b}")
                for off, part in parts:
                    n = len(_sample_offsets(part, path, b))
                    frame_offsets.append(off)
                    frame_starts.extend([True] + [False] * (n - 1))
                data = b"".join(part for _, part in parts)
            elif codec:
                data = decompress_block(codec, data, _frame_size(data, path, b),
                                        where=f"shard {path}: block {b}")
            offsets.append(info.offset_data)
            sizes.append(info.size)
            raw_sizes.append(len(data))
            sample_offsets.extend(_sample_offsets(data, path, b))
    return ShardIndex(len(sample_offsets), size, sha256_file(path),
                      np.array(offsets, np.uint64), np.array(sizes, np.uint64),
                      np.array(firsts, np.uint64), np.array(sample_offsets, np.int64),
                      codec, np.array(raw_sizes, np.uint64) if codec else None,
                      np.packbits(np.array(frame_starts, bool)) if framed else None,
                      np.array(frame_offsets, np.uint32) if framed else None,
                      (dictionary or b"") if framed else None,
                      np.array(checksums, np.uint64) if framed or not codec else None)


def _block_codec(name: str) -> str | None:
    """The codec of a block member named like ``000000.ssb.zst`` (None: ``.ssb``)."""
    for codec, suffix in CODECS.items():
        if name.endswith(f".{BLOCK_EXT}{suffix}"):
            return codec
    return None


def _frame_size(data: bytes, path: str, block: int) -> int:
    """The uncompressed size a zstd frame declares (the writer always records it)."""
    import zstandard

    try:
        n = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CorruptShardError(f"shard {path}: block {block} is not a zstd frame ({exc}); "
                                "the shard is damaged") from exc
    if n < 0:
        raise CorruptShardError(f"shard {path}: block {block}: the zstd frame does not "
                                "declare its size; not written by shardstream")
    return n


#: first bytes of a msgpack map: every sample the writer stores is one
_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def _sample_offsets(data: bytes, path: str, block: int) -> list[int]:
    """Where each sample (a msgpack map) starts in a decompressed block.

    A byte that does not start a map is refused at once, so a block of zeros (which
    would otherwise count as one "sample" per byte) cannot make the rebuild record
    an offset per byte."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    out: list[int] = []
    while unpacker.tell() < len(data):
        pos = unpacker.tell()
        if data[pos] not in _MAP_MARKERS:
            raise CorruptShardError(f"shard {path}: block {block} is damaged: byte {pos} "
                                    f"(0x{data[pos]:02x}) does not start a sample (a msgpack "
                                    "map); restore the shard from a good copy")
        out.append(pos)
        try:
            unpacker.skip()
        except msgpack.OutOfData:
            raise CorruptShardError(f"shard {path}: block {block}, sample {len(out) - 1} "
                                    "(in block) is truncated") from None
        except Exception as exc:
            raise CorruptShardError(f"shard {path}: block {block} is damaged: {exc}") from exc
    if not out:
        raise CorruptShardError(f"shard {path}: block {block} is empty")
    return out
