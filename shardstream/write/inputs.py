"""Read the writer's input files as dicts: one task (see :mod:`shardstream.write.plan`)
at a time, by the reader of its kind (:mod:`~shardstream.write.jsonl`,
:mod:`~shardstream.write.parquet`).

Supported kinds: JSONL (``.jsonl .ndjson``, optionally ``.gz``), a JSON array
(``.json``; a ``.json`` file not starting with ``[`` is read as JSONL), msgpack
streams (``.msgpack .mp .mpk``), Parquet (``.parquet .pq``), Arrow IPC files
(``.arrow .arrows .feather .ipc``, file or streaming format), a Hugging Face
``save_to_disk`` folder (its Arrow files; a ``DatasetDict`` folder: pass one split's
folder), pickle (``.pkl .pickle``, opt-in only) and ``-`` for JSONL on standard input.

Uncompressed JSONL is split by byte ranges (a line belongs to the range in
which it starts), Parquet by row groups and Arrow by record batches; every other
input is one task. Parquet and Arrow are read a batch at a time, never whole.

Values stay exact: an integer outside the 64 bits msgpack stores (a JSON
``123456789012345678901234567890``) is an :class:`InputError` naming file,
line and field, never a silently rounded float.

Lists -> arrays, one rule for every kind (``arrays="auto"``, the default; see
docs/inputs.md): a list whose items are all numbers (ints, or ints and floats)
or all bools, or lists that become arrays of one shape, becomes one numpy
array; any other list stays a list and the rule applies to its items. The
dtype is the column's Arrow type for Parquet, Arrow and Hugging Face datasets
(:mod:`shardstream.write.arrow`), else int64 (uint64 when needed),
float64 if any float, bool. A numeric list holding a null is an
:class:`InputError` (fill it, or keep lists with ``arrays="never"``).
"""

from __future__ import annotations

import sys
from itertools import chain
from typing import Iterator

from shardstream.errors import InputError
from shardstream.write.arrow_encode import EncodedRows
from shardstream.write.jsonl import (iter_gzip, iter_json_array, iter_jsonl, iter_msgpack,
                                     iter_pickle, iter_plain_jsonl)
from shardstream.write.parquet import iter_arrow, iter_parquet
from shardstream.write.plan import KINDS, InputTask, Progress, hf_files, plan_tasks

__all__ = ["iter_task", "iter_inputs", "ARRAYS"]


ARRAYS = ("auto", "never")  # lists -> numpy arrays by the module's rule / keep every list


_REFUSE_PICKLE = ("refusing to unpickle {}: pickle can run arbitrary code; "
                  "pass --allow-pickle if you trust this file")


def _check_arrays(arrays: str) -> None:
    if arrays not in ARRAYS:
        raise ValueError(f"arrays must be one of {', '.join(map(repr, ARRAYS))}, got {arrays!r}")


def iter_task(task: InputTask, *, allow_pickle: bool = False, batch_rows: int = 8192,
              arrays: str = "auto", progress: Progress | None = None, encode: bool = False,
              key_field: str = "__key__") -> Iterator[dict | EncodedRows]:
    """Yield the dicts of one task, streaming where the format allows.

    ``arrays="auto"``: lists of numbers/bools become numpy arrays by the module's
    rule (Parquet's and Arrow's are read-only views in the column's dtype; ``None``
    for a null list); ``"never"``: every list stays a Python list. Parquet and Arrow
    are read ``batch_rows`` rows at a time; with ``encode=True`` (and ``"auto"``)
    they yield :class:`~shardstream.write.arrow_encode.EncodedRows` (a batch's samples
    already encoded, for :meth:`ShardWriter.write_encoded`) where the batch's column
    types allow, dicts otherwise. ``progress(nbytes)`` is called now and then with
    the bytes of the file consumed since the last call (compressed bytes for
    ``.gz`` and Parquet); the calls of a whole file add up to its size.
    """
    _check_arrays(arrays)
    if task.kind == "pickle" and not allow_pickle:  # refuse now, not on first next()
        raise InputError(_REFUSE_PICKLE.format(task.path))
    if task.kind == "stdin":
        return iter_jsonl(sys.stdin.buffer, "<stdin>", 0, None, True, arrays, progress)
    if task.kind in ("parquet", "arrow"):
        read = iter_parquet if task.kind == "parquet" else iter_arrow
        return read(task, batch_rows, arrays, progress, encode, key_field)
    if task.kind == "hf":
        return chain.from_iterable(
            iter_arrow(InputTask(p, "arrow"), batch_rows, arrays, progress, encode, key_field)
            for p in hf_files(task.path))
    readers = {"jsonl": iter_plain_jsonl, "jsonl.gz": iter_gzip, "json": iter_json_array,
               "msgpack": iter_msgpack, "pickle": iter_pickle}
    if task.kind not in readers:
        raise InputError(f"unknown input kind {task.kind!r} for {task.path}; "
                         f"expected one of {', '.join(KINDS)}")
    return readers[task.kind](task, arrays, progress)


def iter_inputs(paths: list[str], *, allow_pickle: bool = False,
                arrays: str = "auto") -> Iterator[dict]:
    """Yield every dict of every input, in order (all paths are checked up front)."""
    _check_arrays(arrays)
    for task in plan_tasks(list(paths), 1):
        yield from iter_task(task, allow_pickle=allow_pickle, arrays=arrays)
