"""Sample encoding: a dict -> one msgpack map, numpy arrays as typed ext payloads.

The write half of the sample codec (:mod:`shardstream.format.codec` decodes):
:func:`encode_sample` checks keys and values and names the field path of anything
it cannot store; ``pack=True`` stores integer arrays in the narrowest integer type
that holds their values (ext :data:`~shardstream.format.codec.PACKED_EXT`).
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import msgpack
import numpy as np

from shardstream.errors import EncodeError
from shardstream.format.codec import (ARRAY_KINDS, EXT_LAYOUT, NARROW_TYPES, NDARRAY_EXT,
                                      PACKED_EXT, decode_sample)

__all__ = ["encode_sample", "repack", "check_sample", "INT_MIN", "UINT_MAX"]


INT_MIN, UINT_MAX = -(1 << 63), (1 << 64) - 1
_CONTAINERS = (dict, list, tuple)


# ---------------------------------------------------------------- encode
_headers: dict[tuple[np.dtype, int], tuple[bytes, struct.Struct]] = {}


def _array_payload(arr: np.ndarray) -> msgpack.ExtType:
    """ext payload: u8 layout | u8 len | dtype.str | u8 ndim | ndim x u64 | raw LE bytes."""
    dt = arr.dtype
    head = _headers.get((dt, arr.ndim))
    if head is None:
        if dt.kind not in ARRAY_KINDS:
            raise TypeError(f"numpy dtype {dt} is not numeric or bool")
        if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big"):
            arr = arr.astype(dt.newbyteorder("<"))
            return _array_payload(arr)
        code = dt.str.encode("ascii")
        head = _headers[(dt, arr.ndim)] = (
            struct.pack(f"<BB{len(code)}sB", EXT_LAYOUT, len(code), code, arr.ndim),
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


_MIN_PACK = 8  # arrays shorter than this are not worth the longer header
_packed_heads: dict[tuple[np.dtype, np.dtype, int], tuple[bytes, struct.Struct]] = {}


def _packed_payload(arr: np.ndarray) -> msgpack.ExtType | None:
    """ext payload: u8 layout | u8 len | own dtype.str | u8 len | stored dtype.str |
    u8 ndim | ndim x u64 | raw LE bytes of the stored dtype; None: no narrower type fits."""
    dt = arr.dtype
    lo, hi = int(arr.min()), int(arr.max())
    for nt, nlo, nhi in NARROW_TYPES:
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
            struct.pack(f"<BB{len(own)}sB{len(stored)}sB", EXT_LAYOUT, len(own), own,
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
        if INT_MIN <= obj <= UINT_MAX:
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


def repack(data: bytes | memoryview, pack: bool) -> bytes:
    """One encoded sample re-encoded with (``pack=True``) or without narrowed integer arrays."""
    return encode_sample(decode_sample(data), check=False, pack=pack)
