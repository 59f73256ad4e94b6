"""Decoded samples -> Arrow blocks typed by the manifest's schema (for :mod:`.ray_read`).

:func:`column_plan` gives each top-level field its Arrow type from the manifest's
schema, so the blocks of every read task agree (see :mod:`.ray_read` for the rules).
:func:`samples_to_block` builds one block from chunks of decoded samples, column by
column, in bulk: a field's values come out of the sample dicts with one ``map`` (a
comprehension only where some sample lacks the field), a ragged column is one
``np.concatenate`` plus its lengths (``map(len, ...)``), a fixed-shape one one
``np.stack``, a scalar one one ``pa.array``. Each chunk's columns
are built as it comes, so its decoded samples are freed before the next chunk is
decoded (the working set stays in cache); the chunks' columns are then concatenated
once per block. A value the schema did not foresee sends that column of the block
through Ray's own conversion (values intact, the type Ray infers), as does a column
whose chunks came out typed apart.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any, Iterable, Sequence

import numpy as np

try:
    import pyarrow as pa
    from ray.data.block import BlockAccessor
    from ray.data.extensions import (ArrowTensorArray, ArrowVariableShapedTensorArray,
                                     ArrowVariableShapedTensorType)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("shardstream.integrations.ray_columns needs Ray Data: "
                      "pip install 'shardstream[ray]'") from exc

__all__ = ["column_plan", "rows_to_block", "samples_to_block"]

_SCALARS = {frozenset({"int"}): pa.int64(), frozenset({"float"}): pa.float64(),
            frozenset({"int", "float"}): pa.float64(), frozenset({"bool"}): pa.bool_(),
            frozenset({"str"}): pa.string(), frozenset({"bytes"}): pa.binary(),
            frozenset(): pa.null()}
#: what a value the schema did not foresee raises in a fast path: Ray's conversion decides
_UNFORESEEN = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, AttributeError,
               OverflowError, TypeError, ValueError)


def column_plan(schema: dict[str, dict[str, Any]], columns: Sequence[str] | None = None,
                where: str = "") -> dict[str, tuple[str, Any]]:
    """Top-level field -> (kind, detail) from a manifest schema (see :mod:`.ray_read`).

    Kinds: ``fixed`` (dtype, shape), ``ragged`` (dtype, ndim), ``arrow`` (an Arrow
    type), ``infer`` (None: Ray's conversion).
    """
    tree: dict[str, Any] = {}  # name -> {child name: node, ..., "\0": the schema entry}
    for path, f in schema.items():
        node = tree
        for part in path.split("."):
            node = node.setdefault(part, {})
        node["\0"] = f
    names = list(tree)
    if columns is not None:
        unknown = [c for c in columns if c not in tree]
        if unknown:
            raise ValueError(f"{where}: no field {unknown[0]!r} in the manifest's schema; "
                             f"fields: {', '.join(names)}")
        names = list(columns)
    return {name: _plan(tree[name]) for name in names}


def _plan(node: dict[str, Any]) -> tuple[str, Any]:
    f = node.get("\0")
    children = {k: v for k, v in node.items() if k != "\0"}
    if f is not None and children:
        return "infer", None  # a dict in some samples, something else in others
    if children:
        sub = {k: _plan(v) for k, v in children.items()}
        if all(kind == "arrow" for kind, _ in sub.values()):
            return "arrow", pa.struct([pa.field(k, t) for k, (_, t) in sub.items()])
        return "infer", None
    types = set(f.get("types", ())) - {"null"}
    if types and types <= {"ndarray", "tensor"} and "null" not in f.get("types", ()):
        dtypes, shape = f.get("dtypes") or [], f.get("shape")
        if len(dtypes) == 1 and np.dtype(dtypes[0]).kind in "biufc" and shape is not None:
            if all(d is not None for d in shape) and shape:
                return "fixed", (np.dtype(dtypes[0]), tuple(shape))
            if shape:
                return "ragged", (np.dtype(dtypes[0]), len(shape))
        return "infer", None
    t = _SCALARS.get(frozenset(types))
    return ("arrow", t) if t is not None else ("infer", None)


# ---------------------------------------------------------------- samples -> block
def rows_to_block(rows: list[dict], plan: dict[str, tuple[str, Any]]) -> pa.Table:
    """Samples -> one Arrow table with the columns ``plan`` gives (missing -> null)."""
    return samples_to_block([rows], plan)


def samples_to_block(chunks: Iterable[list[dict]], plan: dict[str, tuple[str, Any]]) -> pa.Table:
    """Chunks of samples -> one Arrow table, one chunk per column (see the module docs)."""
    names = list(plan)
    parts: list[list] = [[] for _ in names]  # per column: an array per chunk (infer: values)
    n = 0

    def add(rows: list[dict]) -> None:  # one chunk's columns, built before the next decodes
        for part, values, (kind, detail) in zip(parts, _transpose(rows, names), plan.values()):
            part.append(values if kind == "infer" else _column(values, kind, detail))

    for rows in chunks:
        if len(rows):  # an empty chunk adds nothing
            n += len(rows)
            add(rows)
        del rows  # freed before the next chunk is decoded
    if not n:
        add([])
    if not plan:
        return pa.table({"__row__": pa.nulls(n)}).drop_columns(["__row__"])
    arrays = [_merge(part, kind) for part, (kind, _) in zip(parts, plan.values())]
    return pa.Table.from_arrays(arrays, names=names)


def _transpose(rows: list[dict], names: list[str]) -> list[list]:
    """Per field, its value in each sample (None where a sample lacks it): a pass in C
    per field when every sample has it (lists, not tuples: fewer objects for the GC)."""
    out = []
    for name in names:
        try:
            out.append(list(map(itemgetter(name), rows)))
        except (KeyError, TypeError):
            out.append([r.get(name) for r in rows])
    return out


def _merge(part: list, kind: str) -> pa.Array:
    """A column's chunks as one array (chunks typed apart: their values, converted by Ray)."""
    if kind == "infer":
        return _infer(list(chain.from_iterable(part)))
    if len(part) == 1:
        return part[0]
    t = part[0].type
    if all(a.type == t for a in part):
        if isinstance(t, pa.ExtensionType):
            return t.wrap_array(pa.concat_arrays([a.storage for a in part]))
        return pa.concat_arrays(part)
    return _infer(list(chain.from_iterable(_values(a) for a in part)))


def _values(arr: pa.Array) -> list:
    """An array's values as the samples had them (tensors as ndarrays)."""
    if isinstance(arr.type, pa.ExtensionType):
        return list(arr.to_numpy(zero_copy_only=False))
    return arr.to_pylist()


def _column(values: Sequence, kind: str, detail: Any) -> pa.Array:
    try:
        if kind == "fixed":
            return ArrowTensorArray.from_numpy(np.stack(values))
        if kind == "ragged":
            return _ragged(values, *detail)
        if kind == "arrow":
            return pa.array(values, type=detail)
    except _UNFORESEEN:
        pass  # a value the manifest's schema did not foresee: Ray's conversion decides
    return _infer(values)


def _infer(values: Sequence) -> pa.Array:
    """Ray's own conversion of one column's values."""
    obj = np.empty(len(values), dtype=object)
    obj[:] = values
    return BlockAccessor.batch_to_block({"c": obj}).column(0).combine_chunks()


def _ragged(values: Sequence, dtype: np.dtype, ndim: int) -> pa.Array:
    """A variable-shaped tensor column, built in bulk (Ray's layout: a struct of the
    raveled data as a large list and the shapes); Ray's own builder where the values are
    not all native ``dtype`` ndarrays of ``ndim`` dimensions, or the layout differs."""
    n = len(values)
    if (dtype.kind == "b" or not dtype.isnative or set(map(type, values)) != {np.ndarray}
            or set(map(attrgetter("ndim"), values)) != {ndim}):
        return ArrowVariableShapedTensorArray.from_numpy(list(values))
    if ndim == 1:
        shapes = sizes = np.fromiter(map(len, values), dtype=np.int64, count=n)
        data = np.concatenate(values)
    else:
        shapes = np.fromiter(chain.from_iterable(map(attrgetter("shape"), values)),
                             dtype=np.int64, count=n * ndim)
        sizes = shapes.reshape(n, ndim).prod(axis=1)
        data = np.concatenate(list(map(np.ravel, values)))
    if data.dtype != dtype:
        return ArrowVariableShapedTensorArray.from_numpy(list(values))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    storage = pa.StructArray.from_arrays(
        [pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(data)),
         pa.ListArray.from_arrays(pa.array(np.arange(0, n * ndim + 1, ndim, dtype=np.int32)),
                                  pa.array(shapes))],
        ["data", "shape"])
    type_ = ArrowVariableShapedTensorType(pa.from_numpy_dtype(dtype), ndim)
    if storage.type != type_.storage_type:  # another Ray's layout
        return ArrowVariableShapedTensorArray.from_numpy(list(values))
    return type_.wrap_array(storage)
