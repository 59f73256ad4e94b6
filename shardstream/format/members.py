"""Decoding webdataset tar members by extension, safely (never unpickles).

``.json``/``.jsn`` -> ``json.loads``; ``.npy`` -> array (``np.load`` semantics,
``allow_pickle=False``, header parse cached); ``.npz`` -> dict of arrays;
``.cls``/``.cls2``/``.index``/``.inx``/``.id`` -> int; ``.txt``/``.text``/
``.transcript`` -> str; ``.msgpack``/``.mp``/``.mpk``/``.msg`` -> msgpack with
shardstream's array ext; anything else (``.pyd``, ``.pickle``, ``.pth``,
images, ``.gz``, ...) stays ``bytes``.

Members come from tars shardstream did not write, so nothing in them is trusted:
a member that cannot be decoded is a :class:`~shardstream.errors.DecodeError`
naming it, and no member can make the reader allocate much more than it holds.
An ``.npz`` may inflate to at most :data:`NPZ_MAX_BYTES` in all, each entry to
at most :data:`NPZ_MAX_RATIO` times its compressed size; an ``.npy`` header must
describe the bytes that follow it; msgpack nests at most
:data:`~shardstream.format.codec.MAX_DEPTH` deep and JSON as deep as the recursion limit.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import msgpack
import numpy as np

from shardstream.errors import DecodeError
from shardstream.format.codec import UNPACK_OPTIONS, msgpack_reason

__all__ = ["decode_member", "NPZ_MAX_BYTES", "NPZ_MAX_RATIO", "DECODERS", "decode_msgpack",
           "decode_npy", "decode_npz"]


_FOREIGN_MSGPACK = dict(UNPACK_OPTIONS, strict_map_key=False)  # other writers use int keys

#: most bytes one ``.npz`` member may inflate to, all its entries together
NPZ_MAX_BYTES = 1 << 30
#: most an ``.npz`` entry may inflate per compressed byte (deflate's own limit is 1032)
NPZ_MAX_RATIO = 1100
_NPZ_SLACK = 4096  # tiny entries: zip overhead makes their ratio meaningless
_CHUNK = 1 << 20

_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}


def decode_npy(data: bytes | bytearray) -> np.ndarray:
    """``.npy`` bytes -> an array viewing them (``np.load`` semantics, no pickle;
    read-only for ``bytes``). Parsed headers are cached: repeated dtypes/shapes cost
    ~1 us, not 25."""
    if data[:6] != _NPY_MAGIC or len(data) < 10:
        raise DecodeError("not a .npy file (bad magic)")
    major = data[6]
    end = 10 + int.from_bytes(data[8:10], "little") if major == 1 else \
        12 + int.from_bytes(data[8:12], "little")
    head = bytes(data[6:end])
    hit = _npy_headers.get(head)
    if hit is None:
        hit = _npy_header(data)
        if len(_npy_headers) > 4096:
            _npy_headers.clear()
        _npy_headers[head] = hit
    shape, fortran, dtype, count = hit
    try:
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    except (ValueError, OverflowError):
        raise DecodeError(f".npy header says shape {shape} of {dtype} ({count * dtype.itemsize} "
                          f"bytes), the data holds {max(len(data) - end, 0)}: truncated or "
                          "damaged") from None
    return arr.reshape(shape, order="F" if fortran else "C")


def _npy_header(data: bytes | bytearray) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, element count) of a ``.npy`` header, checked."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fp) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fp))
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise DecodeError(f"bad .npy header ({exc})") from exc
    if dtype.hasobject:
        raise DecodeError("object arrays cannot be loaded without pickle")
    if any(type(d) is not int or d < 0 for d in shape) or len(shape) > 64:
        raise DecodeError(f"bad .npy shape {shape}")
    count = 1
    for d in shape:
        count *= d
    if dtype.itemsize == 0 and count:
        raise DecodeError(f".npy dtype {dtype} has no size")
    return shape, fortran, dtype, count


def decode_npz(data: bytes) -> dict:
    """``.npz`` bytes -> {name: array} (entries not holding ``.npy`` stay bytes).

    Every entry's declared size is checked against :data:`NPZ_MAX_RATIO` and, all
    together, :data:`NPZ_MAX_BYTES` before anything is inflated, and read with a
    bound, so a lying header cannot inflate past it either.
    """
    out: dict[str, Any] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
        _check_npz_sizes(infos)
        for info in infos:
            raw = _read_entry(z, info)
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            out[name] = decode_npy(raw) if raw[:6] == _NPY_MAGIC else bytes(raw)
    return out


def _check_npz_sizes(infos: list[zipfile.ZipInfo]) -> None:
    total = 0
    for info in infos:
        size = info.file_size
        if size > max(info.compress_size * NPZ_MAX_RATIO, _NPZ_SLACK):
            raise DecodeError(f".npz entry {info.filename!r} declares {size} bytes from "
                              f"{info.compress_size} compressed: more than x{NPZ_MAX_RATIO} "
                              "(shardstream.format.members.NPZ_MAX_RATIO): a zip bomb or damaged")
        total += size
        if total > NPZ_MAX_BYTES:
            raise DecodeError(f".npz entries declare {total} bytes or more, over the "
                              f"{NPZ_MAX_BYTES}-byte limit (shardstream.format.members.NPZ_MAX_BYTES; "
                              "raise it if you trust this data)")


def _read_entry(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    """An entry's bytes, at most its declared size (a writable buffer)."""
    size = info.file_size
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    with z.open(info) as f:
        while pos < size:
            chunk = f.read(min(_CHUNK, size - pos))
            if not chunk:
                break
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if pos != size or f.read(1):
            raise DecodeError(f".npz entry {info.filename!r} does not hold the {size} bytes "
                              "it declares: damaged")
    return buf


def decode_msgpack(data: bytes) -> Any:
    return msgpack.unpackb(data, **_FOREIGN_MSGPACK)


DECODERS = {
   **dict.fromkeys(("txt", "text", "transcript"), lambda b: b.decode("utf-8")),
   **dict.fromkeys(("cls", "cls2", "index", "inx", "id"), int),
   **dict.fromkeys(("json", "jsn"), json.loads),
   **dict.fromkeys(("msgpack", "mp", "mpk", "msg"), decode_msgpack),
   "npy": decode_npy, "npz": decode_npz,
}  # everything else (pyd, pickle, pkl, pth, jpg, ...) stays bytes: never unpickled


def decode_member(ext: str, data: bytes, *, where: str = "") -> Any:
    """Decode one member by the last part of its extension, like webdataset's
    basic handlers, minus pickle and torch.load (those stay bytes).

    Raises :class:`DecodeError` naming the member (``where``, e.g. the shard and
    sample, else its extension) and what is wrong with it.
    """
    fn = DECODERS.get(ext.rpartition(".")[2].lower())
    if fn is None:
        return data
    try:
        return fn(data)
    except Exception as exc:  # int(), json, numpy, zipfile, msgpack: many unrelated types
        raise DecodeError(f"{where or 'member'} ({ext!r}) cannot be decoded: "
                          f"{_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    if isinstance(exc, DecodeError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, msgpack.UnpackException):
        return msgpack_reason(exc)
    return f"{type(exc).__name__}: {exc}"
