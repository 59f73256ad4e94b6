"""Listing the members of a tar fast: ustar/PAX headers read from an mmap.

About 5x faster than :mod:`tarfile` on shards of many small members (checked
against it in the tests); rare features (GNU sparse files, long-name
extensions other than PAX) fall back to :mod:`tarfile`. Compressed tars are
refused with a clear error: an index can only point into an uncompressed tar.
"""

from __future__ import annotations

import mmap
import os
import tarfile
from typing import NamedTuple

from .errors import CorruptShardError, ShardNotFoundError, StorageError
from .index import TAR_END, padded

__all__ = ["Member", "list_members", "list_members_tarfile", "check_member_size"]


class Member(NamedTuple):
    name: str
    offset_data: int
    size: int


class _Unsupported(Exception):
    """A tar feature the fast header walk leaves to :mod:`tarfile`."""


def list_members(path: str, limit: int | None = None) -> list[Member]:
    """Regular members of an uncompressed tar, in order.

    Walks the 512-byte headers itself (ustar, POSIX pax and GNU long names;
    ~5x faster than :mod:`tarfile` on webdataset's pax-headed tars) and falls
    back to :mod:`tarfile` for anything rarer (sparse files, global headers).
    ``limit``: stop after that many members (no end-of-archive check).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardNotFoundError(f"shard {path} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CorruptShardError(f"{path} is empty, not a tar")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _walk_headers(mm, path, limit)
            except _Unsupported:
                return list_members_tarfile(path, limit)
    finally:
        os.close(fd)


_ZERO = bytes(512)
_LINK_TYPES = frozenset(b"123456")  # hard/sym links, devices, dirs, fifos: no data follows
_REG_TYPES = frozenset(b"07\0")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gz, bz2, xz, zstd


def _walk_headers(mm: mmap.mmap, path: str, limit: int | None) -> list[Member]:
    out: list[Member] = []
    n, pos = len(mm), 0
    if mm[:6].startswith(_COMPRESSED):
        raise CorruptShardError(f"{path} is a compressed tar; compressed tars cannot be "
                                "indexed for random access: decompress it first")
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        hdr = mm[pos:pos + 512]
        if len(hdr) < 512:
            raise CorruptShardError(f"shard {path} is truncated: it ends inside the tar header "
                                    f"at byte {pos} (no end-of-archive marker)")
        if hdr == _ZERO:
            if mm[pos:pos + 1024] != TAR_END:
                raise CorruptShardError(f"shard {path} is truncated: incomplete end-of-archive "
                                        f"marker at byte {pos}")
            return out
        if _checksum(hdr) != _octal(hdr[148:156], path, pos):
            if pos == 0:
                raise CorruptShardError(f"{path} is not an uncompressed tar (compressed tars "
                                        "cannot be indexed: decompress it first)")
            raise CorruptShardError(f"shard {path}: damaged tar header at byte {pos}")
        kind = hdr[156]
        size = (int.from_bytes(hdr[125:136], "big") if hdr[124] & 0x80
                else _octal(hdr[124:136], path, pos))
        data = pos + 512
        if kind in b"xLK":
            blob = mm[data:data + size]
            if kind == ord("x"):
                pax = _pax_records(blob, path, pos)
            elif kind == ord("L"):
                long_name = blob.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in _REG_TYPES or kind not in _LINK_TYPES:
            if kind not in _REG_TYPES:
                raise _Unsupported
            size = int(pax.get("size", size))
            name = pax.get("path") or long_name or _ustar_name(hdr)
            out.append(Member(name, data, size))
            pax, long_name = {}, None
            if limit is not None and len(out) >= limit:
                return out
        else:
            pax, long_name, size = {}, None, 0
        pos = data + padded(size)
        if pos > n:
            raise CorruptShardError(f"shard {path} is truncated: a member needs bytes up to "
                                    f"{pos}, the file has {n}")


def _checksum(hdr: bytes) -> int:
    return sum(hdr[:148]) + 256 + sum(hdr[156:])


def _octal(field: bytes, path: str, pos: int) -> int:
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise CorruptShardError(f"shard {path}: damaged tar header at byte {pos}") from None


def _ustar_name(hdr: bytes) -> str:
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:263] == b"ustar\0":
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(blob: bytes, path: str, pos: int) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(blob) and blob[i] != 0:
        sp = blob.find(b" ", i)
        try:
            length = int(blob[i:sp])
        except ValueError:
            raise CorruptShardError(f"shard {path}: damaged pax header at byte {pos}") from None
        key, _, value = blob[sp + 1:i + length - 1].partition(b"=")
        k = key.decode("utf-8", "surrogateescape")
        if k.startswith("GNU.sparse"):
            raise _Unsupported
        out[k] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def list_members_tarfile(path: str, limit: int | None = None) -> list[Member]:
    try:
        tf = tarfile.open(path, "r:")
    except tarfile.ReadError as exc:
        raise CorruptShardError(f"{path} is not an uncompressed tar: {exc}") from exc
    out: list[Member] = []
    end = 0
    with tf:
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as exc:
                raise CorruptShardError(f"shard {path}: damaged tar after "
                                        f"{tf.offset} bytes: {exc}") from exc
            if info is None:
                break
            tf.members = []
            end = info.offset_data + padded(info.size if info.isreg() else 0)
            if info.isreg():
                out.append(Member(info.name, info.offset_data, info.size))
                if limit is not None and len(out) >= limit:
                    return out
        tf.fileobj.seek(end)
        if tf.fileobj.read(len(TAR_END)) != TAR_END:
            raise CorruptShardError(f"shard {path} is truncated: no end-of-archive marker "
                                    f"after its last complete member (byte {end})")
    return out


def check_member_size(path: str, info: Member, size: int) -> None:
    if info.offset_data + info.size > size:
        raise CorruptShardError(f"shard {path} is truncated: member {info.name} needs bytes up "
                                f"to {info.offset_data + info.size}, the file has {size}")
