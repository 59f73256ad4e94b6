"""Typed fields of an untrusted index document: counts, byte sizes, uint arrays.

Every value is type-checked and bounded (:data:`MAX_INT`) before use; a failure is a
:class:`BadIndex` naming the field.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_INT", "BadIndex", "index_field", "count_field", "uint_array", "check_array",
           "as_int64"]


MAX_INT = 1 << 62  # any count or byte size an index may hold


class BadIndex(ValueError):
    """What is wrong with an index (becomes a CorruptShardError naming the file)."""


def index_field(d: dict, name: str) -> object:
    if name not in d:
        raise BadIndex(f"field {name!r} is missing")
    return d[name]


def count_field(d: dict, name: str) -> int:
    v = index_field(d, name)
    if type(v) is not int or not 0 <= v < MAX_INT:
        raise BadIndex(f"field {name!r} is {v!r}, not a count")
    return v


def uint_array(d: dict, name: str, itemsize: int | None = None, *, exact: bool = False) -> np.ndarray:
    """Field ``name`` as a 1-D array of non-negative integers, in native byte order.

    ``itemsize``: convert to unsigned ints of that size (all block arrays are u8);
    ``exact``: the stored dtype must already be unsigned of that size (checksums).
    """
    a = index_field(d, name)
    check_array(name, a, limit=None if exact else MAX_INT)
    if exact and (a.dtype.kind != "u" or a.dtype.itemsize != itemsize):
        raise BadIndex(f"field {name!r} has dtype {a.dtype}, not u{itemsize}")
    size = itemsize or a.dtype.itemsize
    want = np.dtype(f"=u{size}")
    if a.dtype != want:
        if a.dtype.itemsize > size and a.size and int(a.max()) >= 1 << (8 * size):
            raise BadIndex(f"field {name!r} holds values too large for u{size}")
        a = a.astype(want)
    return a


def check_array(name: str, a: object, length: int | None = None,
                limit: int | None = MAX_INT) -> None:
    """``a`` is a 1-D integer array (of ``length``), every value in [0, limit)."""
    if not isinstance(a, np.ndarray):
        raise BadIndex(f"field {name!r} is a {type(a).__name__}, not an array")
    if a.dtype.kind not in "ui" or a.ndim != 1:
        raise BadIndex(f"field {name!r} is a {a.ndim}-D {a.dtype} array, not 1-D integers")
    if length is not None and len(a) != length:
        raise BadIndex(f"field {name!r} holds {len(a)} values, expected {length}")
    if a.size and limit is not None and (
            (a.dtype.kind == "i" and int(a.min()) < 0) or int(a.max()) >= limit):
        raise BadIndex(f"field {name!r} holds a value outside [0, 2**62)")


def as_int64(a: np.ndarray) -> np.ndarray:
    """An index array (checked: values < 2**62) as int64."""
    return a.astype(np.int64, copy=False)
