"""Arrow record batch -> encoded samples, column by column, without a dict per row.

:func:`encode_batch` gives the bytes :func:`~shardstream.format.encode.encode_sample`
gives for the rows :func:`~shardstream.write.arrow.batch_dicts` makes (``arrays="auto"``),
and the schema fields they add, for batches of the column types it knows: integers,
floats, bools, strings, binaries and lists of numbers or bools (nulls allowed, except
inside a list). Each column becomes a few byte segments per row, the small ones (msgpack
headers, the field names) built with numpy, the large ones (array elements, string
bytes) taken from the Arrow buffers; pyarrow then joins every row's segments in C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from shardstream.format.codec import EXT_LAYOUT, NDARRAY_EXT
from shardstream.write.arrow import is_listlike, is_numeric, list_lengths, storage

__all__ = ["EncodedRows", "encode_batch"]


@dataclass(frozen=True)
class EncodedRows:
    """Samples encoded by :func:`encode_batch`, back to back, with the schema fields they
    add: sample ``i`` is ``data[offsets[i]:offsets[i + 1]]`` (``offsets[0] == 0``)."""

    data: Any  # a bytes-like object (a pyarrow Buffer)
    offsets: np.ndarray  # int64, one more than the samples
    schema: dict[str, dict[str, Any]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def samples(self) -> list[bytes]:
        """Each sample's bytes (a copy; the writers take :attr:`data` as it is)."""
        view, o = memoryview(self.data), self.offsets.tolist()
        return [bytes(view[a:b]) for a, b in zip(o, o[1:])]


class _Meta(NamedTuple):
    """Small per-row bytes: row ``i`` is ``m[i, :lens[i]]`` (``m[i]`` if ``lens`` is None)."""

    m: np.ndarray
    lens: np.ndarray | None = None


# (first byte, bytes after it, their dtype) by size class, smallest first, as msgpack
# writes ints (positive, negative) and the lengths of str, bin and ext values
_UINT = ((0xcc, 1, ">u1"), (0xcd, 2, ">u2"), (0xce, 4, ">u4"), (0xcf, 8, ">u8"))
_INT = ((0xd0, 1, ">i1"), (0xd1, 2, ">i2"), (0xd2, 4, ">i4"), (0xd3, 8, ">i8"))
_STR = ((0xd9, 1, ">u1"), (0xda, 2, ">u2"), (0xdb, 4, ">u4"))
_BIN = ((0xc4, 1, ">u1"), (0xc5, 2, ">u2"), (0xc6, 4, ">u4"))
_EXT = ((0xc7, 1, ">u1"), (0xc8, 2, ">u2"), (0xc9, 4, ">u4"))
_FIXEXT = {1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8}


def _sized(v: np.ndarray, classes: tuple, m: np.ndarray, lens: np.ndarray,
           todo: np.ndarray) -> None:
    """Write ``first byte, v`` into ``m`` for the rows of ``todo``, by the smallest of
    ``classes`` that holds ``v`` (the last one takes the rest)."""
    for i, (code, size, dt) in enumerate(classes):
        if i == len(classes) - 1:
            fits = todo
        elif dt[1] == "u":
            fits = todo & (v < (1 << (8 * size)))
        else:
            fits = todo & (v >= -(1 << (8 * size - 1)))
        idx = np.flatnonzero(fits)
        if idx.size:
            m[idx, 0] = code
            m[idx, 1:1 + size] = v[idx].astype(dt).view(np.uint8).reshape(-1, size)
            lens[idx] = 1 + size
        todo = todo & ~fits


def _ints(v: np.ndarray) -> _Meta:
    m = np.zeros((len(v), 9), np.uint8)
    lens = np.ones(len(v), np.int64)
    if v.dtype.kind == "u":
        v = v.astype(np.uint64)
        fix = v < 128
        _sized(v, _UINT, m, lens, ~fix)
    else:
        v = v.astype(np.int64)
        fix = (v >= -32) & (v < 128)
        _sized(v, _UINT, m, lens, v >= 128)
        _sized(v, _INT, m, lens, v < -32)
    m[fix, 0] = v[fix].astype(np.uint8)  # positive and negative fixint
    return _Meta(m, lens)


def _length_head(n: np.ndarray, classes: tuple, fix: int | None) -> _Meta:
    """msgpack str (``fix=0xa0``) or bin (``fix=None``) headers for these byte lengths."""
    m = np.zeros((len(n), 5), np.uint8)
    lens = np.ones(len(n), np.int64)
    small = n < 32 if fix is not None else np.zeros(len(n), bool)
    m[small, 0] = (0xa0 | n[small]).astype(np.uint8)
    _sized(n, classes, m, lens, ~small)
    return _Meta(m, lens)


def _ext_head(payload: np.ndarray) -> _Meta:
    """msgpack ext headers (through the type byte) for payloads of these sizes."""
    n = len(payload)
    m = np.zeros((n, 6), np.uint8)
    lens = np.zeros(n, np.int64)
    todo = np.ones(n, bool)
    for size, code in _FIXEXT.items():
        idx = np.flatnonzero(payload == size)
        m[idx, 0], lens[idx] = code, 1
        todo[idx] = False
    _sized(payload, _EXT, m, lens, todo)
    m[np.arange(n), lens] = NDARRAY_EXT
    return _Meta(m, lens + 1)


def _with_nulls(parts: list, valid: np.ndarray | None) -> list:
    """Null rows: ``0xc0`` in the first part, nothing in the others (their raw
    segments are empty already)."""
    if valid is None:
        return parts
    null = ~valid
    out = []
    for i, p in enumerate(parts):
        if not isinstance(p, _Meta):
            out.append(p)
            continue
        m = p.m.copy()
        lens = np.full(len(m), m.shape[1]) if p.lens is None else p.lens.copy()
        lens[null] = 1 if i == 0 else 0
        if i == 0:
            m[null, 0] = 0xc0
        out.append(_Meta(m, lens))
    return out


def _binary(pa: Any, data: Any, offs: np.ndarray) -> Any:
    """A large_binary array over ``data`` (a buffer) with these byte offsets."""
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(offs) - 1, [
        None, pa.py_buffer(np.ascontiguousarray(offs, np.int64)), data])


def _scalar(pa: Any, t: Any, col: Any, valid: np.ndarray | None) -> tuple[list, str]:
    fill = False if pa.types.is_boolean(t) else 0
    v = (col.fill_null(fill) if valid is not None else col).to_numpy(zero_copy_only=False)
    if pa.types.is_boolean(t):
        return [_Meta((0xc2 + v.astype(np.uint8)).reshape(-1, 1))], "bool"
    if pa.types.is_integer(t):
        return [_ints(v)], "int"
    m = np.empty((len(v), 9), np.uint8)
    m[:, 0] = 0xcb  # msgpack float64, as Python floats are written
    m[:, 1:] = v.astype(">f8").view(np.uint8).reshape(-1, 8)
    return [_Meta(m)], "float"


def _bytes(pa: Any, t: Any, col: Any, valid: np.ndarray | None) -> tuple[list, str]:
    import pyarrow.compute as pc

    text = pa.types.is_string(t) or pa.types.is_large_string(t)
    raw = col.cast(pa.large_binary())
    if valid is not None:
        raw = raw.fill_null(b"")
    sizes = pc.binary_length(raw).to_numpy(zero_copy_only=False).astype(np.int64)
    head = _length_head(sizes, _STR, 0xa0) if text else _length_head(sizes, _BIN, None)
    return [head, raw], "str" if text else "bytes"


def _array(pa: Any, col: Any, valid: np.ndarray | None, entry: dict) -> list | None:
    flat_arr = col.flatten()  # the items of the non-null rows
    if flat_arr.null_count:
        return None  # the dict path names the null
    flat = np.ascontiguousarray(flat_arr.to_numpy(zero_copy_only=False))
    lengths = list_lengths(col)
    dt = flat.dtype
    code = dt.str.encode("ascii")  # the header encode_sample writes for a 1-d array
    prefix = np.frombuffer(bytes([EXT_LAYOUT, len(code)]) + code + bytes([1]), np.uint8)
    n = len(lengths)
    shape = np.concatenate([np.broadcast_to(prefix, (n, len(prefix))),
                            lengths.astype("<u8").view(np.uint8).reshape(n, 8)], 1)
    nbytes = lengths * dt.itemsize
    data = _binary(pa, pa.py_buffer(flat.view(np.uint8)), np.concatenate([[0], np.cumsum(nbytes)]))
    ok = lengths if valid is None else lengths[valid]
    if ok.size:
        entry["dtypes"] = [str(dt)]
        entry["shape"] = [int(ok[0]) if (ok == ok[0]).all() else None]
    return [_ext_head(len(prefix) + 8 + nbytes), _Meta(shape), data]


def _encode_column(pa: Any, col: Any) -> tuple[list, dict[str, Any]] | None:
    """One column's parts (``_Meta`` or large_binary arrays) and its schema entry;
    None: not a type this encodes."""
    col = storage(col)
    t = col.type
    valid = col.is_valid().to_numpy(zero_copy_only=False) if col.null_count else None
    entry: dict[str, Any] = {"count": len(col)}
    if is_numeric(t):
        parts, name = _scalar(pa, t, col, valid)
    elif pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) \
            or pa.types.is_large_binary(t):
        parts, name = _bytes(pa, t, col, valid)
    elif is_listlike(t) and is_numeric(t.value_type):
        got = _array(pa, col, valid, entry)
        if got is None:
            return None
        parts, name = got, "ndarray"
    else:
        return None
    entry["types"] = sorted({name, "null"} if valid is not None else {name})
    return _with_nulls(parts, valid), entry


def _merge(pa: Any, run: list[_Meta], n: int) -> Any:
    """Adjacent small parts as one large_binary array (row i: each part's bytes in turn)."""
    m = run[0].m if len(run) == 1 else np.concatenate([p.m for p in run], 1)
    if all(p.lens is None for p in run):
        w = m.shape[1]
        return _binary(pa, pa.py_buffer(np.ascontiguousarray(m)), np.arange(n + 1) * w)
    keep = np.concatenate([np.ones(p.m.shape, bool) if p.lens is None else
                           np.arange(p.m.shape[1]) < p.lens[:, None] for p in run], 1)
    offs = np.concatenate([[0], np.cumsum(keep.sum(1))])
    return _binary(pa, pa.py_buffer(m[keep]), offs)


def _map_head(k: int) -> bytes:
    return bytes([0x80 | k]) if k < 16 else b"\xde" + k.to_bytes(2, "big")


def encode_batch(batch: Any, key_field: str = "__key__") -> EncodedRows | None:
    """Encode every row of a record batch, or ``None`` where the dicts must be used: a
    column of another type (struct, nested list, dictionary, temporal...), a list of
    numbers holding a null (the dict path names it), or a key field that is missing,
    null or not int/str (the writer names it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names, n = batch.schema.names, batch.num_rows
    if key_field in names:
        key = batch.column(names.index(key_field))
        if not (pa.types.is_integer(key.type) or pa.types.is_string(key.type)
                or pa.types.is_large_string(key.type)) or key.null_count:
            return None
    elif key_field != "__key__":
        return None
    if len(names) >= 1 << 16 or len(set(names)) != len(names):
        return None
    head = np.frombuffer(_map_head(len(names)), np.uint8)
    parts: list = [_Meta(np.broadcast_to(head, (n, len(head))))]
    schema = {}
    for name, col in zip(names, batch.columns):
        got = _encode_column(pa, col)
        if got is None:
            return None
        key_bytes = np.frombuffer(msgpack.packb(name), np.uint8)
        parts.append(_Meta(np.broadcast_to(key_bytes, (n, len(key_bytes)))))
        parts += got[0]
        schema[name] = got[1]
    segments, run = [], []
    for p in parts + [None]:
        if isinstance(p, _Meta):
            run.append(p)
            continue
        if run:
            segments.append(_merge(pa, run, n))
            run = []
        if p is not None:
            segments.append(p)
    joined = segments[0] if len(segments) == 1 else pc.binary_join_element_wise(
        *segments, pa.scalar(b"", pa.large_binary()))
    _, offs, data = joined.buffers()
    offsets = np.frombuffer(offs, np.int64)[joined.offset:joined.offset + n + 1]
    first = int(offsets[0])
    return EncodedRows(data.slice(first, int(offsets[-1]) - first), offsets - first, schema)
