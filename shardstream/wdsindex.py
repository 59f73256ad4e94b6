"""Indexes for tars written by other tools (webdataset layout), and index rebuilds.

A webdataset tar stores one member per field, ``KEY.EXT``; consecutive members
sharing ``KEY`` (the name up to the first dot of the basename) form a sample,
exactly as ``webdataset`` groups them. :class:`ForeignIndex` records, per
sample, its key and the offset, size and extension of each member, so such
tars gain an exact ``len()``, random access and exact distributed epochs
without being rewritten. :func:`build_index` (``shardstream index``) writes
these indexes plus a ``manifest.json`` marked ``"layout": "webdataset"``,
and also rebuilds a missing or stale ``.idx`` of a shardstream shard by
scanning its tar. The byte layout is in ``docs/random_access.md``.

Index version 2 also records the xxh3_64 of every member's data bytes, which
readers compare on every read (``ShardDataset``: once per sample per process;
streaming: every run of samples read from disk) unless block verification is
off (``verify_blocks=False``, ``$SHARDSTREAM_VERIFY_BLOCKS=0``). Version 1
indexes (no member checksums) are read exactly as before.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import xxhash
from xxhash import xxh3_64_intdigest as xxh3

from . import __version__
from .codec import decode_sample, encode_sample
from .compression import CODECS, DICT_MEMBER, Compression, decompress_block, split_frames
from .errors import CorruptShardError, DatasetExistsError, DecodeError, IndexMismatchError, \
    InputError, ManifestError, ShardNotFoundError, StorageError
from .members import _DECODERS, _msgpack, _npy, _npz, decode_member
from .index import BLOCK_EXT, INDEX_SUFFIX, ShardIndex, block_checksum
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, atomic_write, load_manifest
from .pipeline import verify_blocks_default
from .shard import read_index_file, sha256_file
from .tarscan import check_member_size, list_members

__all__ = ["WDS_INDEX_FORMAT", "LAYOUT_WEBDATASET", "ForeignIndex", "scan_foreign_tar",
           "scan_block_tar", "load_foreign_index", "load_any_index", "decode_member",
           "decode_foreign_sample", "iter_foreign_samples", "build_index", "manifest_layout"]

WDS_INDEX_FORMAT = "shardstream-wds-index"
#: version 2 adds ``member_checksum``; version 1 indexes (without it) are still read
WDS_INDEX_VERSION = 2
_READ_VERSIONS = (1, 2)
LAYOUT_WEBDATASET = "webdataset"
LAYOUT_SHARDSTREAM = "shardstream"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_BLOCK_NAME = re.compile(r"\d{6}\." + BLOCK_EXT + r"(\.zst)?")
_REMOTE = ("s3://", "gs://", "http://", "https://")


# ---------------------------------------------------------------- the index
@dataclass(frozen=True, eq=False)
class ForeignIndex:
    """Where the members of every sample of one webdataset-layout tar live.

    Sample ``j`` has key ``key_blob[key_offset[j]:key_offset[j+1]]`` (UTF-8)
    and members ``member_first[j] .. member_first[j+1]-1``; member ``m``'s data
    is ``member_size[m]`` bytes at ``member_offset[m]``, its extension
    ``exts[member_ext[m]]``, the xxh3_64 of those bytes ``member_checksum[m]``
    (None: a version-1 index, which has no checksums).
    """

    num_samples: int
    shard_bytes: int
    shard_sha256: str
    exts: list[str]
    key_blob: bytes
    key_offset: np.ndarray
    member_first: np.ndarray
    member_offset: np.ndarray
    member_size: np.ndarray
    member_ext: np.ndarray
    member_checksum: np.ndarray | None = None

    @property
    def num_members(self) -> int:
        return len(self.member_offset)

    @property
    def checksummed(self) -> bool:
        """Whether the index records each member's checksum (version 2)."""
        return self.member_checksum is not None

    def key(self, j: int) -> str:
        return self.key_blob[int(self.key_offset[j]):int(self.key_offset[j + 1])].decode()

    def checksums(self) -> memoryview:
        """``member_checksum`` as a memoryview (indexing gives Python ints); made once."""
        view = self.__dict__.get("_checksums")
        if view is None:
            a = self.member_checksum.astype("=u8", copy=False)  # type: ignore[union-attr]
            view = self.__dict__["_checksums"] = memoryview(a).cast("B").cast("Q")
        return view

    def __getstate__(self) -> dict:  # pickling (spawn workers): the view is rebuilt
        state = self.__dict__.copy()
        state.pop("_checksums", None)
        return state

    def checksum_error(self, j: int, m: int, got: int, path: str) -> CorruptShardError:
        """How member ``m`` of sample ``j`` failing its checksum is reported."""
        key, ext = self.key(j), self.exts[int(self.member_ext[m])]
        return CorruptShardError(
            f"shard {path}: sample {key!r} (shard-local sample {j}) member {key}.{ext} at "
            f"byte offset {int(self.member_offset[m])} fails its checksum (xxh3_64 "
            f"{got:016x}, the index says {self.checksums()[m]:016x}): the tar is damaged or "
            "was replaced; restore it (`shardstream verify` checks every tar), or if it was "
            "rewritten on purpose rebuild its index with `shardstream index`")

    def to_bytes(self) -> bytes:
        extra = {} if self.member_checksum is None else \
            {"member_checksum": self.member_checksum.astype("<u8")}
        return encode_sample({
            "format": WDS_INDEX_FORMAT, "version": 1 if self.member_checksum is None else 2,
            "num_samples": self.num_samples, "shard_bytes": self.shard_bytes,
            "shard_sha256": self.shard_sha256, "exts": list(self.exts),
            "key_blob": bytes(self.key_blob),
            "key_offset": self.key_offset.astype("<u8"),
            "member_first": self.member_first.astype("<u8"),
            "member_offset": self.member_offset.astype("<u8"),
            "member_size": self.member_size.astype(_fit(self.member_size, "<u4", "<u8")),
            "member_ext": self.member_ext.astype(_fit(self.member_ext, "<u2", "<u4")),
            **extra,
        }, check=False)

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "index") -> "ForeignIndex":
        """Build and :meth:`validate` an index from its decoded map; any damage or
        crafted value raises :class:`CorruptShardError` naming ``where``."""
        if not isinstance(d, dict):
            raise _bad_index(where, "it is not a map")
        version = d.get("version")
        if type(version) is not int or version not in _READ_VERSIONS:
            raise CorruptShardError(f"{where}: webdataset index version {version!r} "
                                    f"is not supported (this shardstream reads "
                                    f"{_READ_VERSIONS[0]} to {_READ_VERSIONS[-1]}); rebuild it "
                                    "with `shardstream index`")
        fields = _INDEX_FIELDS + (("member_checksum",) if version >= 2 else ())
        missing = [f for f in fields if f not in d]
        if missing:
            raise _bad_index(where, f"field {missing[0]!r} is missing")
        exts, blob, sha = d["exts"], d["key_blob"], d["shard_sha256"]
        if not isinstance(exts, list) or not all(type(e) is str for e in exts):
            raise _bad_index(where, "exts is not a list of strings")
        if not isinstance(blob, bytes):
            raise _bad_index(where, "key_blob is not bytes")
        if not isinstance(sha, str):
            raise _bad_index(where, "shard_sha256 is not a string")
        idx = cls(_int_field(d, "num_samples", where), _int_field(d, "shard_bytes", where),
                  sha, list(exts), blob,
                  *(_array_field(d, f, where) for f in _ARRAY_FIELDS),
                  _checksum_field(d, where) if version >= 2 else None)
        idx.validate(where)
        return idx

    def validate(self, where: str = "index") -> None:
        """Structural checks so a damaged or crafted index cannot send readers astray:
        types, lengths, monotone offsets, members inside the shard (no integer wrap),
        extension ids, keys (UTF-8, no control characters) and extensions."""
        n, m, size = self.num_samples, self.num_members, self.shard_bytes
        for name in ("num_samples", "shard_bytes"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 1 << 63:
                raise _bad_index(where, f"{name} {value!r} is not a non-negative int")
        for name in _ARRAY_FIELDS:
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "ui" or \
                    a.dtype.kind == "i" and a.size and int(a.min()) < 0:
                raise _bad_index(where, f"{name} is not a 1-d array of non-negative ints")
        if self.shard_sha256 and not _SHA256.fullmatch(self.shard_sha256):
            raise _bad_index(where, "shard_sha256 is not a sha256 hex digest")
        if m > size // 512 or n > m:  # every member follows a 512-byte header
            raise _bad_index(where, f"{n} samples / {m} members cannot fit {size} bytes")
        want = {"key_offset": n + 1, "member_first": n + 1, "member_size": m, "member_ext": m}
        if self.member_checksum is not None:
            c = self.member_checksum
            if not isinstance(c, np.ndarray) or c.ndim != 1 or c.dtype.kind != "u" or \
                    c.dtype.itemsize != 8:
                raise _bad_index(where, "member_checksum is not a 1-d array of uint64")
            want["member_checksum"] = m
        for name, length in want.items():
            if len(getattr(self, name)) != length:
                raise _bad_index(where, f"{name} has {len(getattr(self, name))} entries, "
                                        f"expected {length}")
        self._validate_members(where)
        self._validate_names(where)

    def _validate_members(self, where: str) -> None:
        m, size = self.num_members, self.shard_bytes
        first = self.member_first
        if int(first[0]) != 0 or int(first[-1]) != m or int(first.max()) > m or \
                not bool(np.all(np.diff(first.astype(np.int64)) > 0)):
            raise _bad_index(where, "member_first is not increasing from 0 to the member count")
        if m == 0:
            return
        if int(self.member_offset.max()) > size or int(self.member_size.max()) > size:
            raise _bad_index(where, f"a member lies past the end of the {size}-byte shard")
        off = self.member_offset.astype(np.int64)  # both <= size < 2**63: no wrap below
        ends = off + self.member_size.astype(np.int64)
        if int(ends.max()) > size or int(off.min()) < 512 or \
                not bool(np.all(off[1:] >= ends[:-1] + 512)):
            raise _bad_index(where, "member offsets overlap, go backwards or pass the end of "
                                    f"the {size}-byte shard")
        if int(self.member_ext.max()) >= len(self.exts):
            raise _bad_index(where, "member_ext refers to an extension it does not list")

    def _validate_names(self, where: str) -> None:
        blob, ko = self.key_blob, self.key_offset
        if int(ko[0]) != 0 or int(ko.max()) > len(blob) or int(ko[-1]) != len(blob) or \
                not bool(np.all(np.diff(ko.astype(np.int64)) >= 0)):
            raise _bad_index(where, "key_offset is not increasing from 0 to the key bytes")
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_index(where, "the keys are not UTF-8") from None
        inner = ko[1:-1][ko[1:-1] < len(blob)].astype(np.int64)
        raw = np.frombuffer(blob, np.uint8)
        if _NAME_BAD.search(text) or bool(np.any(raw[inner] & 0xC0 == 0x80)):
            raise _bad_index(where, "a key holds a control character or splits a character")
        if len(set(self.exts)) != len(self.exts) or \
                any("/" in e or _NAME_BAD.search(e) for e in self.exts):
            raise _bad_index(where, "the extensions repeat or hold '/' or control characters")


_INDEX_FIELDS = ("num_samples", "shard_bytes", "shard_sha256", "exts", "key_blob",
                 "key_offset", "member_first", "member_offset", "member_size", "member_ext")
_ARRAY_FIELDS = ("key_offset", "member_first", "member_offset", "member_size", "member_ext")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _bad_index(where: str, what: str) -> CorruptShardError:
    return CorruptShardError(f"{where}: damaged webdataset index: {what}; rebuild it with "
                             "`shardstream index`")


def _int_field(d: dict, name: str, where: str) -> int:
    value = d[name]
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise _bad_index(where, f"{name} {value!r} is not a non-negative int")
    return value


def _array_field(d: dict, name: str, where: str) -> np.ndarray:
    """An index array as unsigned ints (signed ones must hold no negatives)."""
    a = d[name]
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "ui":
        raise _bad_index(where, f"{name} is not a 1-d integer array")
    if a.dtype.kind == "i":
        if a.size and int(a.min()) < 0:
            raise _bad_index(where, f"{name} holds negative values")
        a = a.astype(a.dtype.newbyteorder("=").str.replace("i", "u"))
    return a


def _checksum_field(d: dict, where: str) -> np.ndarray:
    """``member_checksum``: xxh3_64 values, any 64 bits, so stored unsigned."""
    a = d["member_checksum"]
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind != "u" or \
            a.dtype.itemsize != 8:
        raise _bad_index(where, "member_checksum is not a 1-d array of uint64")
    return a


def _fit(a: np.ndarray, small: str, big: str) -> str:
    return small if a.size == 0 or int(a.max()) < 1 << (8 * np.dtype(small).itemsize) else big


def load_foreign_index(path: str) -> ForeignIndex:
    """Read a webdataset-layout index file."""
    d = _read_index_dict(path)
    if d.get("format") != WDS_INDEX_FORMAT:
        raise CorruptShardError(f"{path}: not a webdataset-layout index; rebuild it with "
                                "`shardstream index`")
    return ForeignIndex.from_dict(d, where=path)


def load_any_index(path: str) -> ShardIndex | ForeignIndex:
    """Read either kind of index file; the ``format`` field tells which."""
    d = _read_index_dict(path)
    if d.get("format") == WDS_INDEX_FORMAT:
        return ForeignIndex.from_dict(d, where=path)
    return ShardIndex.from_bytes(d["__raw__"], where=path)


def _read_index_dict(path: str) -> dict:
    data = read_index_file(path)
    d = _decode_index(data, path)
    d["__raw__"] = data
    return d


def _decode_index(data: bytes, where: str) -> dict:
    try:
        d = decode_sample(data)
    except DecodeError as exc:
        raise CorruptShardError(f"{where}: unreadable index ({exc}); rebuild it with "
                                "`shardstream index`") from exc
    if not isinstance(d, dict):
        raise _bad_index(where, "it is not a map")
    return d


def is_foreign_index(data: bytes) -> bool:
    """Whether index bytes hold a webdataset-layout index (its ``format`` comes first)."""
    return WDS_INDEX_FORMAT.encode() in data[:64]


def index_from_bytes(data: bytes, where: str) -> ShardIndex | ForeignIndex:
    """Either kind of index from its bytes (for readers that fetched them)."""
    if not is_foreign_index(data):
        return ShardIndex.from_bytes(data, where=where)
    d = _decode_index(data, where)
    if d.get("format") != WDS_INDEX_FORMAT:
        raise _bad_index(where, f"format {d.get('format')!r} is not {WDS_INDEX_FORMAT!r}")
    return ForeignIndex.from_dict(d, where=where)


def decode_foreign_sample(buf: Any, index: ForeignIndex, j: int, *, base: int = 0,
                          decode: bool = True, where: str = "", check: bool = False) -> dict:
    """Sample ``j`` of a shard whose bytes from offset ``base`` are in ``buf``.

    ``check``: compare each member's bytes with its checksum before decoding it
    (indexes with checksums); a mismatch raises :class:`CorruptShardError`.
    """
    m0, m1 = int(index.member_first[j]), int(index.member_first[j + 1])
    sums = index.checksums() if check and index.member_checksum is not None else None
    sample: dict[str, Any] = {"__key__": index.key(j)}
    for m in range(m0, m1):
        a = int(index.member_offset[m]) - base
        b = a + int(index.member_size[m])
        ext = index.exts[int(index.member_ext[m])]
        data = buf[a:b]
        if len(data) != b - a:
            raise CorruptShardError(f"shard {where}: sample {j} ({sample['__key__']!r}) member "
                                    f".{ext} is truncated; restore the shard or rebuild the "
                                    "index with `shardstream index`")
        if sums is not None and xxh3(data) != sums[m]:
            raise index.checksum_error(j, m, xxh3(data), where)
        try:
            sample[ext] = decode_member(ext, data) if decode else data
        except Exception as exc:  # int(), json, npy and msgpack raise different types
            raise CorruptShardError(f"shard {where}: sample {j} ({sample['__key__']!r}) member "
                                    f".{ext} cannot be decoded: {type(exc).__name__}: {exc}"
                                    ) from exc
    return sample


def iter_foreign_samples(shard_path: str, foreign_index: ForeignIndex, start: int = 0,
                         stop: int | None = None, *, decode: bool = True,
                         verify: bool | None = None) -> Iterator[dict]:
    """Yield samples ``[start, stop)`` (shard-local) of a webdataset-layout tar.

    Reads the byte span covering those samples with one read, then decodes by
    extension (``decode=False`` yields raw bytes). Each sample's members are
    compared with their checksums (version-2 indexes) unless ``verify`` is False
    (default: :func:`~shardstream.pipeline.verify_blocks_default`).
    """
    check = verify_blocks_default() if verify is None else verify
    n = foreign_index.num_samples
    stop = n if stop is None else min(stop, n)
    if not 0 <= start <= stop:
        raise ValueError(f"bad sample range [{start}, {stop}) for a shard of {n} samples")
    if start == stop:
        return
    m0, m1 = int(foreign_index.member_first[start]), int(foreign_index.member_first[stop])
    base = int(foreign_index.member_offset[m0])
    end = int((foreign_index.member_offset[m0:m1] + foreign_index.member_size[m0:m1]).max())
    try:
        with open(shard_path, "rb") as f:
            f.seek(base)
            buf = f.read(end - base)
    except FileNotFoundError:
        raise ShardNotFoundError(f"shard {shard_path} is missing") from None
    except OSError as exc:
        raise StorageError(f"cannot read {shard_path}: {exc.strerror or exc}") from exc
    view = memoryview(buf)
    for j in range(start, stop):
        s = decode_foreign_sample(view, foreign_index, j, base=base, decode=False,
                                  where=shard_path, check=check)
        if decode:
            key = s["__key__"]
            s = {k: v if k == "__key__" else
                 decode_member(k, bytes(v), where=f"{shard_path}: sample {j} ({key!r}) member")
                 for k, v in s.items()}
        else:
            s = {k: v if k == "__key__" else bytes(v) for k, v in s.items()}
        yield s


# ---------------------------------------------------------------- the stream reader
#: bytes of tar the stream reader reads (and caches) at once: a run of whole samples
STREAM_BLOCK_BYTES = 64 << 10


class ForeignBlocks:
    """A webdataset tar as :class:`~shardstream.pipeline.BlockReader` reads it.

    Set as ``ShardRef.codec`` by :func:`set_stream_index`, which cuts the tar into
    *blocks*: runs of consecutive samples spanning about
    :data:`STREAM_BLOCK_BYTES` (tar headers between members included). The reader
    reads, caches and block-shuffles them as it does a shardstream shard's blocks;
    :meth:`decode_run` decodes their members by extension, never by msgpack.

    With ``verify`` (and an index with checksums), ``fresh`` has a byte per sample:
    :meth:`decode` sets those of a block just read from disk, and :meth:`decode_run`
    compares such a sample's members with their checksums before decoding them, once.
    """

    foreign = True

    def __init__(self, index: ForeignIndex, block_first: np.ndarray | None = None,
                 verify: bool = False) -> None:
        self.index = index
        self.block_first = block_first
        self.fresh = bytearray(index.num_samples) if verify and index.checksummed else None

    def decode(self, block: int, data: bytes, label: str) -> bytes:
        """Blocks are stored raw; mark the block's samples as not checked yet."""
        if self.fresh is not None:
            first = self.block_first
            j0 = int(first[block])  # type: ignore[index]
            j1 = int(first[block + 1]) if block + 1 < len(first) else self.index.num_samples
            self.fresh[j0:j1] = b"\x01" * (j1 - j0)
        return data

    def decode_run(self, ref: Any, block: int, data: bytes, i0: int, i1: int, out: list,
                   k0: int, fail: Callable[[int, Exception], None]) -> int:
        """Decode samples ``[i0, i1)`` of ``block`` (its bytes: ``data``) into
        ``out[k0:]``; on damage call ``fail(sample, error)``. Returns samples decoded."""
        base = int(ref.block_offset[block])
        fresh = self.fresh
        for j in range(i0, i1):
            check = fresh is not None and fresh[j] == 1
            try:
                out[k0 + j - i0] = decode_foreign_sample(data, self.index, j, base=base,
                                                         where=ref.path, check=check)
            except CorruptShardError as exc:
                fail(j, CorruptShardError(f"{exc} ({ref.label(j)})"))
                return j - i0
            if check:
                fresh[j] = 0  # type: ignore[index]
        return i1 - i0


def set_stream_index(ref: Any, index: ForeignIndex, size: int, verify: bool = True) -> None:
    """Fill a :class:`~shardstream.pipeline.ShardRef`'s block arrays from a webdataset
    tar's index (``size``: the tar's bytes now); see :class:`ForeignBlocks`.
    ``verify``: check member checksums of every block read from disk."""
    if size > index.shard_bytes:
        raise IndexMismatchError(f"shard {ref.path} is {size} bytes, its index says "
                                 f"{index.shard_bytes}: the tar was replaced; rebuild the "
                                 f"index with `shardstream index {ref.path}`")
    n = index.num_samples
    first = index.member_first.astype(np.int64)
    off = index.member_offset.astype(np.int64)
    start = off[first[:-1]]
    end = off[first[1:] - 1] + index.member_size.astype(np.int64)[first[1:] - 1]
    if n:
        change = np.flatnonzero(np.diff((start - start[0]) // STREAM_BLOCK_BYTES)) + 1
        block_first = np.concatenate([[0], change]).astype(np.int64)
    else:
        block_first = np.zeros(0, np.int64)
    counts = np.diff(np.append(block_first, n))
    block_of = np.repeat(np.arange(len(block_first)), counts)
    ref.block_first, ref.block_of = block_first, block_of
    ref.block_offset = start[block_first]
    ref.block_size = end[np.append(block_first[1:], n) - 1] - ref.block_offset
    ref.rel_start = start - ref.block_offset[block_of]
    ref.rel_end = end - ref.block_offset[block_of]
    ref.size = size
    ref.codec = ForeignBlocks(index, block_first, verify)
    ref.index = None  # no block checksums: ForeignBlocks.decode_run checks the members
    if size < index.shard_bytes:
        short = np.flatnonzero(end > size)
        ref.trunc_from = int(short[0]) if len(short) else None


def list_manifest(tars: list[str]) -> Manifest | None:
    """An in-memory manifest for local webdataset tars each indexed in place
    (``<tar>.idx`` written by ``shardstream index``), so a list of them streams with
    exact epochs; None unless every tar has such an index."""
    if not tars:
        return None
    for tar in tars:
        try:
            with open(tar + INDEX_SUFFIX, "rb") as f:
                if not is_foreign_index(f.read(64)):
                    return None
        except OSError:
            return None
    infos = []
    for tar in tars:
        idx_path = tar + INDEX_SUFFIX
        data = read_index_file(idx_path, tar)
        idx = index_from_bytes(data, idx_path)
        if not isinstance(idx, ForeignIndex):
            raise CorruptShardError(f"{idx_path}: not a webdataset-layout index; rebuild it "
                                    f"with `shardstream index {tar}`")
        infos.append(ShardInfo(name=os.path.abspath(tar), num_samples=idx.num_samples,
                               bytes=idx.shard_bytes, sha256=idx.shard_sha256,
                               num_blocks=idx.num_members, index=os.path.abspath(idx_path),
                               index_bytes=len(data),
                               index_sha256=hashlib.sha256(data).hexdigest()))
    return Manifest(shards=infos, block_bytes=0, layout=LAYOUT_WEBDATASET,
                    created_by=f"shardstream {__version__} (indexed webdataset tars, in memory)")


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
                _META.match(name):
            continue
        match = _KEY_EXT.match(name)
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


def detect_layout(path: str) -> str:
    """``"shardstream"`` if the tar's first member is a block (or the dictionary of a
    compressed shard), else ``"webdataset"``."""
    for info in list_members(path, limit=1):
        own = info.name == DICT_MEMBER or _BLOCK_NAME.fullmatch(info.name)
        return LAYOUT_SHARDSTREAM if own else LAYOUT_WEBDATASET
    return LAYOUT_WEBDATASET


def manifest_layout(directory: str) -> str:
    """The ``layout`` a manifest declares (``"shardstream"`` when absent)."""
    try:
        with open(os.path.join(directory, MANIFEST_NAME), "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return LAYOUT_SHARDSTREAM
    layout = doc.get("layout", LAYOUT_SHARDSTREAM) if isinstance(doc, dict) else None
    return layout if isinstance(layout, str) else LAYOUT_SHARDSTREAM


# ---------------------------------------------------------------- build_index
def _expand(shards: list[str]) -> tuple[list[str], str | None]:
    """Shard paths from files, brace patterns, globs and directories; plus the
    directory of a dataset named as a directory (its manifest's home)."""
    out: list[str] = []
    home = None
    for arg in shards:
        arg = os.fspath(arg)
        if arg.startswith(_REMOTE):
            raise NotImplementedError(f"{arg}: indexing object storage comes with the storage "
                                      "module; download the shards and index them locally")
        if os.path.isdir(arg):
            home = arg
            if os.path.exists(os.path.join(arg, MANIFEST_NAME)):
                m = load_manifest(arg)
                out += [os.path.join(arg, s.name) for s in m.shards]
            else:
                out += sorted(glob.glob(os.path.join(glob.escape(arg), "*.tar")))
            continue
        if "{" in arg:
            import braceexpand
            out += list(braceexpand.braceexpand(arg))
        elif any(c in arg for c in "*?[") and not os.path.exists(arg):
            out += sorted(glob.glob(arg))
        else:
            out.append(arg)
    for p in out:
        if not os.path.isfile(p):
            raise ShardNotFoundError(f"shard {p} does not exist")
    if not out:
        raise ValueError(f"no shards found in {shards}")
    return out, home


def build_index(shards: list[str], output_dir: str | None = None, *, checksum: bool = True,
                overwrite: bool = False) -> Manifest:
    """Index tars so :class:`~shardstream.ShardDataset` and the stream reader can use them.

    ``shards``: tar paths, brace patterns (``data-{000..009}.tar``), globs or a
    dataset directory. Webdataset-layout tars get a ``<name>.idx`` each in
    ``output_dir`` (default: the shards' directory) and a manifest there
    marked ``"layout": "webdataset"``, referencing the shards by relative
    path; the tars are not modified. A webdataset tar holding no samples is
    left out (no ``.idx``, not listed in the manifest) with a ``UserWarning``
    naming it; if every tar is empty, :class:`~shardstream.errors.InputError`.
    Each member's data gets an xxh3_64 checksum that readers compare on every
    read; ``checksum=False`` only skips each foreign tar's whole-file sha256.
    Shardstream shards get their ``.idx`` rebuilt next to them (byte-identical
    to the writer's) and the manifest entries updated.
    """
    paths, home = _expand(list(shards))
    out = output_dir or home or _common_dir(paths)
    os.makedirs(out, exist_ok=True)
    layouts = {detect_layout(p) for p in paths}
    if len(layouts) > 1:
        raise ValueError("some shards are shardstream shards and some webdataset tars; index "
                         "them separately")
    if layouts == {LAYOUT_SHARDSTREAM}:
        return _rebuild_own(paths, out, overwrite)
    return _index_foreign(paths, out, checksum, overwrite)


def _common_dir(paths: list[str]) -> str:
    dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(dirs) > 1:
        raise ValueError("the shards live in several directories; pass output_dir (-o)")
    return dirs.pop()


def _write(path: str, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _info(shard: str, out: str, index_path: str, idx_bytes: bytes, num_samples: int,
          size: int, sha: str, parts: int) -> ShardInfo:
    return ShardInfo(name=os.path.relpath(shard, out), num_samples=num_samples, bytes=size,
                     sha256=sha, num_blocks=parts, index=os.path.relpath(index_path, out),
                     index_bytes=len(idx_bytes),
                     index_sha256=hashlib.sha256(idx_bytes).hexdigest())


def _index_foreign(paths: list[str], out: str, checksum: bool, overwrite: bool) -> Manifest:
    if manifest_layout(out) != LAYOUT_WEBDATASET and not overwrite and \
            os.path.exists(os.path.join(out, MANIFEST_NAME)):
        raise DatasetExistsError(f"{out} already holds a shardstream dataset; choose another "
                                 "output directory (-o) or pass overwrite=True (--overwrite)")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError("two shards share a file name; their indexes would collide")
    infos, counts, empty = [], {}, []
    for p in paths:
        idx = scan_foreign_tar(p, checksum=checksum)
        if idx.num_samples == 0:
            empty.append(p)
            continue
        data = idx.to_bytes()
        idx_path = os.path.join(out, os.path.basename(p) + INDEX_SUFFIX)
        _write(idx_path, data)
        infos.append(_info(p, out, idx_path, data, idx.num_samples, idx.shard_bytes,
                           idx.shard_sha256, idx.num_members))
        for e, c in zip(idx.exts, np.bincount(idx.member_ext, minlength=len(idx.exts))):
            counts[e] = counts.get(e, 0) + int(c)
    if empty:
        _skip_empty(empty, paths)
    schema = {e: {"count": c, "types": [_ext_type(e)]} for e, c in sorted(counts.items())}
    manifest = Manifest(shards=infos, schema=schema, block_bytes=0,
                        created_by=f"shardstream {__version__} index (webdataset tars)",
                        layout=LAYOUT_WEBDATASET)
    _write(os.path.join(out, MANIFEST_NAME), manifest.to_json().encode())
    return manifest


def _skip_empty(empty: list[str], paths: list[str]) -> None:
    """Warn about tars without samples (a manifest cannot list them); refuse if all are."""
    names = ", ".join(empty)
    if len(empty) == len(paths):
        raise InputError(f"{names}: no samples to index (every tar is empty or holds only "
                         "metadata members); check the paths")
    warnings.warn(f"{names}: no samples (empty, or only metadata members); left out of the "
                  "manifest", UserWarning, stacklevel=4)


def _ext_type(ext: str) -> str:
    fn = _DECODERS.get(ext.rpartition(".")[2])
    return {int: "int", json.loads: "json", _npy: "ndarray", _npz: "dict",
            _msgpack: "msgpack", None: "bytes"}.get(fn, "str")


def _rebuild_own(paths: list[str], out: str, overwrite: bool) -> Manifest:
    old = None
    if os.path.exists(os.path.join(out, MANIFEST_NAME)) and not overwrite:
        old = load_manifest(out)
    by_name = {s.name: k for k, s in enumerate(old.shards)} if old else {}
    new: list[ShardInfo] = []
    codecs = set()
    for p in paths:
        idx = scan_block_tar(p)
        codecs.add(idx.compression)
        data = idx.to_bytes()
        idx_path = p + INDEX_SUFFIX
        _write(idx_path, data)
        new.append(_info(p, out, idx_path, data, idx.num_samples, idx.shard_bytes,
                         idx.shard_sha256, idx.num_blocks))
    if len(codecs) > 1:
        raise ValueError("some shards are compressed and some are not; index them separately")
    codec = codecs.pop() if codecs else None
    if old is None:  # the level is not stored in the shards: record the default
        manifest = Manifest(shards=new, created_by=f"shardstream {__version__} index",
                            compression=Compression(codec) if codec else None)
    else:
        missing = [s.name for s in new if s.name not in by_name]
        if missing:
            raise ManifestError(f"{os.path.join(out, MANIFEST_NAME)} does not list "
                                f"{', '.join(missing)}; pass overwrite=True (--overwrite) to "
                                "write a new manifest for exactly these shards")
        shards = list(old.shards)
        for s in new:
            shards[by_name[s.name]] = s
        manifest = Manifest(shards=shards, schema=old.schema, key_field=old.key_field,
                            block_bytes=old.block_bytes, created_by=old.created_by,
                            compression=old.compression)
    try:
        manifest.save(out)
    except OSError as exc:
        raise StorageError(f"cannot write {os.path.join(out, MANIFEST_NAME)}: "
                           f"{exc.strerror or exc}") from exc
    return manifest
