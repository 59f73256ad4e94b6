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
from math import prod as _prod  # of Python ints: never wraps
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


# ---------------------------------------------------------------- ext header
# Both array ext payloads (docs/FORMAT.md) are: the layout byte; one dtype string
# (NDARRAY_EXT: the array's) or two (PACKED_EXT: its own, then the stored one), each
# after its length byte; ndim; ndim little-endian u64 dims; the elements.
#: offset of the layout byte
LAYOUT_AT = 0
#: offset of the first dtype string's length byte
DTYPE_LEN_AT = 1
#: offset of the first dtype string
DTYPE_AT = 2
#: one dimension of the shape
DIM = struct.Struct("<Q")
#: header bytes before the shape besides the dtype strings (the layout byte, the length
#: bytes, ndim): the fast paths find a 1-d header's end, their cache key, from these
NDARRAY_FIXED = DTYPE_AT + 1
PACKED_FIXED = DTYPE_AT + 2
_SHAPES = tuple(struct.Struct(f"<{ndim}Q") for ndim in range(256))
_LAYOUT_OF = {NDARRAY_EXT: "ndarray", PACKED_EXT: "packed-array"}
_WHAT = {NDARRAY_EXT: "ndarray", PACKED_EXT: "packed array"}

_dtype_cache: dict[bytes, np.dtype] = {}
# 1-d header up to its shape -> (dtype, itemsize), for the fast path
_fast_1d: dict[bytes, tuple[np.dtype, int]] = {}
# packed: 1-d header up to its shape -> (own, stored, itemsize, stored tagged with own)
_fast_packed: dict[bytes, tuple[np.dtype, np.dtype, int, np.dtype]] = {}


#: a checked header (:func:`ext_header`): the array's own dtype, its elements' dtype in
#: the payload (the same unless packed), its shape, and where its elements start
ExtHeader = tuple[np.dtype, np.dtype, tuple[int, ...], int]


def ext_header(code: int, data: bytes) -> ExtHeader:
    """Parse and check the header of a :data:`NDARRAY_EXT` or :data:`PACKED_EXT` payload
    (anything wrong is a :class:`DecodeError`), and remember a 1-d one for the fast paths.

    A header is checked before it is remembered, so the same bytes always give the same
    answer; the payload's size must match the shape.
    """
    if code != NDARRAY_EXT and code != PACKED_EXT:
        raise DecodeError(f"unknown msgpack ext type {code} (this shardstream reads types "
                          f"{NDARRAY_EXT} and {PACKED_EXT}); upgrade shardstream to read this "
                          "data")
    try:
        if data[LAYOUT_AT] != EXT_LAYOUT:
            raise DecodeError(f"unknown {_LAYOUT_OF[code]} layout {data[LAYOUT_AT]}")
        n = data[DTYPE_LEN_AT]
        own = stored = _dtype(data[DTYPE_AT:DTYPE_AT + n])
        pos = DTYPE_AT + n
        if code == PACKED_EXT:
            m = data[pos]
            stored = _dtype(data[pos + 1:pos + 1 + m])
            pos += 1 + m
        ndim = data[pos]
        shape_at = pos + 1  # NDARRAY_FIXED or PACKED_FIXED plus the dtype strings
        shape = _SHAPES[ndim].unpack_from(data, shape_at)
        if code == PACKED_EXT:
            _check_packed(own, stored)
        if ndim == 1:
            if code == PACKED_EXT:
                _remember(_fast_packed, data[:shape_at], (own, stored, stored.itemsize,
                                                          _tag(stored, own)))
            else:
                _remember(_fast_1d, data[:shape_at], (own, own.itemsize))
        data_at = shape_at + DIM.size * ndim
    except DecodeError:
        raise
    except (IndexError, struct.error, ValueError, TypeError) as exc:
        raise DecodeError(f"malformed {_WHAT[code]} ({exc})") from exc
    if len(data) - data_at != _prod(shape) * stored.itemsize:
        if code == PACKED_EXT:
            raise DecodeError(f"packed array of shape {shape}, {stored} as {own}, does not "
                              "match its data bytes")
        raise DecodeError(f"ndarray of shape {shape} and dtype {own} does not match its data "
                          "bytes")
    return own, stored, shape, data_at


# ---------------------------------------------------------------- decode
_frombuffer = np.frombuffer
_dim_at = DIM.unpack_from
_DIM_SIZE = DIM.size


def _ext_hook(code: int, data: bytes) -> Any:
    # fast paths, inline (a call would cost more than the rest): 1-d arrays whose header,
    # found with the same layout constants, ext_header checked and remembered; anything
    # short, malformed or new falls through to the slow path, which names what is wrong
    try:
        if code == PACKED_EXT:  # compressed frames
            n = data[DTYPE_LEN_AT]
            end = PACKED_FIXED + n + data[DTYPE_AT + n]
            hit = _fast_packed.get(data[:end])
            if hit is not None:
                (length,) = _dim_at(data, end)
                end += _DIM_SIZE
                if end + length * hit[2] == len(data):
                    return _frombuffer(data, hit[1], length, end).astype(hit[0])
        elif code == NDARRAY_EXT:
            end = NDARRAY_FIXED + data[DTYPE_LEN_AT]
            hit = _fast_1d.get(data[:end])
            if hit is not None:
                (length,) = _dim_at(data, end)
                end += _DIM_SIZE
                if end + length * hit[1] == len(data):  # with count: half the cost
                    return _frombuffer(data, hit[0], length, end)
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
    try:  # the packed fast path of _ext_hook, without the cast
        n = data[DTYPE_LEN_AT]
        end = PACKED_FIXED + n + data[DTYPE_AT + n]
        hit = _fast_packed.get(data[:end])
        if hit is not None:
            (length,) = _dim_at(data, end)
            end += _DIM_SIZE
            if end + length * hit[2] == len(data):
                return _frombuffer(data, hit[3], length, end)
    except (IndexError, struct.error):
        pass
    return _ext_hook_slow(code, data, narrow=True)


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


def _ext_hook_slow(code: int, data: bytes, narrow: bool = False) -> Any:
    """Any array ext payload, checked by :func:`ext_header`; a packed one is widened back
    to its own dtype (a writable copy) unless ``narrow`` (then: tagged, no copy)."""
    own, stored, shape, data_at = ext_header(code, data)
    try:
        arr = np.frombuffer(data, stored, _prod(shape), data_at).reshape(shape)
    except ValueError as exc:  # more dimensions, or larger ones, than numpy takes
        raise DecodeError(f"malformed {_WHAT[code]} ({exc})") from exc
    if code == NDARRAY_EXT:
        return arr
    return arr.view(_tag(stored, own)) if narrow else arr.astype(own)


def _remember(cache: dict, key: Any, value: Any) -> None:
    """``cache[key] = value``, keeping caches of headers seen in data bounded."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


_CACHE_LIMIT = 4096


#: the dtypes a packed array may be stored in (what the writer narrows to)
_STORED = frozenset(nt.str for nt, _, _ in NARROW_TYPES)


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
