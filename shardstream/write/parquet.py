"""Parquet (and Arrow) input: columns -> samples, list columns as numpy arrays."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from shardstream.errors import InputError
from shardstream.write.infer import NEVER_HINT, BadValue
from shardstream.write.plan import InputTask, Progress, parquet_groups, pyarrow_parquet

__all__ = ["iter_parquet"]


_ARROW_NULL_FIX = ("so it cannot become a numpy array: fill the nulls "
                   f"(pyarrow.compute.fill_null), {NEVER_HINT}")


def _listlike(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _numeric(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _type_name(t: Any) -> str:
    """``list<int16>`` rather than pyarrow's ``list<element: int16>``."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_name(t.value_type)}>[{t.list_size}]"
    if _listlike(t):
        kind = "large_list" if pa.types.is_large_list(t) else "list"
        return f"{kind}<{_type_name(t.value_type)}>"
    return str(t)


def _leaf_dtype(t: Any) -> np.dtype | None:
    """The numpy dtype of a list type nesting only lists down to a number or bool leaf."""
    while _listlike(t):
        t = t.value_type
    return np.dtype(t.to_pandas_dtype()) if _numeric(t) else None


def _has_arrays(t: Any) -> bool:
    """Does a value of Arrow type ``t`` hold lists that the rule turns into arrays?"""
    import pyarrow as pa

    if _listlike(t):
        return _leaf_dtype(t) is not None or _has_arrays(t.value_type)
    if pa.types.is_struct(t):
        return any(_has_arrays(t.field(i).type) for i in range(t.num_fields))
    return False


def _first_null(v: Any) -> list[int] | None:
    """The index path of the first None inside nested lists, else None."""
    for i, x in enumerate(v):
        if x is None:
            return [i]
        if type(x) is list:
            inner = _first_null(x)
            if inner is not None:
                return [i, *inner]
    return None


def _typed_array(v: list, dtype: np.dtype, t: Any) -> Any:
    """A (nested) list of Arrow type ``t`` as an array of its leaf dtype; ragged levels
    become lists of arrays."""
    hole = _first_null(v)
    if hole is not None:
        at = "".join(f"[{i}]" for i in hole)
        raise BadValue(f"{_type_name(t)} holds a null at {at}, {_ARROW_NULL_FIX}")
    try:
        return np.array(v, dtype)
    except ValueError:  # ragged below this level
        return [_typed_array(x, dtype, t.value_type) for x in v]


def _typed(v: Any, t: Any) -> Any:
    """A Python value of Arrow type ``t`` under the arrays rule (dtype from ``t``)."""
    import pyarrow as pa

    if v is None:
        return None
    if _listlike(t):
        dtype = _leaf_dtype(t)
        if dtype is not None:
            return _typed_array(v, dtype, t)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(_typed(x, t.value_type))
            except BadValue as bad:
                raise bad.at(i)
        return out
    if pa.types.is_struct(t):
        for i in range(t.num_fields):
            f = t.field(i)
            try:
                v[f.name] = _typed(v[f.name], f.type)
            except BadValue as bad:
                raise bad.at(f.name)
    return v


def _flat_arrays(col: Any) -> list:
    """A flat list column of numbers/bools as numpy views per row, vectorised."""
    import pyarrow.compute as pc

    flat_arr = col.flatten()  # items of the non-null rows, slice offset applied
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    if flat_arr.null_count:
        item = int(np.flatnonzero(~flat_arr.is_valid().to_numpy(zero_copy_only=False))[0])
        row = int(np.searchsorted(offs, item, side="right")) - 1
        at = item - int(offs[row])
        raise BadValue(f"{_type_name(col.type)} holds a null at [{at}], {_ARROW_NULL_FIX}"
                       ).at(row)  # the row travels as the last path part
    flat = flat_arr.to_numpy(zero_copy_only=False)
    rows: list = [flat[a:b] for a, b in zip(offs.tolist(), offs[1:].tolist())]
    if col.null_count:
        rows = [r if ok else None for r, ok in zip(rows, col.is_valid().to_pylist())]
    return rows


def _column(col: Any, arrays: str = "auto") -> list:
    """Arrow column -> list of values, lists of numbers/bools as numpy arrays (``auto``).

    A refused row raises :class:`_Bad` whose last path part is the row (batch-local).
    """
    t = col.type
    if arrays == "never" or not _has_arrays(t):
        return col.to_pylist()
    if _listlike(t) and _numeric(t.value_type):
        return _flat_arrays(col)
    rows = col.to_pylist()
    for r, v in enumerate(rows):
        try:
            rows[r] = _typed(v, t)
        except BadValue as bad:
            raise bad.at(r)
    return rows


def iter_parquet(task: InputTask, batch_rows: int, arrays: str,
                 progress: Progress | None) -> Iterator[dict]:
    pq = pyarrow_parquet()
    meta = parquet_groups(task.path)
    n = len(meta)
    groups = list(range(task.start, n if task.stop is None else min(task.stop, n)))
    if not groups:
        return
    import pyarrow as pa

    row = sum(r for r, _ in meta[:task.start])  # file row number of the next row
    rows = sum(meta[g][0] for g in groups)
    nbytes = sum(meta[g][1] for g in groups)
    read = done = 0
    batches = pq.ParquetFile(task.path).iter_batches(batch_size=batch_rows, row_groups=groups)
    while True:
        try:
            batch = next(batches, None)
        except pa.ArrowException as exc:
            raise InputError(f"{task.path}: cannot read Parquet: {exc}") from exc
        if batch is None:
            return
        names = batch.schema.names
        columns = []
        for name, c in zip(names, batch.columns):
            try:
                columns.append(_column(c, arrays))
            except BadValue as bad:
                r = bad.parts.pop()
                raise InputError(f"{task.path}: row {row + r}: {bad.at(name).describe()}") \
                    from None
        for values in zip(*columns):
            yield dict(zip(names, values))
        row += batch.num_rows
        read += batch.num_rows
        if progress is not None:  # compressed bytes, pro rata of the rows read
            now = nbytes * read // max(rows, 1)
            progress(now - done)
            done = now
