"""Sample codec: a dict <-> one msgpack map, numpy arrays as a typed ext.

A sample is a msgpack map with ``str`` keys. Values msgpack knows (int in the
64-bit range, float incl. NaN/inf, bool, None, str, bytes, list, nested dict)
round-trip exactly; tuples come back as lists and numpy scalars as Python
scalars. numpy arrays (numeric or bool dtypes, any shape) and CPU torch
tensors travel as ext type :data:`NDARRAY_EXT` and decode as read-only numpy
arrays that view the decoded bytes (``np.frombuffer``, no copy). Decoding
never unpickles. See ``docs/FORMAT.md`` for the byte layout.
"""

from __future__ import annotations

import struct
import sys
from typing import Any, Iterator

import msgpack
import numpy as np

from .errors import DecodeError, EncodeError

__all__ = ["NDARRAY_EXT", "encode_sample", "decode_sample", "iter_samples", "check_sample",
           "unpack_blocks"]

#: msgpack ext type code of an n-dimensional array.
NDARRAY_EXT = 1
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


def encode_sample(sample: dict, *, key: object = None, check: bool = True) -> bytes:
    """Encode one sample dict to msgpack bytes.

    ``key`` only labels error messages. Raises :class:`EncodeError` naming the
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
        return msgpack.packb(sample, **_packer_options)
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
_frombuffer = np.frombuffer
_u64_at = _u64.unpack_from


def _ext_hook(code: int, data: bytes) -> Any:
    if code == NDARRAY_EXT and len(data) > 11:  # fast path: 1-d arrays of a known dtype
        n = data[1]
        hit = _fast_1d.get(data[:3 + n])
        if hit is not None:
            (length,) = _u64_at(data, n + 3)
            if n + 11 + length * hit[1] == len(data):  # with count: half the cost
                return _frombuffer(data, hit[0], length, n + 11)
    return _ext_hook_slow(code, data)


def _ext_hook_slow(code: int, data: bytes) -> Any:
    if code != NDARRAY_EXT:
        raise DecodeError(f"unknown msgpack ext type {code} (this shardstream reads type "
                          f"{NDARRAY_EXT}); upgrade shardstream to read this data")
    try:
        if data[0] != _EXT_LAYOUT:
            raise DecodeError(f"unknown ndarray layout {data[0]}")
        n = data[1]
        code_b = data[2:2 + n]
        dt = _dtype_cache.get(code_b) or _parse_dtype(code_b)
        pos = 3 + n
        ndim = data[pos - 1]
        if ndim == 1:
            _fast_1d[data[:pos]] = (dt, dt.itemsize)
            (length,) = _u64.unpack_from(data, pos)
            arr = np.frombuffer(data, dtype=dt, offset=pos + 8)
            if len(arr) == length:
                return arr
            shape: tuple[int, ...] = (length,)
        else:
            shape = struct.unpack_from(f"<{ndim}Q", data, pos)
            return np.frombuffer(data, dtype=dt, offset=pos + 8 * ndim).reshape(shape)
    except DecodeError:
        raise
    except (IndexError, struct.error, ValueError) as exc:
        raise DecodeError(f"malformed ndarray ({exc})") from exc
    raise DecodeError(f"ndarray of shape {shape} and dtype {dt} does not match its data bytes")


def _parse_dtype(code_b: bytes) -> np.dtype:
    try:
        dt = np.dtype(code_b.decode("ascii"))
    except (TypeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"bad ndarray dtype {code_b!r}") from exc
    if dt.kind not in _ARRAY_KINDS:
        raise DecodeError(f"ndarray dtype {dt} is not allowed")
    _dtype_cache[code_b] = dt
    return dt


_unpack_options = {"ext_hook": _ext_hook, "raw": False, "strict_map_key": True,
                   "timestamp": 0}


def decode_sample(data: bytes | bytearray | memoryview) -> dict:
    """Decode one sample. Arrays come back as read-only numpy views on the bytes."""
    try:
        obj = msgpack.unpackb(data, **_unpack_options)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not a valid sample: {type(exc).__name__}: {exc}") from exc
    if type(obj) is not dict:
        raise DecodeError(f"a sample must be a msgpack map, found {type(obj).__name__}")
    return obj


def iter_samples(data: bytes | bytearray | memoryview) -> Iterator[dict]:
    """Decode a block: concatenated samples, yielded in order."""
    unpacker = msgpack.Unpacker(None, max_buffer_size=max(len(data), 1), **_unpack_options)
    unpacker.feed(data)
    try:
        for obj in unpacker:
            if type(obj) is not dict:
                raise DecodeError(f"a sample must be a msgpack map, found {type(obj).__name__}")
            yield obj
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"not a valid block: {type(exc).__name__}: {exc}") from exc
    if unpacker.tell() != len(data):
        raise DecodeError(f"block ends inside a sample ({len(data) - unpacker.tell()} stray "
                          "bytes): truncated or corrupt")


def unpack_blocks(members: Iterator[dict], field: str = "ssb") -> Iterator[dict]:
    """webdataset stage: turn block members (``{"ssb": bytes, ...}``) into samples.

    ``wds.WebDataset(urls, shardshuffle=False).compose(shardstream.unpack_blocks)``
    """
    for member in members:
        yield from iter_samples(member[field])
