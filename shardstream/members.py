"""Decoding webdataset tar members by extension, safely (never unpickles).

``.json``/``.jsn`` -> ``json.loads``; ``.npy`` -> array (``np.load`` semantics,
``allow_pickle=False``, header parse cached); ``.npz`` -> dict of arrays;
``.cls``/``.cls2``/``.index``/``.inx``/``.id`` -> int; ``.txt``/``.text``/
``.transcript`` -> str; ``.msgpack``/``.mp``/``.mpk``/``.msg`` -> msgpack with
shardstream's array ext; anything else (``.pyd``, ``.pickle``, ``.pth``,
images, ...) stays ``bytes``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import msgpack
import numpy as np

from .codec import _unpack_options

__all__ = ["decode_member"]

_FOREIGN_MSGPACK = dict(_unpack_options, strict_map_key=False)  # other writers use int keys


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}


def _npy(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> a read-only array viewing them (``np.load`` semantics, no
    pickle). Parsed headers are cached: repeated dtypes/shapes cost ~1 us, not 25."""
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy file (bad magic)")
    major = data[6]
    end = 10 + int.from_bytes(data[8:10], "little") if major == 1 else \
        12 + int.from_bytes(data[8:12], "little")
    head = data[6:end]
    hit = _npy_headers.get(head)
    if hit is None:
        fp = io.BytesIO(data)
        version = np.lib.format.read_magic(fp)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fp) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fp))
        if dtype.hasobject:
            raise ValueError("object arrays cannot be loaded without pickle")
        count = 1
        for d in shape:
            count *= d
        hit = (shape, fortran, dtype, count)
        if len(_npy_headers) > 4096:
            _npy_headers.clear()
        _npy_headers[head] = hit
    shape, fortran, dtype, count = hit
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return arr.reshape(shape, order="F" if fortran else "C")


def _npz(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _msgpack(data: bytes) -> Any:
    return msgpack.unpackb(data, **_FOREIGN_MSGPACK)


_DECODERS = {
    **dict.fromkeys(("txt", "text", "transcript"), lambda b: b.decode("utf-8")),
    **dict.fromkeys(("cls", "cls2", "index", "inx", "id"), int),
    **dict.fromkeys(("json", "jsn"), json.loads),
    **dict.fromkeys(("msgpack", "mp", "mpk", "msg"), _msgpack),
    "npy": _npy, "npz": _npz,
}  # everything else (pyd, pickle, pkl, pth, jpg, ...) stays bytes: never unpickled


def decode_member(ext: str, data: bytes) -> Any:
    """Decode one member by the last part of its extension, like webdataset's
    basic handlers, minus pickle and torch.load (those stay bytes)."""
    fn = _DECODERS.get(ext.rpartition(".")[2].lower())
    return data if fn is None else fn(data)
