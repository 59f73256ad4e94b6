"""Parquet and Arrow IPC input (``.arrow`` files, Hugging Face ``save_to_disk`` folders)
and in-memory Arrow (a ``datasets.Dataset``, a ``pyarrow.Table``: :func:`arrow_source`,
for ``write_shards``): record batches -> samples by :mod:`shardstream.write.arrow`
(list columns as numpy arrays in their Arrow dtype), or encoded a batch at a time by
:mod:`shardstream.write.arrow_encode`; never a whole table at once.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Iterator

from shardstream.errors import InputError
from shardstream.write.arrow import batch_dicts, open_ipc
from shardstream.write.arrow_encode import EncodedRows, encode_batch
from shardstream.write.plan import (InputTask, Progress, arrow_batches, parquet_groups,
                                    pyarrow_parquet)

__all__ = ["iter_parquet", "iter_arrow", "iter_batches", "ArrowSource", "arrow_source"]


def iter_batches(batches: Iterable[Any], arrays: str, source: str, first_row: int = 0, *,
                 batch_rows: int = 8192, encode: bool = False, key_field: str = "__key__"
                 ) -> Iterator[dict | EncodedRows]:
    """The rows of record ``batches`` (cut to ``batch_rows`` rows) as dicts or, with
    ``encode`` (and ``arrays="auto"``), as :class:`EncodedRows` where
    :func:`encode_batch` can encode a batch. Errors name ``source`` and the row,
    counted from ``first_row``."""
    row = first_row
    for big in batches:
        for lo in range(0, big.num_rows, batch_rows):
            batch = big.slice(lo, batch_rows) if big.num_rows > batch_rows else big
            enc = encode_batch(batch, key_field) if encode and arrays == "auto" else None
            if enc is not None:
                yield enc
            else:
                yield from batch_dicts(batch, arrays, source, row)
            row += batch.num_rows


def _pro_rata(items: Iterator[dict | EncodedRows], rows: int, nbytes: int,
              progress: Progress | None) -> Iterator[dict | EncodedRows]:
    """Pass ``items`` on, calling ``progress`` with ``nbytes`` pro rata of the rows done."""
    if progress is None:
        yield from items
        return
    read = done = 0
    for item in items:
        yield item
        read += len(item) if type(item) is EncodedRows else 1
        if type(item) is EncodedRows or read & 1023 == 0 or read == rows:
            now = nbytes * min(read, rows) // max(rows, 1)
            progress(now - done)
            done = now
    if done < nbytes:
        progress(nbytes - done)


def iter_parquet(task: InputTask, batch_rows: int, arrays: str, progress: Progress | None,
                 encode: bool = False, key_field: str = "__key__"
                 ) -> Iterator[dict | EncodedRows]:
    """The rows of the row groups ``[task.start, task.stop)`` of a Parquet file."""
    pq = pyarrow_parquet()
    meta = parquet_groups(task.path)
    n = len(meta)
    groups = list(range(task.start, n if task.stop is None else min(task.stop, n)))
    if not groups:
        return
    import pyarrow as pa

    first = sum(r for r, _ in meta[:task.start])  # file row number of the task's first row
    batches = pq.ParquetFile(task.path).iter_batches(batch_size=batch_rows, row_groups=groups)

    def read() -> Iterator[Any]:
        try:
            yield from batches
        except pa.ArrowException as exc:
            raise InputError(f"{task.path}: cannot read Parquet: {exc}") from exc

    yield from _pro_rata(iter_batches(read(), arrays, task.path, first, batch_rows=batch_rows,
                                      encode=encode, key_field=key_field),
                         sum(meta[g][0] for g in groups), sum(meta[g][1] for g in groups),
                         progress)


def iter_arrow(task: InputTask, batch_rows: int, arrays: str, progress: Progress | None,
               encode: bool = False, key_field: str = "__key__"
               ) -> Iterator[dict | EncodedRows]:
    """The rows of the record batches ``[task.start, task.stop)`` of an Arrow IPC file
    (memory-mapped; a streaming-format file is read through the batches before them)."""
    meta = arrow_batches(task.path)
    stop = len(meta) if task.stop is None else min(task.stop, len(meta))
    if task.start >= stop:
        return
    first = sum(r for r, _ in meta[:task.start])

    def read() -> Iterator[Any]:
        import pyarrow as pa

        with open_ipc(task.path) as reader:
            random = hasattr(reader, "get_batch")  # file format: no need to read the rest
            for i in range(task.start if random else 0, stop):
                try:
                    batch = reader.get_batch(i) if random else reader.read_next_batch()
                except (pa.ArrowException, StopIteration) as exc:
                    raise InputError(f"{task.path}: record batch {i} cannot be read ({exc}); "
                                     "the file is truncated or corrupt: write it again"
                                     ) from None
                if i >= task.start:
                    yield batch

    yield from _pro_rata(iter_batches(read(), arrays, task.path, first, batch_rows=batch_rows,
                                      encode=encode, key_field=key_field),
                         sum(r for r, _ in meta[task.start:stop]),
                         sum(b for _, b in meta[task.start:stop]), progress)


class ArrowSource:
    """The rows of an in-memory Arrow-backed dataset, read ``batch_rows`` at a time as
    Arrow batches (see :func:`arrow_source`); ``items(lo, hi)`` is what
    :func:`iter_batches` gives for rows ``[lo, hi)``."""

    def __init__(self, table_of: Callable[[int, int], Any], num_rows: int, label: str) -> None:
        self.table_of, self.num_rows, self.label = table_of, num_rows, label

    def __len__(self) -> int:
        return self.num_rows

    def items(self, lo: int, hi: int, *, encode: bool = True, key_field: str = "__key__",
              batch_rows: int = 4096) -> Iterator[dict | EncodedRows]:
        def batches() -> Iterator[Any]:
            for a in range(lo, hi, batch_rows):
                yield from self.table_of(a, min(a + batch_rows, hi)).combine_chunks().to_batches()

        return iter_batches(batches(), "auto", self.label, lo, batch_rows=batch_rows,
                            encode=encode, key_field=key_field)


def arrow_source(obj: Any) -> ArrowSource | None:
    """An :class:`ArrowSource` for a ``datasets.Dataset`` with no format or transform set
    (its columns as stored: lists -> arrays by the Arrow rule, Image/Audio features as their
    ``{"bytes", "path"}`` structs) or a ``pyarrow.Table``/``RecordBatch``; else ``None``.
    Neither package is imported here: an object of one is only seen once it is loaded."""
    top = type(obj).__module__.split(".")[0]
    if top == "pyarrow" and "pyarrow" in sys.modules:
        pa = sys.modules["pyarrow"]
        if isinstance(obj, pa.RecordBatch):
            obj = pa.Table.from_batches([obj])
        if isinstance(obj, pa.Table):
            return ArrowSource(lambda a, b: obj.slice(a, b - a), obj.num_rows, "pyarrow.Table")
    if top == "datasets" and "datasets" in sys.modules:
        hf = sys.modules["datasets"]
        if isinstance(obj, hf.DatasetDict):
            splits = list(obj)
            raise InputError(f"got a datasets.DatasetDict with the splits {', '.join(splits)}: "
                             f"pass one split, e.g. dd[{(splits or ['train'])[0]!r}]")
        if isinstance(obj, hf.Dataset) and obj.format["type"] is None:
            return ArrowSource(_hf_rows(obj), len(obj), "datasets.Dataset")
    return None


def _hf_rows(ds: Any) -> Callable[[int, int], Any]:
    """Rows ``[a, b)`` of a ``datasets.Dataset`` as a ``pyarrow.Table``. Without an
    indices mapping (no ``select``/``shuffle``/``filter`` pending) these are slices of
    the table it holds (``ds.data``); otherwise, and for a column subset kept beside the
    rest (``output_all_columns``), its own ``arrow`` formatting, which costs a hash of
    the whole table (``with_format`` fingerprints its result) but applies the mapping."""
    fmt = ds.format
    if getattr(ds, "_indices", True) is None and not fmt["output_all_columns"]:
        table = ds.data.table
        if fmt["columns"] is not None:
            table = table.select(fmt["columns"])
        return lambda a, b: table.slice(a, b - a)
    view = ds.with_format("arrow", columns=fmt["columns"],
                          output_all_columns=fmt["output_all_columns"])
    return lambda a, b: view[a:b]
