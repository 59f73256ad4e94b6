"""The manifest's schema: which fields samples have, with their types and shapes."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SchemaBuilder"]


# ---------------------------------------------------------------- schema
_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str", bytes: "bytes",
               type(None): "null", list: "list", tuple: "list", np.ndarray: "ndarray"}


_FAST_TYPES = frozenset((int, float, bool, str, bytes, type(None), np.ndarray))


class SchemaBuilder:
    """Accumulates the fields seen: dotted path -> count, types, array dtype/shape.

    Samples of a shape seen before (same keys, same value types, no nested
    containers) take a fast path: one dict lookup, counts folded in later.
    """

    def __init__(self) -> None:
        self._fields: dict[str, dict[str, Any]] = {}
        self._shapes: dict[tuple, list] = {}  # (keys, types) -> [count, array keys]

    def known(self, sample: dict) -> bool:
        """Count ``sample`` if its shape was seen (and checked) before; else False."""
        entry = self._shapes.get((tuple(sample), tuple(map(type, sample.values()))))
        if entry is None:
            return False
        entry[0] += 1
        for k in entry[1]:
            _observe_array(self._fields[k], sample[k])
        return True

    def observe(self, sample: dict, prefix: str = "") -> None:
        """Record a sample that passed :func:`check_sample` (the slow, general path)."""
        fields = self._fields
        for k, v in sample.items():
            t = type(v)
            if t is dict:
                self.observe(v, f"{prefix}{k}.")
                continue
            path = prefix + k if prefix else k
            f = fields.get(path)
            if f is None:
                f = fields[path] = {"count": 0, "types": set()}
            f["count"] += 1
            name = _TYPE_NAMES.get(t) or _type_name(v)
            f["types"].add(name)
            if name in ("ndarray", "tensor"):
                _observe_array(f, v)
        if not prefix:
            types = tuple(map(type, sample.values()))
            if _FAST_TYPES.issuperset(types):
                arrays = [k for k, t in zip(sample, types) if t is np.ndarray]
                self._shapes[(tuple(sample), types)] = [0, arrays]

    def _fold(self) -> None:
        for (keys, types), entry in self._shapes.items():
            if entry[0]:
                for k, t in zip(keys, types):
                    f = self._fields[k]
                    f["count"] += entry[0]
                    f["types"].add(_TYPE_NAMES[t])
                entry[0] = 0

    def merge(self, other: "SchemaBuilder | dict[str, dict[str, Any]]") -> None:
        self._fold()
        items = other.to_dict() if isinstance(other, SchemaBuilder) else other
        for path, g in items.items():
            f = self._fields.setdefault(path, {"count": 0, "types": set()})
            f["count"] += g["count"]
            f["types"].update(g["types"])
            if "dtypes" in g:
                f.setdefault("dtypes", set()).update(g["dtypes"])
                shape = g["shape"]
                if "shape" not in f:
                    f["shape"] = tuple(shape) if shape is not None else None
                else:
                    f["shape"] = _merge_shape(f["shape"], shape)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        self._fold()
        out = {}
        for path, f in sorted(self._fields.items()):
            d: dict[str, Any] = {"count": f["count"], "types": sorted(f["types"])}
            if "dtypes" in f:
                d["dtypes"] = sorted(f["dtypes"])
                d["shape"] = None if f["shape"] is None else list(f["shape"])
            out[path] = d
        return out


def _type_name(v: Any) -> str:
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (bytes, bytearray)):
        return "bytes"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, np.ndarray):
        return "ndarray"
    if type(v).__module__ == "torch":
        return "tensor"
    return type(v).__name__


_dtype_names: dict[Any, str] = {}


def _observe_array(f: dict[str, Any], v: Any) -> None:
    dtype = _dtype_names.get(v.dtype)
    if dtype is None:
        dtype = _dtype_names[v.dtype] = str(v.dtype).replace("torch.", "")
    shape = tuple(v.shape)
    if "dtypes" not in f:
        f["dtypes"] = {dtype}
        f["shape"] = shape
        return
    f["dtypes"].add(dtype)
    if f["shape"] != shape:
        f["shape"] = _merge_shape(f["shape"], shape)


def _merge_shape(a: tuple | list | None, b: tuple | list | None) -> tuple | None:
    """Per-dimension size where all agree, None where they vary; None if ndim varies."""
    if a is None or b is None or len(a) != len(b):
        return None
    return tuple(x if x == y else None for x, y in zip(a, b))
