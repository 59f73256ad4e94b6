"""Listing the members of a tar fast: ustar/PAX headers read from an mmap.

About 5x faster than :mod:`tarfile` on shards of many small members (checked
against it in the tests). Tars are untrusted input: every header is checked
(checksum, numeric fields, PAX records, GNU long names, sizes against the
file) and the walk always moves forward, so a hostile tar gives a
:class:`~shardstream.errors.CorruptShardError` naming the file and the byte
offset of the bad header -- never a hang, a loop or a huge allocation.
Member names are data, never paths: names that are not UTF-8, hold NUL or
control characters, are absolute or contain a ``..`` component are refused,
as are duplicated names and sparse members (their bytes are not contiguous,
so an index cannot point at them). Compressed tars are refused with a clear
error: an index can only point into an uncompressed tar.
"""

from __future__ import annotations

import mmap
import os
import re
import tarfile
from typing import NamedTuple

from shardstream.errors import CorruptShardError, ShardNotFoundError, StorageError
from shardstream.format.index import TAR_END, padded

__all__ = ["Member", "list_members", "list_members_tarfile", "check_member_size",
           "MAX_EXTENDED_HEADER"]


#: largest PAX / GNU long-name header accepted (bytes); real ones hold a few hundred
MAX_EXTENDED_HEADER = 1 << 20


class Member(NamedTuple):
    name: str
    offset_data: int
    size: int


def list_members(path: str, limit: int | None = None) -> list[Member]:
    """Regular members of an uncompressed tar, in order.

    Walks the 512-byte headers itself (ustar, POSIX pax extended and global
    headers, GNU long names; ~5x faster than :mod:`tarfile` on webdataset's
    pax-headed tars). ``limit``: stop after that many members (no
    end-of-archive check). Raises :class:`CorruptShardError` naming ``path``
    and the byte offset of the first bad header.
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
            return _Walk(mm, path).run(limit)
    finally:
        os.close(fd)


_ZERO = bytes(512)
_NO_DATA_TYPES = frozenset(b"123456")  # hard/sym links, devices, dirs, fifos: no data follows
_REG_TYPES = frozenset(b"07\0")
_EXT_TYPES = frozenset(b"xXgLK")  # pax extended (x, Solaris X), pax global, GNU long name/link
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gz, bz2, xz, zstd
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(rb"[0-9]{1,20}")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FIX = "the tar is damaged or was not written by a standard tar writer: re-create it"


def _bad(path: str, pos: int, what: str) -> CorruptShardError:
    return CorruptShardError(f"shard {path}: bad tar header at byte {pos}: {what}; {_FIX}")


def _sparse(path: str, pos: int) -> CorruptShardError:
    return _bad(path, pos, "a sparse member: its bytes are not stored contiguously, so it "
                           "cannot be indexed; re-create the tar without --sparse")


class _Walk:
    """One forward pass over the headers of a mapped tar."""

    def __init__(self, mm: mmap.mmap, path: str) -> None:
        self.mm, self.path, self.n = mm, path, len(mm)
        self.glob: dict[str, bytes] = {}  # pax global records, for every later member
        self.names: set[str] = set()

    def run(self, limit: int | None) -> list[Member]:
        mm, path, n = self.mm, self.path, self.n
        if mm[:6].startswith(_COMPRESSED):
            raise CorruptShardError(f"{path} is a compressed tar; compressed tars cannot be "
                                    "indexed for random access: decompress it first")
        out: list[Member] = []
        pos = 0
        start = 0  # where the current member's headers (extended ones first) begin
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        for _ in range(n // 512 + 1):  # every step moves at least one 512-byte header on
            hdr = mm[pos:pos + 512]
            if len(hdr) < 512:
                raise CorruptShardError(f"shard {path} is truncated: it ends inside the tar "
                                        f"header at byte {pos} (no end-of-archive marker)")
            if hdr == _ZERO:
                if pos != start:
                    raise _bad(path, start, "an extended header is not followed by a member")
                if mm[pos:pos + 1024] != TAR_END:
                    raise CorruptShardError(f"shard {path} is truncated: incomplete "
                                            f"end-of-archive marker at byte {pos}")
                return out
            size = self._header_size(hdr, pos)
            kind = hdr[156]
            if kind == 0 and _ustar_name(hdr).endswith(b"/"):
                kind = ord("5")  # old tars mark directories by a trailing slash
            data = pos + 512
            if kind in _EXT_TYPES:
                blob = self._extended(data, size, pos)
                if kind == ord("g"):
                    self.glob.update(_pax_records(blob, path, pos))
                elif kind in b"xX":
                    pax.update(_pax_records(blob, path, pos))
                elif kind == ord("L"):
                    long_name = _gnu_long_name(blob, path, pos)
                fresh = start == pos and kind == ord("g")  # a global header alone
                pos = data + padded(size)
                if fresh:
                    start = pos
                continue
            if kind == ord("S"):
                raise _sparse(path, start)
            records = {**self.glob, **pax} if self.glob else pax
            if "size" in records:
                size = _pax_size(records["size"], path, start)
            if kind in _NO_DATA_TYPES:
                size = 0
            elif data + size > n:
                raise CorruptShardError(
                    f"shard {path} is truncated: the member whose header is at byte {start} "
                    f"declares {size} data bytes, past the end of the file ({n} bytes); "
                    "restore the tar, or re-create it")
            raw = records.get("path") or long_name or _ustar_name(hdr)
            if kind in _REG_TYPES:
                out.append(Member(self._name(raw, start), data, size))
                if limit is not None and len(out) >= limit:
                    return out
            pax, long_name = {}, None
            pos = start = data + padded(size)
        raise _bad(path, pos, "the header walk did not end")  # unreachable: pos grows by >= 512

    def _header_size(self, hdr: bytes, pos: int) -> int:
        """Check the header's checksum; its size field (octal, or GNU base-256)."""
        stored = _octal(hdr[148:156], self.path, pos, "checksum")
        if stored != _checksum(hdr) and stored != _signed_checksum(hdr):
            if pos == 0:
                raise CorruptShardError(f"{self.path} is not an uncompressed tar (compressed "
                                        "tars cannot be indexed: decompress it first)")
            raise _bad(self.path, pos, "header checksum mismatch")
        field = hdr[124:136]
        if field[0] & 0x80:  # GNU base-256: big-endian two's complement
            if field[0] == 0xFF:
                raise _bad(self.path, pos, "negative member size (base-256 size field)")
            size = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        else:
            size = _octal(field, self.path, pos, "size")
        if pos + 512 + size > self.n and hdr[156] not in _NO_DATA_TYPES:
            raise CorruptShardError(f"shard {self.path} is truncated: the header at byte {pos} "
                                    f"declares {size} data bytes, past the end of the file "
                                    f"({self.n} bytes); restore the tar, or re-create it")
        return size

    def _extended(self, data: int, size: int, pos: int) -> bytes:
        if size > MAX_EXTENDED_HEADER:
            raise _bad(self.path, pos, f"extended header of {size} bytes (more than "
                                       f"{MAX_EXTENDED_HEADER})")
        return self.mm[data:data + size]

    def _name(self, raw: bytes, pos: int) -> str:
        name = _check_name(raw, self.path, pos)
        if name in self.names:
            raise _bad(self.path, pos, f"member name {name!r} appears twice in the tar")
        self.names.add(name)
        return name


def _checksum(hdr: bytes) -> int:
    return sum(hdr) - sum(hdr[148:156]) + 256  # the checksum field counts as 8 spaces


def _signed_checksum(hdr: bytes) -> int:
    """Some old tars sum the header as signed chars (tarfile accepts both)."""
    return _checksum(hdr) - 256 * sum(1 for b in (*hdr[:148], *hdr[156:]) if b >= 128)


_OCTALS: dict[bytes, int] = {}  # field bytes -> value: sizes and checksums repeat a lot


def _octal(field: bytes, path: str, pos: int, what: str) -> int:
    value = _OCTALS.get(field)
    if value is not None:
        return value
    digits = field.split(b"\0", 1)[0].strip(b" ")  # NUL-terminated, space-padded
    if digits and not _OCTAL.fullmatch(digits):
        raise _bad(path, pos, f"{what} field {bytes(field)!r} is not an octal number")
    value = int(digits, 8) if digits else 0
    if len(_OCTALS) > 4096:
        _OCTALS.clear()
    _OCTALS[field] = value
    return value


def _ustar_name(hdr: bytes) -> bytes:
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:263] == b"ustar\0":
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name


def _gnu_long_name(blob: bytes, path: str, pos: int) -> bytes:
    name = blob.rstrip(b"\0")
    if not name:
        raise _bad(path, pos, "empty GNU long name")
    if b"\0" in name:
        raise _bad(path, pos, "GNU long name holds a NUL byte")
    return name


def _pax_records(blob: bytes, path: str, pos: int) -> dict[str, bytes]:
    """``LEN KEY=VALUE\\n`` records of a pax header; every malformed one is refused."""
    out: dict[str, bytes] = {}
    i = 0
    while i < len(blob) and blob[i] != 0:
        where = f"pax record at byte {pos + 512 + i}"
        sp = blob.find(b" ", i, i + 21)
        if sp <= i or not blob[i:sp].isdigit():  # bytes.isdigit: ASCII digits only
            raise _bad(path, pos, f"{where}: the record length is not a decimal number")
        end = i + int(blob[i:sp])
        if end <= sp + 2 or end > len(blob):  # at least "K=\n" after the space; inside the blob
            raise _bad(path, pos, f"{where}: record length {end - i} does not fit the "
                                  f"{len(blob)}-byte header")
        if blob[end - 1] != 0x0A:
            raise _bad(path, pos, f"{where}: the record does not end with a newline")
        key, eq, value = blob[sp + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise _bad(path, pos, f"{where}: the record has no KEY=VALUE")
        try:
            k = key.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(path, pos, f"{where}: the key is not UTF-8") from None
        if k.startswith("GNU.sparse"):
            raise _sparse(path, pos)
        out[k] = value
        i = end  # end > i: always forward
    return out


def _pax_size(value: bytes, path: str, pos: int) -> int:
    if not _DECIMAL.fullmatch(value):
        raise _bad(path, pos, f"pax size {value[:40]!r} is not a non-negative decimal number")
    return int(value)


def _check_name(raw: bytes | str, path: str, pos: int) -> str:
    """A member name as a str, refused unless it is a plain relative UTF-8 name."""
    try:
        if isinstance(raw, bytes):
            name = raw.decode("utf-8")
        else:  # from tarfile: undecodable bytes are surrogates, refused by encode()
            name = raw
            name.encode("utf-8")
    except UnicodeError:
        raise _bad(path, pos, f"member name {raw!r} is not valid UTF-8") from None
    problem = None
    if not name:
        problem = "is empty"
    elif _BAD_CHARS.search(name):
        problem = "holds a NUL or control character"
    elif name.startswith("/"):
        problem = "is an absolute path"
    elif ".." in name and ".." in name.split("/"):
        problem = "has a '..' component"
    if problem:
        raise _bad(path, pos, f"member name {name!r} {problem} (member names must be plain "
                              "relative names)")
    return name


def list_members_tarfile(path: str, limit: int | None = None) -> list[Member]:
    """:func:`list_members` through :mod:`tarfile` (a reference; same checks on names,
    sizes and forward progress, so a hostile tar gives a :class:`CorruptShardError`)."""
    try:
        n = os.path.getsize(path)
    except FileNotFoundError:
        raise ShardNotFoundError(f"shard {path} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, ValueError, OverflowError, UnicodeError) as exc:
        raise CorruptShardError(f"{path} is not an uncompressed tar: {exc}") from exc
    out: list[Member] = []
    names: set[str] = set()
    end = prev = -1
    with tf:
        for _ in range(n // 512 + 1):
            try:
                info = tf.next()
            except (tarfile.TarError, ValueError, OverflowError, UnicodeError) as exc:
                raise CorruptShardError(f"shard {path}: damaged tar after "
                                        f"{tf.offset} bytes: {exc}; {_FIX}") from exc
            if info is None:
                break
            tf.members = []
            _check_tarinfo(info, path, n, prev)
            prev = info.offset
            end = info.offset_data + padded(info.size if info.isreg() else 0)
            if info.isreg():
                name = _check_name(info.name, path, info.offset)
                if name in names:
                    raise _bad(path, info.offset, f"member name {name!r} appears twice")
                names.add(name)
                out.append(Member(name, info.offset_data, info.size))
                if limit is not None and len(out) >= limit:
                    return out
        else:
            raise _bad(path, prev, "the header walk did not end")
        tf.fileobj.seek(max(end, 0))
        if tf.fileobj.read(len(TAR_END)) != TAR_END:
            raise CorruptShardError(f"shard {path} is truncated: no end-of-archive marker "
                                    f"after its last complete member (byte {max(end, 0)})")
    return out


def _check_tarinfo(info: tarfile.TarInfo, path: str, n: int, prev: int) -> None:
    """Forward progress, sizes inside the file, no sparse members."""
    if info.offset <= prev or info.offset_data < info.offset:
        raise _bad(path, info.offset, f"the walk went back (after the header at byte {prev})")
    if info.issparse() or info.type == tarfile.GNUTYPE_SPARSE:
        raise _bad(path, info.offset, "a sparse member cannot be indexed")
    if info.isreg() and not 0 <= info.size <= n - info.offset_data:
        raise _bad(path, info.offset, f"member size {info.size} does not fit the file "
                                      f"({n} bytes)")


def check_member_size(path: str, info: Member, size: int) -> None:
    if info.offset_data + info.size > size:
        raise CorruptShardError(f"shard {path} is truncated: member {info.name} needs bytes up "
                                f"to {info.offset_data + info.size}, the file has {size}")
