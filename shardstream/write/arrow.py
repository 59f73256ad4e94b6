"""Arrow record batches -> samples, for every Arrow-backed input (Parquet, Arrow IPC
files, Hugging Face datasets): the lists -> arrays rule with the column's Arrow dtype.

:func:`batch_dicts` gives a batch's rows as dicts (:mod:`~shardstream.write.arrow_encode`
encodes a batch straight to bytes); :func:`open_ipc` opens an Arrow IPC file. pyarrow
is imported lazily (``import shardstream`` does not need it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from shardstream.errors import InputError
from shardstream.write.infer import NEVER_HINT, BadValue

__all__ = ["require_pyarrow", "open_ipc", "column_values", "batch_dicts", "list_lengths",
           "is_listlike", "is_numeric", "storage"]


_ARROW_NULL_FIX = ("so it cannot become a numpy array: fill the nulls "
                   f"(pyarrow.compute.fill_null), {NEVER_HINT}")


def require_pyarrow(what: str) -> Any:
    """The ``pyarrow`` module, or an :class:`InputError` saying how to install it."""
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401  (loads the kernels the readers use)
    except ImportError:
        raise InputError(f"reading {what} needs pyarrow: pip install 'shardstream[arrow]'"
                         ) from None
    return pyarrow


@contextmanager
def open_ipc(path: str) -> Iterator[Any]:
    """A reader of the Arrow IPC file ``path`` (file format, else streaming format),
    memory-mapped: ``read_next_batch()`` / ``get_batch(i)``; :class:`InputError` if
    it is neither."""
    pa = require_pyarrow("Arrow IPC files")
    try:
        source = pa.memory_map(path, "r")
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc}") from exc
    try:
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = pa.ipc.open_stream(source)
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(
                    f"{path}: not an Arrow IPC file (neither the file nor the streaming "
                    f"format: {exc}); pass a file written by pyarrow.ipc.new_file/new_stream, "
                    "pyarrow.feather.write_feather (version 2) or datasets' save_to_disk"
                ) from None
        yield reader
    finally:
        source.close()


# ---------------------------------------------------------------- Arrow types
def _pa() -> Any:
    import pyarrow

    return pyarrow


def is_listlike(t: Any) -> bool:
    pt = _pa().types
    return pt.is_list(t) or pt.is_large_list(t) or pt.is_fixed_size_list(t)


def is_numeric(t: Any) -> bool:
    pt = _pa().types
    return pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t)


def _type_name(t: Any) -> str:
    """``list<int16>`` rather than pyarrow's ``list<element: int16>``."""
    if _pa().types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_name(t.value_type)}>[{t.list_size}]"
    if is_listlike(t):
        kind = "large_list" if _pa().types.is_large_list(t) else "list"
        return f"{kind}<{_type_name(t.value_type)}>"
    return str(t)


def _leaf_dtype(t: Any) -> np.dtype | None:
    """The numpy dtype of a list type nesting only lists down to a number or bool leaf."""
    while is_listlike(t):
        t = t.value_type
    return np.dtype(t.to_pandas_dtype()) if is_numeric(t) else None


def _has_arrays(t: Any) -> bool:
    """Does a value of Arrow type ``t`` hold lists that the rule turns into arrays?"""
    if is_listlike(t):
        return _leaf_dtype(t) is not None or _has_arrays(t.value_type)
    if _pa().types.is_struct(t):
        return any(_has_arrays(t.field(i).type) for i in range(t.num_fields))
    return False


# ---------------------------------------------------------------- columns -> values
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
    if v is None:
        return None
    if is_listlike(t):
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
    if _pa().types.is_struct(t):
        for i in range(t.num_fields):
            f = t.field(i)
            try:
                v[f.name] = _typed(v[f.name], f.type)
            except BadValue as bad:
                raise bad.at(f.name)
    return v


def list_lengths(col: Any) -> np.ndarray:
    """Items per row of a list column (0 for a null row), as int64."""
    import pyarrow.compute as pc

    return pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat_arrays(col: Any) -> list:
    """A flat list column of numbers/bools as numpy views per row, vectorised."""
    flat_arr = col.flatten()  # items of the non-null rows, slice offset applied
    offs = np.concatenate([[0], np.cumsum(list_lengths(col))])
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


def storage(col: Any) -> Any:
    """An extension-typed column (e.g. a ``datasets`` Array2D) as its storage column."""
    return col.storage if isinstance(col.type, _pa().ExtensionType) else col


def column_values(col: Any, arrays: str = "auto") -> list:
    """Arrow array -> list of values, lists of numbers/bools as numpy arrays (``auto``)
    in the column's dtype (read-only views for flat lists; ``None`` for a null list).

    A refused row raises :class:`BadValue` whose last path part is the row (batch-local).
    """
    col = storage(col)
    t = col.type
    if arrays == "never" or not _has_arrays(t):
        return col.to_pylist()
    if is_listlike(t) and is_numeric(t.value_type):
        return _flat_arrays(col)
    rows = col.to_pylist()
    for r, v in enumerate(rows):
        try:
            rows[r] = _typed(v, t)
        except BadValue as bad:
            raise bad.at(r)
    return rows


def batch_dicts(batch: Any, arrays: str, source: str, first_row: int = 0) -> Iterator[dict]:
    """The rows of a record batch as dicts; a refused value is an :class:`InputError`
    naming ``source``, the row (``first_row`` + the batch row) and the field."""
    names = batch.schema.names
    columns = []
    for name, c in zip(names, batch.columns):
        try:
            columns.append(column_values(c, arrays))
        except BadValue as bad:
            r = bad.parts.pop()
            raise InputError(f"{source}: row {first_row + r}: {bad.at(name).describe()}"
                             ) from None
    for values in zip(*columns):
        yield dict(zip(names, values))
