"""Sample codec: a dict <-> one msgpack map, numpy arrays as a typed ext.

A sample is a msgpack map with ``str`` keys. Values msgpack knows (int in the
64-bit range, float incl. NaN/inf, bool, None, str, bytes, list, nested dict)
round-trip exactly; tuples come back as lists and numpy scalars as Python
scalars. numpy arrays (numeric or bool dtypes, any shape) and CPU torch
tensors travel as ext type :data:`NDARRAY_EXT` and decode as read-only numpy
arrays that view the decoded bytes (``np.frombuffer``, no copy). Decoding
never unpickles. See ``docs/FORMAT.md`` for the byte layout.

Inside compressed frames only (``encode_sample(..., pack=True)``), integer
arrays whose values fit a narrower integer type are stored in it as ext type
:data:`PACKED_EXT` and widened back to their own dtype on decode (a writable copy):
token ids in int32/int64 take 2 bytes each before zstd sees them.

Widening is a numpy cast per array (about 1 us, more than the rest of a
sample's decoding). A reader that collates many samples at once can skip it:
with ``narrow=True`` such arrays come back in their stored dtype, tagged with
the dtype to widen to (:func:`narrowed`), so a batch is widened in one cast
(:class:`~shardstream.pytorch.collation.Collate`) and :func:`widen` fixes the rest.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

import msgpack
import numpy as np

from shardstream.errors import DecodeError

__all__ = ["NDARRAY_EXT", "PACKED_EXT", "decode_sample", "iter_samples", "widen", "narrowed",
           "unpack_blocks", "ARRAY_KINDS", "EXT_LAYOUT", "NARROW_TYPES", "UNPACK_OPTIONS"]


#: msgpack ext type code of an n-dimensional array.
NDARRAY_EXT = 1
#: msgpack ext type code of an integer array stored in a narrower integer type.
PACKED_EXT = 2
EXT_LAYOUT = 1  # first byte of the ext payload: layout version
ARRAY_KINDS = frozenset("biufc")  # bool, int, uint, float, complex


#: narrower integer types tried in order, smallest first, with their bounds
NARROW_TYPES = tuple((np.dtype(t), int(np.iinfo(t).min), int(np.iinfo(t).max))
                     for t in ("u1", "i1", "<u2", "<i2", "<u4", "<i4"))


# ---------------------------------------------------------------- decode
_dtype_cache: dict[bytes, np.dtype] = {}
_u64 = struct.Struct("<Q")


# header prefix (layout, len, dtype, ndim=1) -> (dtype, itemsize), for the fast path
_fast_1d: dict[bytes, tuple[np.dtype, int]] = {}
# packed: header prefix (layout, own dtype, stored dtype, ndim=1)
#   -> (own, stored, itemsize, stored tagged with own)
_fast_packed: dict[bytes, tuple[np.dtype, np.dtype, int, np.dtype]] = {}
_frombuffer = np.frombuffer
_u64_at = _u64.unpack_from


def _ext_hook(code: int, data: bytes) -> Any:
    # the fast paths only take headers the slow path validated and cached; a short or
    # malformed payload falls through to the slow path, which names what is wrong
    try:
        if code == PACKED_EXT and len(data) > 14:  # fast path: 1-d, known dtypes (compressed)
            end = 4 + data[1] + data[2 + data[1]]
            hit = _fast_packed.get(data[:end])
            if hit is not None:
                (length,) = _u64_at(data, end)
                if end + 8 + length * hit[2] == len(data):
                    return _frombuffer(data, hit[1], length, end + 8).astype(hit[0])
        elif code == NDARRAY_EXT and len(data) > 11:  # fast path: 1-d arrays of a known dtype
            n = data[1]
            hit = _fast_1d.get(data[:3 + n])
            if hit is not None:
                (length,) = _u64_at(data, n + 3)
                if n + 11 + length * hit[1] == len(data):  # with count: half the cost
                    return _frombuffer(data, hit[0], length, n + 11)
    except (IndexError, struct.error):
        pass
    return _ext_hook_slow(code, data)


# (stored, own) -> the stored dtype tagged with its own dtype (numpy dtype metadata)
_tagged: dict[tuple[np.dtype, np.dtype], np.dtype] = {}
_WIDEN_TO = "shardstream.widen_to"


def _tag(stored: np.dtype, own: np.dtype) -> np.dtype:
    dt = _tagged.get((stored, own))
    if dt is None:
        dt = _tagged[(stored, own)] = np.dtype(stored, metadata={_WIDEN_TO: own})
    return dt


def narrowed(arr: np.ndarray) -> np.dtype | None:
    """The dtype ``arr`` must be widened to, if it was decoded with ``narrow=True``."""
    meta = arr.dtype.metadata
    return meta.get(_WIDEN_TO) if meta else None


def _ext_hook_narrow(code: int, data: bytes) -> Any:
    """Like :func:`_ext_hook`, but packed arrays stay narrow (tagged dtype, no copy)."""
    if code != PACKED_EXT:
        return _ext_hook(code, data)
    try:
        if len(data) > 14:
            end = 4 + data[1] + data[2 + data[1]]
            hit = _fast_packed.get(data[:end])
            if hit is not None:
                (length,) = _u64_at(data, end)
                if end + 8 + length * hit[2] == len(data):
                    return _frombuffer(data, hit[3], length, end + 8)
    except (IndexError, struct.error):
        pass
    arr, own = _unpack_packed(data)
    return arr.view(_tag(arr.dtype, own))


def widen(obj: Any) -> Any:
    """``obj`` with every array decoded narrow widened to the dtype it was written with.

    Walks dicts and lists (changed in place); other values are returned as they are.
    """
    t = type(obj)
    if t is np.ndarray:
        own = narrowed(obj)
        return obj if own is None else obj.astype(own)
    if t is dict:
        for k, v in obj.items():
            if type(v) in _WALK:
                obj[k] = widen(v)
    elif t is list:
        for i, v in enumerate(obj):
            if type(v) in _WALK:
                obj[i] = widen(v)
    return obj


_WALK = frozenset((np.ndarray, dict, list))


def _ext_hook_slow(code: int, data: bytes) -> Any:
    if code == PACKED_EXT:
        return _unpack_narrowed(data)
    if code != NDARRAY_EXT:
        raise DecodeError(f"unknown msgpack ext type {code} (this shardstream reads types "
                          f"{NDARRAY_EXT} and {PACKED_EXT}); upgrade shardstream to read this "
                          "data")
    try:
        if data[0] != EXT_LAYOUT:
            raise DecodeError(f"unknown ndarray layout {data[0]}")
        n = data[1]
        dt = _dtype(data[2:2 + n])
        pos = 3 + n
        ndim = data[pos - 1]
        if ndim == 1:
            (length,) = _u64.unpack_from(data, pos)
            _remember(_fast_1d, data[:pos], (dt, dt.itemsize))  # layout and dtype checked
            arr = np.frombuffer(data, dtype=dt, offset=pos + 8)
            if len(arr) == length:
                return arr
            shape: tuple[int, ...] = (length,)
        else:
            shape = struct.unpack_from(f"<{ndim}Q", data, pos)
            pos += 8 * ndim
            if len(data) - pos == _count(shape) * dt.itemsize:
                return np.frombuffer(data, dtype=dt, offset=pos).reshape(shape)
    except DecodeError:
        raise
    except (IndexError, struct.error, ValueError) as exc:
        raise DecodeError(f"malformed ndarray ({exc})") from exc
    raise DecodeError(f"ndarray of shape {shape} and dtype {dt} does not match its data bytes")


def _count(shape: tuple[int, ...]) -> int:
    """Elements in an array of ``shape`` (a Python int: never wraps)."""
    count = 1
    for d in shape:
        count *= d
    return count


def _remember(cache: dict, key: Any, value: Any) -> None:
    """``cache[key] = value``, keeping caches of headers seen in data bounded."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


_CACHE_LIMIT = 4096


def _unpack_narrowed(data: bytes) -> np.ndarray:
    """A :data:`PACKED_EXT` payload widened back to its own dtype (a writable copy)."""
    arr, own = _unpack_packed(data)
    return arr.astype(own)


#: the dtypes a packed array may be stored in (what the writer narrows to)
_STORED = frozenset(nt.str for nt, _, _ in NARROW_TYPES)


def _unpack_packed(data: bytes) -> tuple[np.ndarray, np.dtype]:
    """A :data:`PACKED_EXT` payload as (read-only array of the stored dtype, own dtype).

    The header is checked before it is cached for the fast path, so the same bytes
    always give the same answer.
    """
    try:
        if data[0] != EXT_LAYOUT:
            raise DecodeError(f"unknown packed-array layout {data[0]}")
        n = data[1]
        own = _dtype(data[2:2 + n])
        pos = 2 + n
        m = data[pos]
        stored = _dtype(data[pos + 1:pos + 1 + m])
        pos += 1 + m
        ndim = data[pos]
        shape = struct.unpack_from(f"<{ndim}Q", data, pos + 1)
        _check_packed(own, stored)
        if ndim == 1:
            _remember(_fast_packed, data[:pos + 1], (own, stored, stored.itemsize,
                                                     _tag(stored, own)))
        pos += 1 + 8 * ndim
        count = _count(shape)
        if len(data) - pos != count * stored.itemsize:
            raise DecodeError(f"packed array of shape {shape}, {stored} as {own}, does not "
                              "match its data bytes")
        return np.frombuffer(data, stored, count, pos).reshape(shape), own
    except DecodeError:
        raise
    except (IndexError, struct.error, ValueError, TypeError) as exc:
        raise DecodeError(f"malformed packed array ({exc})") from exc


def _check_packed(own: np.dtype, stored: np.dtype) -> None:
    """A packed array is an integer array stored in a narrower type that widens losslessly."""
    if own.kind not in "iu" or stored.str not in _STORED or \
            stored.itemsize >= own.itemsize or (stored.kind == "i" and own.kind == "u"):
        raise DecodeError(f"packed array stored as {stored} for dtype {own}: not a narrowing "
                          "shardstream writes (damaged data)")


def _dtype(code_b: bytes) -> np.dtype:
    """The (cached) dtype an ext header names; only numeric and bool dtypes."""
    dt = _dtype_cache.get(code_b)
    return _parse_dtype(code_b) if dt is None else dt


def _parse_dtype(code_b: bytes) -> np.dtype:
    try:
        dt = np.dtype(code_b.decode("ascii"))
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"bad ndarray dtype {code_b!r}") from exc
    if dt.kind not in ARRAY_KINDS:
        raise DecodeError(f"ndarray dtype {dt} is not allowed (numeric or bool only)")
    _remember(_dtype_cache, bytes(code_b), dt)
    return dt


UNPACK_OPTIONS = {"ext_hook": _ext_hook, "raw": False, "strict_map_key": True,
                  "timestamp": 0}


_narrow_options = dict(UNPACK_OPTIONS, ext_hook=_ext_hook_narrow)


#: how deep msgpack data may nest (msgpack's own stack; deeper is a DecodeError)
MAX_DEPTH = 1024


def msgpack_reason(exc: Exception) -> str:
    """What a msgpack exception means, for a :class:`DecodeError` message.

    Declared str/bin/array/map/ext lengths beyond the input itself, and nesting
    deeper than :data:`MAX_DEPTH`, are refused by msgpack before allocating.
    """
    if isinstance(exc, msgpack.StackError):
        return f"nested deeper than {MAX_DEPTH} levels"
    return f"{type(exc).__name__}: {exc}"


def decode_sample(data: bytes | bytearray | memoryview, narrow: bool = False) -> dict:
    """Decode one sample. Arrays come back as read-only numpy views on the bytes.

    ``narrow``: leave packed integer arrays in their stored dtype (see the module
    docstring); the caller must :func:`widen` them.
    """
    try:
        obj = msgpack.unpackb(data, **(_narrow_options if narrow else UNPACK_OPTIONS))
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not a valid sample: {msgpack_reason(exc)}") from exc
    if type(obj) is not dict:
        raise DecodeError(f"a sample must be a msgpack map, found {type(obj).__name__}")
    return obj


def iter_samples(data: bytes | bytearray | memoryview, narrow: bool = False) -> Iterator[dict]:
    """Decode a block: concatenated samples, yielded in order (``narrow``: as in
    :func:`decode_sample`)."""
    unpacker = msgpack.Unpacker(None, max_buffer_size=max(len(data), 1),
                                **(_narrow_options if narrow else UNPACK_OPTIONS))
    unpacker.feed(data)
    try:
        for obj in unpacker:
            if type(obj) is not dict:
                raise DecodeError(f"a sample must be a msgpack map, found {type(obj).__name__}")
            yield obj
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"not a valid block: {msgpack_reason(exc)}") from exc
    if unpacker.tell() != len(data):
        raise DecodeError(f"block ends inside a sample ({len(data) - unpacker.tell()} stray "
                          "bytes): truncated or corrupt")


def unpack_blocks(members: Iterator[dict], field: str = "ssb") -> Iterator[dict]:
    """webdataset stage: turn block members (``{"ssb": bytes, ...}``) into samples.

    ``wds.WebDataset(urls, shardshuffle=False).compose(shardstream.unpack_blocks)``
    """
    for member in members:
        yield from iter_samples(member[field])
