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
(:class:`~shardstream.collation.Collate`) and :func:`widen` fixes the rest.
"""

from __future__ import annotations

import struct
import sys
from typing import Any, Iterator

import msgpack
import numpy as np

from .errors import DecodeError, EncodeError

__all__ = ["NDARRAY_EXT", "PACKED_EXT", "encode_sample", "repack", "decode_sample",
           "iter_samples", "widen", "narrowed", "check_sample", "unpack_blocks"]

#: msgpack ext type code of an n-dimensional array.
NDARRAY_EXT = 1
#: msgpack ext type code of an integer array stored in a narrower integer type.
PACKED_EXT = 2
_EXT_LAYOUT = 1  # first byte of the ext payload: layout version
_ARRAY_KINDS = frozenset("biufc")  # bool, int, uint, float, complex
_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1
_CONTAINERS = (dict, list, tuple)


# ---------------------------------------------------------------- encode
_headers: dict[tuple[np.dtype, int], tuple[bytes, struct.Struct]] = {}


def _array_payload(arr: np.ndarray) -> msgpack.ExtType:
    """ext payload: u8 layout | u8 len | dtype.str | u8 ndim | ndim x u64 | raw LE bytes."""
    dt = arr.dtype
    head = _headers.get((dt, arr.ndim))
    if head is None:
        if dt.kind not in _ARRAY_KINDS:
            raise TypeError(f"numpy dtype {dt} is not numeric or bool")
        if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big"):
            arr = arr.astype(dt.newbyteorder("<"))
            return _array_payload(arr)
        code = dt.str.encode("ascii")
        head = _headers[(dt, arr.ndim)] = (
            struct.pack(f"<BB{len(code)}sB", _EXT_LAYOUT, len(code), code, arr.ndim),
            struct.Struct(f"<{arr.ndim}Q"))
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    prefix, shape = head
    return msgpack.ExtType(NDARRAY_EXT, b"".join(
        (prefix, shape.pack(*arr.shape), arr.reshape(-1).view(np.uint8).data)))


def _default(obj: Any) -> Any:
    """msgpack ``default`` hook: arrays, tensors and numpy scalars."""
    if isinstance(obj, np.ndarray):
        return _array_payload(obj)
    if isinstance(obj, np.generic):
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        return _array_payload(np.asarray(obj))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise TypeError(f"a {obj.device.type} tensor; move it to the CPU with .cpu() first")
        try:
            arr = obj.detach().numpy()
        except TypeError as exc:  # bfloat16 and friends have no numpy dtype
            raise TypeError(f"tensor dtype {obj.dtype} has no numpy equivalent; "
                            "convert it (e.g. .float()) before writing") from exc
        return _array_payload(arr)
    raise TypeError(f"unsupported type {type(obj).__module__}.{type(obj).__qualname__}")


_packer_options = {"default": _default, "use_bin_type": True, "datetime": False}

#: narrower integer types tried in order, smallest first, with their bounds
_NARROW = tuple((np.dtype(t), int(np.iinfo(t).min), int(np.iinfo(t).max))
                for t in ("u1", "i1", "<u2", "<i2", "<u4", "<i4"))
_MIN_PACK = 8  # arrays shorter than this are not worth the longer header
_packed_heads: dict[tuple[np.dtype, np.dtype, int], tuple[bytes, struct.Struct]] = {}


def _packed_payload(arr: np.ndarray) -> msgpack.ExtType | None:
    """ext payload: u8 layout | u8 len | own dtype.str | u8 len | stored dtype.str |
    u8 ndim | ndim x u64 | raw LE bytes of the stored dtype; None: no narrower type fits."""
    dt = arr.dtype
    lo, hi = int(arr.min()), int(arr.max())
    for nt, nlo, nhi in _NARROW:
        if nt.itemsize >= dt.itemsize:
            return None
        if nlo <= lo and hi <= nhi:
            break
    else:
        return None
    head = _packed_heads.get((dt, nt, arr.ndim))
    if head is None:
        own, stored = dt.newbyteorder("<").str.encode(), nt.str.encode()
        head = _packed_heads[(dt, nt, arr.ndim)] = (
            struct.pack(f"<BB{len(own)}sB{len(stored)}sB", _EXT_LAYOUT, len(own), own,
                        len(stored), stored, arr.ndim), struct.Struct(f"<{arr.ndim}Q"))
    prefix, shape = head
    return msgpack.ExtType(PACKED_EXT, b"".join(
        (prefix, shape.pack(*arr.shape), arr.astype(nt).reshape(-1).data)))


def _default_packed(obj: Any) -> Any:
    """``default`` hook for compressed frames: integer arrays narrowed when they fit."""
    arr = obj
    if type(obj) is not np.ndarray:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor) and obj.device.type == "cpu" \
                and not obj.is_floating_point() and not obj.is_complex() \
                and obj.dtype != torch.bool:
            arr = obj.detach().numpy()
    if type(arr) is np.ndarray and arr.dtype.kind in "iu" and arr.size >= _MIN_PACK:
        packed = _packed_payload(arr)
        if packed is not None:
            return packed
    return _default(obj)


_packed_options = dict(_packer_options, default=_default_packed)


def check_sample(sample: Any) -> None:
    """Raise :class:`EncodeError` unless ``sample`` is a dict with str keys throughout.

    msgpack itself accepts int keys; the format does not, so nested dicts
    (also inside lists) are walked. Lists of scalars are checked in C speed.
    """
    if type(sample) is not dict:
        if isinstance(sample, dict):
            sample = dict(sample)
        else:
            raise EncodeError(f"a sample must be a dict, got {type(sample).__name__}")
    _check_keys(sample, "")


def _check_keys(d: dict, prefix: str) -> None:
    for k, v in d.items():
        if type(k) is not str:
            raise EncodeError(f"non-string key {k!r} ({type(k).__name__}); keys must be str",
                              path=f"{prefix}{k!r}")
        if isinstance(v, _CONTAINERS):
            if isinstance(v, dict):
                _check_keys(v, f"{prefix}{k}.")
            else:
                _check_list(v, f"{prefix}{k}")
        elif type(v) is msgpack.Timestamp:
            raise _raw_ext(f"{prefix}{k}")


def _raw_ext(path: str) -> EncodeError:
    return EncodeError("raw msgpack ExtType/Timestamp values are reserved by the format; "
                       "store the payload as bytes", path=path)


def _check_list(seq: list | tuple, path: str) -> None:
    if type(seq) is msgpack.ExtType:
        raise _raw_ext(path)
    kinds = set(map(type, seq))
    if not any(issubclass(t, _CONTAINERS) or t is msgpack.Timestamp for t in kinds):
        return
    for i, v in enumerate(seq):
        if isinstance(v, dict):
            _check_keys(v, f"{path}[{i}].")
        elif isinstance(v, (list, tuple)):
            _check_list(v, f"{path}[{i}]")
        elif type(v) is msgpack.Timestamp:
            raise _raw_ext(f"{path}[{i}]")


def _find_bad(obj: Any, path: str) -> tuple[str, str] | None:
    """Slow path after a failed pack: the first field path msgpack cannot take."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{path}{k!r}", f"non-string key {k!r}"
            bad = _find_bad(v, f"{path}.{k}" if path else k)
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _find_bad(v, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(obj, bool) or obj is None or isinstance(obj, (float, str, bytes)):
        return None
    if isinstance(obj, int):
        if _INT_MIN <= obj <= _UINT_MAX:
            return None
        return path, f"int {obj} is outside the 64-bit range; store it as str or bytes"
    try:
        _default(obj)
    except TypeError as exc:
        return path, str(exc)
    return None


def encode_sample(sample: dict, *, key: object = None, check: bool = True,
                  pack: bool = False) -> bytes:
    """Encode one sample dict to msgpack bytes.

    ``key`` only labels error messages. ``pack=True`` narrows integer arrays
    (:data:`PACKED_EXT`): for compressed frames only. Raises :class:`EncodeError` naming the
    sample and the field path of the first value that cannot be encoded.
    """
    if check:
        try:
            check_sample(sample)
        except EncodeError as exc:
            label = _label(sample, key)
            raise EncodeError(f"sample {label}, field {exc.path!r}: {exc}", sample=label,
                              path=exc.path) from None
    try:
        return msgpack.packb(sample, **(_packed_options if pack else _packer_options))
    except (TypeError, ValueError, OverflowError) as exc:
        label = _label(sample, key)
        bad = _find_bad(sample, "")
        path, reason = bad if bad else ("?", str(exc))
        raise EncodeError(f"sample {label}, field {path!r}: cannot encode: {reason}",
                          sample=label, path=path) from exc


def _label(sample: Any, key: object) -> str:
    if key is None and isinstance(sample, dict):
        key = sample.get("__key__")
    return "?" if key is None else repr(key) if isinstance(key, str) else str(key)


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
        if data[0] != _EXT_LAYOUT:
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
_STORED = frozenset(nt.str for nt, _, _ in _NARROW)


def _unpack_packed(data: bytes) -> tuple[np.ndarray, np.dtype]:
    """A :data:`PACKED_EXT` payload as (read-only array of the stored dtype, own dtype).

    The header is checked before it is cached for the fast path, so the same bytes
    always give the same answer.
    """
    try:
        if data[0] != _EXT_LAYOUT:
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
    if dt.kind not in _ARRAY_KINDS:
        raise DecodeError(f"ndarray dtype {dt} is not allowed (numeric or bool only)")
    _remember(_dtype_cache, bytes(code_b), dt)
    return dt


_unpack_options = {"ext_hook": _ext_hook, "raw": False, "strict_map_key": True,
                   "timestamp": 0}


_narrow_options = dict(_unpack_options, ext_hook=_ext_hook_narrow)


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
        obj = msgpack.unpackb(data, **(_narrow_options if narrow else _unpack_options))
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
                                **(_narrow_options if narrow else _unpack_options))
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


def repack(data: bytes | memoryview, pack: bool) -> bytes:
    """One encoded sample re-encoded with (``pack=True``) or without narrowed integer arrays."""
    return encode_sample(decode_sample(data), check=False, pack=pack)


def unpack_blocks(members: Iterator[dict], field: str = "ssb") -> Iterator[dict]:
    """webdataset stage: turn block members (``{"ssb": bytes, ...}``) into samples.

    ``wds.WebDataset(urls, shardshuffle=False).compose(shardstream.unpack_blocks)``
    """
    for member in members:
        yield from iter_samples(member[field])
