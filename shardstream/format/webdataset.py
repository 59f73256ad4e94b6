"""Indexes for tars written by other tools (webdataset layout): the index and its checks.

A webdataset tar stores one member per field, ``KEY.EXT``; consecutive members
sharing ``KEY`` (the name up to the first dot of the basename) form a sample,
exactly as ``webdataset`` groups them. :class:`ForeignIndex` records, per
sample, its key and the offset, size and extension of each member, so such
tars gain an exact ``len()``, random access and exact distributed epochs
without being rewritten. :func:`~shardstream.write.reindex.build_index`
(``shardstream index``) writes these indexes plus a ``manifest.json`` marked
``"layout": "webdataset"``; :mod:`shardstream.read.webdataset` reads through them.
The byte layout is in ``docs/random_access.md``.

Index version 2 also records the xxh3_64 of every member's data bytes, which
readers compare on every read (``ShardDataset``: once per sample per process;
streaming: every run of samples read from disk) unless block verification is
off (``verify_blocks=False``, ``$SHARDSTREAM_VERIFY_BLOCKS=0``). Version 1
indexes (no member checksums) are read exactly as before.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from xxhash import xxh3_64_intdigest as xxh3

from shardstream.errors import CorruptShardError, DecodeError
from shardstream.format.codec import decode_sample
from shardstream.format.compression import DICT_MEMBER
from shardstream.format.encode import encode_sample
from shardstream.format.index import BLOCK_EXT, ShardIndex, read_index_file
from shardstream.format.manifest import MANIFEST_NAME
from shardstream.format.members import decode_member
from shardstream.format.tar import list_members

__all__ = ["WDS_INDEX_FORMAT", "LAYOUT_WEBDATASET", "ForeignIndex", "load_foreign_index",
           "load_any_index", "decode_foreign_sample", "manifest_layout", "KEY_EXT",
           "META_MEMBER"]


WDS_INDEX_FORMAT = "shardstream-wds-index"
#: version 2 adds ``member_checksum``; version 1 indexes (without it) are still read
WDS_INDEX_VERSION = 2
_READ_VERSIONS = (1, 2)
LAYOUT_WEBDATASET = "webdataset"
LAYOUT_SHARDSTREAM = "shardstream"
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_BLOCK_NAME = re.compile(r"\d{6}\." + BLOCK_EXT + r"(\.zst)?")


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
