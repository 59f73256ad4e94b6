"""``shardstream verify``: recompute checksums and decode every sample.

:func:`verify` never raises for a bad shard: whatever a shard or its index
can cause (a shardstream error, or any other exception as a safety net:
``ValueError``, ``RecursionError``, ``OSError``, ``MemoryError``...) becomes a
:class:`Problem` naming the shard, the sample and the byte offset where it was
found, and the other shards are still checked. Only a manifest that cannot be
read (nothing to check against) and bad arguments raise.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable

from shardstream.errors import ShardstreamError
from shardstream.format.frames import CODECS
from shardstream.format.index import TAR_BLOCK, ShardIndex, member_name
from shardstream.format.manifest import ShardInfo
from shardstream.format.webdataset import LAYOUT_WEBDATASET, load_foreign_index
from shardstream.read.dataset import Dataset, iter_block_samples, open_dataset, read_block
from shardstream.read.webdataset import iter_foreign_samples
from shardstream.storage.files import sha256_file

__all__ = ["Problem", "VerifyReport", "verify"]


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with one shard: where (sample key or ordinal, byte offset
    in the shard of the block being read) and why."""

    shard: str
    reason: str
    key: str | None = None
    offset: int | None = None

    def __str__(self) -> str:
        where = f"{self.shard}, sample {self.key}" if self.key is not None else self.shard
        at = f" (at byte offset {self.offset})" if self.offset is not None else ""
        return f"{where}: {self.reason}{at}"


@dataclass
class _Cursor:
    """How far the check of one shard got, for a problem raised from anywhere."""

    key: str | None = None
    offset: int | None = None

    def problem(self, shard: str, exc: BaseException) -> Problem:
        reason = str(exc) if isinstance(exc, ShardstreamError) else \
            f"{type(exc).__name__}: {exc} (while reading the shard; it is damaged or crafted)"
        return Problem(shard, reason or type(exc).__name__, self.key, self.offset)


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(source: str, *, decode: bool = True,
           progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every shard listed in the manifest; never raises for bad shards.

    Each bad shard gives one :class:`Problem` (shard, sample, byte offset, reason)
    and the check goes on with the next. Raises only when ``source`` has no
    readable manifest (:class:`~shardstream.errors.ManifestError`, nothing to
    check against). ``progress(nbytes)`` is called as shard bytes are checked.
    """
    ds = open_dataset(source)
    report = VerifyReport()
    start = 0
    for info in ds.manifest.shards:
        cursor = _Cursor()
        try:
            problem = _check_shard(ds, info, start, decode, report, cursor)
        except Exception as exc:  # a bad shard must not stop the check of the others
            problem = cursor.problem(info.name, exc)
        if problem:
            report.problems.append(problem)
        report.shards += 1
        start += info.num_samples
        if progress:
            progress(info.bytes)
    return report


def _key(ds: Dataset, sample: dict | None, ordinal: int) -> str:
    value = sample.get(ds.manifest.key_field) if sample else None
    return str(value) if value is not None else f"{ordinal:09d}"


def _check_shard(ds: Dataset, info: ShardInfo, start: int, decode: bool,
                 report: VerifyReport, cursor: _Cursor) -> Problem | None:
    path, idx_path = ds.shard_path(info), ds.index_path(info)
    for p in (path, idx_path):
        if not os.path.exists(p):
            return Problem(info.name, f"{p} is missing")
    size = os.path.getsize(path)
    if size != info.bytes:
        return Problem(info.name, f"size {size} != {info.bytes} in the manifest (truncated?)")
    if sha256_file(path) != info.sha256:
        return Problem(info.name, "sha256 differs from the manifest: the shard was modified")
    with open(idx_path, "rb") as f:
        idx_bytes = f.read()
    if hashlib.sha256(idx_bytes).hexdigest() != info.index_sha256:
        return Problem(info.name, f"index {info.index} sha256 differs from the manifest; "
                       "rebuild it with `shardstream index`")
    if ds.manifest.layout == LAYOUT_WEBDATASET:
        return _check_foreign(ds, info, start, decode, report, cursor)
    try:
        index = ShardIndex.from_bytes(idx_bytes, where=idx_path)
    except ShardstreamError as exc:
        return Problem(info.name, str(exc))
    if index.shard_sha256 != info.sha256 or index.num_samples != info.num_samples:
        return Problem(info.name, "index does not describe this shard; rebuild it with "
                       "`shardstream index`")
    report.bytes += size
    with open(path, "rb") as f:
        for b in range(index.num_blocks):
            first, stop = index.block_samples(b)
            cursor.key, cursor.offset = f"{start + first:09d}", int(index.block_offset[b])
            problem = _check_block(f, index, b, info.name)
            if problem:
                return Problem(info.name, problem, cursor.key, cursor.offset)
            if not decode:
                report.samples += stop - first
                continue
            ordinal = start + first
            data = read_block(f, index, b, where=info.name)
            for _ in iter_block_samples(data, index, b, where=info.name):
                ordinal += 1
                cursor.key = _key(ds, None, ordinal)  # the next one, should it fail
                report.samples += 1
    return None


def _check_foreign(ds: Dataset, info: ShardInfo, start: int, decode: bool,
                   report: VerifyReport, cursor: _Cursor) -> Problem | None:
    """A webdataset tar indexed in place: decode every sample through its index
    (errors propagate to :func:`verify`, which words them with ``cursor``)."""
    path = ds.shard_path(info)
    index = load_foreign_index(ds.index_path(info))
    if index.shard_sha256 != info.sha256 or index.num_samples != info.num_samples:
        return Problem(info.name, "index does not describe this shard; rebuild it with "
                       "`shardstream index`")
    report.bytes += info.bytes
    if not decode:
        report.samples += index.num_samples
        return None
    samples = iter_foreign_samples(path, index)  # one read of the shard, then per sample
    for j in range(index.num_samples):
        cursor.key, cursor.offset = f"{start + j:09d}", _member_offset(index, j)
        next(samples)
        report.samples += 1
    return None


def _member_offset(index: object, j: int) -> int | None:
    """Byte offset of sample ``j``'s first member in a webdataset tar, if the index says."""
    try:
        return int(index.member_offset[int(index.member_first[j])])  # type: ignore[attr-defined]
    except (IndexError, ValueError, TypeError, AttributeError):
        return None


def _check_block(f, index: ShardIndex, block: int, shard: str) -> str | None:
    """The tar header in front of the block must name it and give its size."""
    off = int(index.block_offset[block]) - TAR_BLOCK
    f.seek(off)
    try:
        header = tarfile.TarInfo.frombuf(f.read(TAR_BLOCK), "utf-8", "surrogateescape")
    except tarfile.TarError as exc:
        return f"block {block}: bad tar header at offset {off} ({exc})"
    suffix = CODECS[index.compression] if index.compression in CODECS else ""
    if header.name != member_name(block, suffix) or header.size != int(index.block_size[block]):
        return (f"block {block}: tar header says {header.name!r} of {header.size} bytes, the "
                "index disagrees")
    return None
