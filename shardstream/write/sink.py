"""ShardSink: samples -> blocks -> tar shards with their index, in a staging dir."""

from __future__ import annotations

import hashlib
import os
from array import array
from typing import Any

import numpy as np

from shardstream.errors import EncodeError
from shardstream.format.compression import (DICT_MEMBER, Compression, FrameCompressor,
                                            parse_compression, train_dictionary)
from shardstream.format.encode import encode_sample, repack
from shardstream.format.index import (INDEX_SUFFIX, TAR_END, ShardIndex, block_checksum,
                                      member_name, padded, tar_header)
from shardstream.format.limits import MAX_BLOCK_RAW_BYTES
from shardstream.format.manifest import ShardInfo
from shardstream.format.schema import SchemaBuilder
from shardstream.storage.files import write_file
from shardstream.write.arrow_encode import EncodedRows
from shardstream.write.cuts import OPEN, SHARD, Fill, next_cut
from shardstream.write.shardfile import ShardFile

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_BLOCK_BYTES"]


DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_BLOCK_BYTES = 64 * 1024
#: encoded bytes a compressing writer holds back to train its zstd dictionary
TRAIN_BYTES = 1 << 20
_PAD = b"\0" * 512


def sample_key(sample: Any, key_field: str, ordinal: object) -> object:
    """The key that labels ``sample`` (checked); ``ordinal`` when it has none."""
    if not isinstance(sample, dict):
        raise EncodeError(f"sample {ordinal}: a sample must be a dict, got "
                          f"{type(sample).__name__}", sample=ordinal)
    key = sample.get(key_field)
    if key is None:
        if key_field != "__key__":
            raise EncodeError(f"sample {ordinal}: key field {key_field!r} is missing; every "
                              "sample needs it", sample=ordinal, path=key_field)
        return ordinal
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise EncodeError(f"sample {ordinal}: key field {key_field!r} must be str or int, "
                          f"got {type(key).__name__}", sample=ordinal, path=key_field)
    return key


def _check_limits(max_samples: int | None, max_bytes: int, block_bytes: int) -> None:
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if max_bytes < 4096:
        raise ValueError(f"max_bytes must be >= 4096, got {max_bytes}")
    if not 1 <= block_bytes <= 2**31:
        raise ValueError(f"block_bytes must be in [1, 2**31], got {block_bytes}")


def _frame_fields(compressor: FrameCompressor | None, frame_starts: bytearray,
                  frame_offsets: array) -> tuple[Any, Any, Any]:
    """Index fields of a framed shard: (frame_starts, frame_offset, dictionary)."""
    if compressor is None:
        return None, None, None
    starts = np.packbits(np.frombuffer(bytes(frame_starts), np.uint8))
    return starts, np.frombuffer(frame_offsets, np.uint32), compressor.dictionary


class ShardSink:
    """Writes shards into one (staging) directory; knows nothing about datasets.

    ``first_ordinal`` numbers samples for error messages and default keys.
    ``compression`` (``"zstd"``, ``"zstd:19"`` or a :class:`Compression`;
    ``level`` overrides the level) stores every block as zstd frames of about
    ``frame_bytes`` of samples (format v3). The first ``TRAIN_BYTES`` of
    samples are held back to train the zstd dictionary every shard then
    carries. Shards roll on the uncompressed block sizes, so compressed shards
    stay under ``max_bytes`` by about the compression ratio. Every index
    records an xxh3_64 checksum of each block's stored bytes (format v4); a
    compressed sample larger than ``MAX_BLOCK_RAW_BYTES`` (1 GiB) is refused.
    """

    def __init__(self, directory: str, *, max_samples: int | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 key_field: str = "__key__", first_ordinal: int = 0, fsync: bool = True,
                 name_format: str = "part-{:06d}.tar",
                 compression: Compression | str | None = None, level: int | None = None) -> None:
        _check_limits(max_samples, max_bytes, block_bytes)
        self.directory = directory
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.block_bytes = block_bytes
        self.key_field = key_field
        self.fsync = fsync
        self.name_format = name_format
        self.compression = parse_compression(compression, level)
        if self.compression is not None and not self.compression.framed:
            raise ValueError("format v2 compression (one zstd frame per block) is read only; "
                             "write with frame_bytes > 0")
        if self.compression is not None and block_bytes > MAX_BLOCK_RAW_BYTES:
            raise ValueError(f"block_bytes must be at most {MAX_BLOCK_RAW_BYTES} (1 GiB) when "
                             f"compressing (readers refuse larger blocks), got {block_bytes}")
        self._pack = self.compression is not None  # narrowed int arrays inside frames
        self._compressor: FrameCompressor | None = None
        self._warm: list[bytes] | None = [] if self.compression else None
        self._warm_bytes = 0
        self.schema = SchemaBuilder()
        self.shards: list[ShardInfo] = []
        self.num_samples = 0
        self.bytes_written = 0
        self._ordinal = first_ordinal
        self._block: list[bytes | memoryview] = []  # samples (or runs of them, uncompressed)
        self._block_count = 0
        self._block_len = 0
        self._file: ShardFile | None = None
        self._reset_shard()

    # -- samples -------------------------------------------------------------
    def write(self, sample: dict[str, Any]) -> None:
        key = sample_key(sample, self.key_field, self._ordinal)
        if self.schema.known(sample):  # same keys and value types as a checked sample
            data = encode_sample(sample, key=key, check=False, pack=self._pack)
        else:
            data = encode_sample(sample, key=key, pack=self._pack)
            self.schema.observe(sample)
        self.write_encoded(data, packed=self._pack)

    @property
    def packs(self) -> bool:
        """Whether samples handed to :meth:`write_encoded` should be encoded with ``pack=True``."""
        return self._pack

    def write_encoded(self, data: bytes, packed: bool = False) -> None:
        """Append one already encoded (and key-checked) sample.

        ``packed``: encoded with ``pack=True``; re-encoded when that differs
        from what this sink stores (narrowed integers only inside compressed frames).
        """
        if packed != self._pack:
            data = repack(data, self._pack)
        if self.compression is not None and len(data) > MAX_BLOCK_RAW_BYTES:
            raise EncodeError(f"sample {self._ordinal}: {len(data)} encoded bytes, more than "
                              f"the {MAX_BLOCK_RAW_BYTES} a compressed block may hold; split "
                              "it or write without compression", sample=self._ordinal)
        self._ordinal += 1
        self.num_samples += 1
        if self._warm is not None:  # still collecting samples to train the dictionary on
            self._warm.append(data)
            self._warm_bytes += len(data)
            if self._warm_bytes >= TRAIN_BYTES:
                self._start_frames()
            return
        self._place(data)

    def _start_frames(self) -> None:
        """Train the dictionary on the held-back samples, then write them."""
        assert self.compression is not None and self._warm is not None
        warm, self._warm = self._warm, None
        # the dictionary goes into every shard: only where it is a small part of one
        small = self.max_bytes < 32 * self.compression.dict_bytes
        dictionary = b"" if small else train_dictionary(warm, self.compression)
        self._compressor = FrameCompressor(self.compression, dictionary)
        for data in warm:
            self._place(data)

    def _place(self, data: bytes) -> None:
        size = len(data)
        if self._block and self._block_len + size > self.block_bytes:
            self._flush_block()
        if self._shard_samples + self._block_count > 0 and self._shard_full(size):
            self._flush_block()
            self._finish_shard()
        self._sample_offsets.append(self._block_len)
        self._block.append(data)
        self._block_count += 1
        self._block_len += size
        if self._block_len >= self.block_bytes:
            self._flush_block()

    def _shard_full(self, size: int) -> bool:
        if self.max_samples is not None and \
                self._shard_samples + self._block_count + 1 > self.max_samples:
            return True
        member = 512 + padded(self._block_len + size)
        return self._shard_bytes + member + len(TAR_END) > self.max_bytes

    def write_rows(self, rows: EncodedRows) -> None:
        """Append a batch of encoded (and key-checked) samples, merge its schema: cut
        where :meth:`write_encoded` cuts (:mod:`~shardstream.write.cuts`), blocks
        written straight from ``rows.data``."""
        if self._pack:  # compressed: frames take samples one by one
            for data in rows.samples:
                self.write_encoded(data)
        else:
            self._place_run(memoryview(rows.data), rows.offsets)
        self.schema.merge(rows.schema)

    def _place_run(self, view: memoryview, c: np.ndarray) -> None:
        """:meth:`_place` for every sample of ``view`` cut at the offsets ``c``."""
        i, n, cuts = 0, len(c) - 1, c.tolist()
        while i < n:
            fill = Fill(self._block_count, self._block_len, self._shard_samples,
                        self._shard_bytes)
            what, j = next_cut(cuts, i, fill, self.block_bytes, self.max_bytes, self.max_samples)
            self._append_run(view, c, i, j)
            if what != OPEN:
                self._flush_block()
            if what == SHARD:
                self._finish_shard()
            i = j

    def _append_run(self, view: memoryview, c: np.ndarray, a: int, b: int) -> None:
        """Samples ``[a, b)`` of a run join the open block."""
        if a >= b:
            return
        starts = c[a:b] - c[a] + self._block_len
        self._sample_offsets.frombytes(starts.astype(np.uint32).tobytes())
        self._block.append(view[int(c[a]):int(c[b])])
        self._block_count += b - a
        self._block_len += int(c[b] - c[a])

    # -- blocks and shards -----------------------------------------------------
    def _reset_shard(self) -> None:
        self._shard_bytes = 0
        self._shard_samples = 0
        # compact arrays: 4 bytes per sample, whatever the shard's sample count
        self._offsets = array("Q")
        self._sizes = array("Q")
        self._raw_sizes = array("Q")
        self._firsts = array("Q")
        self._sample_offsets = array("I")  # < block_bytes <= 2**31
        self._frame_starts = bytearray()  # 1 where a sample starts a frame (compressed)
        self._frame_offsets = array("I")
        self._checksums = array("Q")  # xxh3_64 of every block's stored bytes

    def _path(self, n: int) -> str:
        return os.path.join(self.directory, self.name_format.format(n))

    def _emit(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self._shard_bytes += len(data)

    def _flush_block(self) -> None:
        if not self._block:
            return
        if self._file is None:
            self._file = ShardFile(self._path(len(self.shards)), self.fsync)
            if self._compressor is not None:  # always (maybe empty): it marks format v3
                self._emit_member(DICT_MEMBER, self._compressor.dictionary)
        self._raw_sizes.append(self._block_len)
        suffix = ""
        if self._compressor is not None:
            payload, counts, frame_offsets = self._compressor.compress_block(self._block)
            suffix = self._compressor.compression.suffix
            for c in counts:
                self._frame_starts += b"\1" + b"\0" * (c - 1)
            self._frame_offsets.extend(frame_offsets)
        else:
            payload = self._block[0] if len(self._block) == 1 else b"".join(self._block)
        self._emit(tar_header(member_name(len(self._offsets), suffix), len(payload)))
        self._offsets.append(self._shard_bytes)
        self._sizes.append(len(payload))
        self._checksums.append(block_checksum(payload))
        self._firsts.append(self._shard_samples)
        self._emit(payload)
        if len(payload) % 512:
            self._emit(_PAD[: 512 - len(payload) % 512])
        self._shard_samples += self._block_count
        self._block = []
        self._block_count = 0
        self._block_len = 0

    def _emit_member(self, name: str, data: bytes) -> None:
        self._emit(tar_header(name, len(data)))
        self._emit(data)
        if len(data) % 512:
            self._emit(_PAD[: 512 - len(data) % 512])

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._emit(TAR_END)
        f, self._file = self._file, None
        index = ShardIndex(self._shard_samples, self._shard_bytes, f.close(),
                           np.frombuffer(self._offsets, np.uint64),
                           np.frombuffer(self._sizes, np.uint64),
                           np.frombuffer(self._firsts, np.uint64),
                           np.frombuffer(self._sample_offsets, np.uint32),
                           self.compression.codec if self.compression else None,
                           np.frombuffer(self._raw_sizes, np.uint64) if self.compression else None,
                           *_frame_fields(self._compressor, self._frame_starts,
                                          self._frame_offsets),
                           block_checksum=np.frombuffer(self._checksums, np.uint64))
        idx_bytes = index.to_bytes()
        write_file(f.name + INDEX_SUFFIX, idx_bytes, self.fsync)
        name = os.path.basename(f.name)
        self.shards.append(ShardInfo(
            name=name, num_samples=self._shard_samples, bytes=self._shard_bytes,
            sha256=index.shard_sha256, num_blocks=index.num_blocks, index=name + INDEX_SUFFIX,
            index_bytes=len(idx_bytes), index_sha256=hashlib.sha256(idx_bytes).hexdigest()))
        self.bytes_written += self._shard_bytes + len(idx_bytes)
        self._reset_shard()

    def finish(self) -> list[ShardInfo]:
        """Flush the open block and shard; returns every shard written."""
        if self._warm is not None:
            self._start_frames()
        self._flush_block()
        self._finish_shard()
        return self.shards

    def close_files(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None
