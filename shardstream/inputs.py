"""Read the writer's input files as dicts, split into tasks for parallel workers.

Supported kinds: JSONL (``.jsonl .ndjson``, optionally ``.gz``), a JSON array
(``.json``; a ``.json`` file not starting with ``[`` is read as JSONL), msgpack
streams (``.msgpack .mp .mpk``), Parquet (``.parquet .pq``), pickle
(``.pkl .pickle``, opt-in only) and ``-`` for JSONL on standard input.

Uncompressed JSONL is split by byte ranges (a line belongs to the range in
which it starts) and Parquet by row groups; every other input is one task.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Iterator

from .errors import InputError

try:  # optional: ~3x faster than json.loads on typical lines
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

__all__ = ["InputTask", "detect_kind", "plan_tasks", "group_tasks", "iter_task",
           "iter_inputs", "estimate_total", "task_bytes", "KINDS"]

KINDS = ("jsonl", "jsonl.gz", "json", "msgpack", "parquet", "pickle", "stdin")
_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz",
    ".json": "json", ".msgpack": "msgpack", ".mp": "msgpack", ".mpk": "msgpack",
    ".parquet": "parquet", ".pq": "parquet", ".pkl": "pickle", ".pickle": "pickle",
}
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number",
               float: "number", bool: "boolean", type(None): "null"}
_REFUSE_PICKLE = ("refusing to unpickle {}: pickle can run arbitrary code; "
                  "pass --allow-pickle if you trust this file")


def _jtype(obj: Any) -> str:
    return _JSON_TYPES.get(type(obj), type(obj).__name__)


@dataclass(frozen=True)
class InputTask:
    """A contiguous, independently readable slice of one input.

    JSONL: byte range ``[start, stop)``; Parquet: row groups ``[start, stop)``;
    otherwise the whole file (``start=0, stop=None``). ``stop=None`` means "to the end".
    """

    path: str
    kind: str
    start: int = 0
    stop: int | None = None


def _stat(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    if not os.path.isfile(path):
        raise InputError(f"input path is not a regular file: {path}")
    return st


def detect_kind(path: str) -> str:
    """Return the kind of input ``path`` (one of :data:`KINDS`) from its extension."""
    if path == "-":
        return "stdin"
    name = os.path.basename(path).lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            kind = _EXTENSIONS[ext]
            break
    else:
        raise InputError(f"cannot tell the kind of input file {path}: supported are "
                         + ", ".join(sorted(_EXTENSIONS)) + " and '-' for JSONL on stdin")
    if kind == "json":
        _stat(path)
        with open(path, "rb") as f:
            while chunk := f.read(65536):
                head = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace and UTF-8 BOM
                if head:
                    return "json" if head[:1] == b"[" else "jsonl"
        return "jsonl"
    return kind


@lru_cache(maxsize=256)
def _row_groups(path: str, _mtime: int, _size: int) -> tuple[tuple[int, int], ...]:
    """(rows, compressed bytes) per row group, from the footer only."""
    pq = _pq()
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from exc
    groups = (meta.row_group(i) for i in range(meta.num_row_groups))
    return tuple((rg.num_rows, sum(rg.column(j).total_compressed_size for j in range(rg.num_columns)))
                 for rg in groups)


def _parquet_groups(path: str) -> tuple[tuple[int, int], ...]:
    st = _stat(path)
    return _row_groups(path, st.st_mtime_ns, st.st_size)


def task_bytes(task: InputTask) -> int:
    """Estimated bytes the task reads (on disk; 0 for stdin), for progress and balancing."""
    if task.kind == "stdin":
        return 0
    if task.kind == "parquet":
        return sum(b for _, b in _parquet_groups(task.path)[task.start:task.stop])
    size = _stat(task.path).st_size
    return max(0, (size if task.stop is None else min(task.stop, size)) - task.start)


def estimate_total(tasks: Iterable[InputTask]) -> int | None:
    """Total rows if known from metadata alone (Parquet only), else ``None``."""
    total = 0
    for t in tasks:
        if t.kind != "parquet":
            return None
        total += sum(r for r, _ in _parquet_groups(t.path)[t.start:t.stop])
    return total


def plan_tasks(paths: list[str], parts: int) -> list[InputTask]:
    """Split ``paths`` into tasks, in input order, cut where ``parts`` equal groups meet.

    Every path is checked first (missing file or unknown kind -> :class:`InputError`).
    With ``parts <= 1`` each input is one unsplit task (exact line numbers in errors).
    """
    whole = [InputTask(p, detect_kind(p)) for p in paths]
    for t in whole:
        if t.kind != "stdin":
            _stat(t.path)
    if parts <= 1:
        return whole
    sizes = [task_bytes(t) for t in whole]
    total = sum(sizes)
    bounds = [total * k / parts for k in range(1, parts)]
    tasks: list[InputTask] = []
    offset = 0
    for t, size in zip(whole, sizes):
        inside = [b - offset for b in bounds if offset < b < offset + size]
        if t.kind == "jsonl" and inside:
            cuts = [0, *sorted({int(b) for b in inside} - {0}), None]
            tasks += [InputTask(t.path, t.kind, a, b) for a, b in zip(cuts, cuts[1:])]
        elif t.kind == "parquet" and inside:
            cum = [0]
            for _, nb in _parquet_groups(t.path):
                cum.append(cum[-1] + nb)
            n = len(cum) - 1
            picks = {min(range(n + 1), key=lambda i: abs(cum[i] - b)) for b in inside}
            cuts = [0, *sorted(picks - {0, n}), n]
            tasks += [InputTask(t.path, t.kind, a, b) for a, b in zip(cuts, cuts[1:])]
        else:
            tasks.append(t)
        offset += size
    return tasks


def group_tasks(tasks: list[InputTask], parts: int) -> list[list[InputTask]]:
    """Divide ``tasks`` into ``parts`` contiguous groups of about equal bytes (some may be empty)."""
    parts = max(1, parts)
    groups: list[list[InputTask]] = [[] for _ in range(parts)]
    sizes = [task_bytes(t) for t in tasks]
    total = sum(sizes)
    done = 0
    for i, (t, size) in enumerate(zip(tasks, sizes)):
        if total:  # place each task by the midpoint of its bytes
            g = int((done + size / 2) * parts / total)
        else:
            g = i * parts // len(tasks)
        groups[min(g, parts - 1)].append(t)
        done += size
    return groups


def _loads(line: bytes) -> Any:
    if _orjson is not None:
        try:
            return _orjson.loads(line)
        except ValueError:
            pass  # let json decide (NaN, huge ints, BOM) and word the error
    return json.loads(line)


def _iter_jsonl(lines: Iterable[bytes], label: str, pos: int, stop: int | None,
                numbered: bool) -> Iterator[dict]:
    """Parse JSON lines; ``pos`` is the byte offset of the first line, ``stop`` the range end."""
    lineno = 0
    for line in lines:
        if stop is not None and pos >= stop:
            return
        lineno += 1
        text = line.rstrip()  # keep leading blanks so error columns match the file
        if text:
            where = (f"{label}:{lineno}" if numbered else
                     f"{label}: line at byte offset {pos} (split read, line number unknown)")
            try:
                obj = _loads(text)
            except (ValueError, RecursionError) as exc:  # say "column", not json's "line 1"
                why = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
                raise InputError(f"{where}: invalid JSON: {why}; fix or remove the line") from None
            if type(obj) is not dict:
                raise InputError(f"{where}: expected a JSON object per line, got {_jtype(obj)}")
            yield obj
        pos += len(line)


def _iter_plain_jsonl(task: InputTask) -> Iterator[dict]:
    with _open(task.path) as f:
        pos = 0
        if task.start > 0:  # skip the line begun in the previous range
            f.seek(task.start - 1)
            pos = task.start - 1 + len(f.readline())
        yield from _iter_jsonl(f, task.path, pos, task.stop, numbered=task.start == 0)


def _iter_gzip(task: InputTask) -> Iterator[dict]:
    try:
        with gzip.open(task.path, "rb") as f:
            yield from _iter_jsonl(f, task.path, 0, None, numbered=True)
    except FileNotFoundError:
        raise InputError(f"input file not found: {task.path}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{task.path}: damaged gzip stream: {exc}") from exc


def _iter_json_array(task: InputTask) -> Iterator[dict]:
    """A JSON array of objects; the whole document is loaded into memory."""
    with _open(task.path) as f:
        try:
            data = json.load(f)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"{task.path}: invalid JSON: {exc}") from None
    if not isinstance(data, list):
        raise InputError(f"{task.path}: expected a JSON array of objects, got {_jtype(data)}")
    for i, item in enumerate(data):
        if type(item) is not dict:
            raise InputError(f"{task.path}: element [{i}] of the array is {_jtype(item)}, "
                             "expected an object")
        yield item


def _iter_msgpack(task: InputTask) -> Iterator[dict]:
    import msgpack

    with _open(task.path) as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=0)
        i = 0
        while True:
            pos = unpacker.tell()
            try:
                item = unpacker.unpack()
            except msgpack.OutOfData:
                if unpacker.tell() != pos:
                    raise InputError(f"{task.path}: msgpack stream truncated in item {i} "
                                     f"(byte offset {pos})") from None
                return
            except (ValueError, msgpack.UnpackException) as exc:
                raise InputError(f"{task.path}: invalid msgpack in item {i} "
                                 f"(byte offset {pos}): {exc!r}") from None
            if not isinstance(item, dict):
                raise InputError(f"{task.path}: msgpack item {i} is a {type(item).__name__}, "
                                 "expected a map")
            yield item
            i += 1


def _iter_pickle(task: InputTask) -> Iterator[dict]:
    with _open(task.path) as f:
        try:
            data = pickle.load(f)
        except Exception as exc:  # unpickling can fail in any number of ways
            raise InputError(f"{task.path}: cannot unpickle: {exc!r}") from exc
    if not isinstance(data, (list, tuple)):
        raise InputError(f"{task.path}: expected a pickled list of dicts, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InputError(f"{task.path}: element [{i}] is a {type(item).__name__}, expected a dict")
        yield item


def _pq() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: pip install 'shardstream[parquet]'") from None
    return pq


def _column(col: Any) -> list:
    """Arrow column -> list of values; numeric/bool lists become numpy views per row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    fixed = pa.types.is_fixed_size_list(t)
    if not (fixed or pa.types.is_list(t) or pa.types.is_large_list(t)):
        return col.to_pylist()
    vt = t.value_type
    if not (pa.types.is_integer(vt) or pa.types.is_floating(vt) or pa.types.is_boolean(vt)):
        return col.to_pylist()
    flat_arr = col.flatten()  # items of the non-null rows, slice offset applied
    holes = flat_arr.null_count
    flat = (flat_arr.fill_null(False if pa.types.is_boolean(vt) else 0) if holes else flat_arr
            ).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    rows: list = [flat[a:b] for a, b in zip(offs.tolist(), offs[1:].tolist())]
    if holes:  # a row holding null items stays a Python list with None in it
        bad = np.flatnonzero(~flat_arr.is_valid().to_numpy(zero_copy_only=False))
        for r in set(np.searchsorted(offs, bad, side="right").tolist()):
            rows[r - 1] = col[r - 1].as_py()
    if col.null_count:
        rows = [r if ok else None for r, ok in zip(rows, col.is_valid().to_pylist())]
    return rows


def _iter_parquet(task: InputTask, batch_rows: int) -> Iterator[dict]:
    pq = _pq()
    n = len(_parquet_groups(task.path))
    groups = list(range(task.start, n if task.stop is None else min(task.stop, n)))
    if not groups:
        return
    import pyarrow as pa

    batches = pq.ParquetFile(task.path).iter_batches(batch_size=batch_rows, row_groups=groups)
    while True:
        try:
            batch = next(batches, None)
        except pa.ArrowException as exc:
            raise InputError(f"{task.path}: cannot read Parquet: {exc}") from exc
        if batch is None:
            return
        names = batch.schema.names
        for row in zip(*[_column(c) for c in batch.columns]):
            yield dict(zip(names, row))


def _open(path: str) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None


def iter_task(task: InputTask, *, allow_pickle: bool = False, batch_rows: int = 8192) -> Iterator[dict]:
    """Yield the dicts of one task, streaming where the format allows.

    Parquet list columns of numbers/bools come back as read-only numpy views
    (``None`` for a null list); Parquet is read ``batch_rows`` rows at a time.
    """
    if task.kind == "pickle" and not allow_pickle:  # refuse now, not on first next()
        raise InputError(_REFUSE_PICKLE.format(task.path))
    if task.kind == "stdin":
        return _iter_jsonl(sys.stdin.buffer, "<stdin>", 0, None, numbered=True)
    if task.kind == "parquet":
        return _iter_parquet(task, batch_rows)
    readers = {"jsonl": _iter_plain_jsonl, "jsonl.gz": _iter_gzip, "json": _iter_json_array,
               "msgpack": _iter_msgpack, "pickle": _iter_pickle}
    if task.kind not in readers:
        raise InputError(f"unknown input kind {task.kind!r} for {task.path}; "
                         f"expected one of {', '.join(KINDS)}")
    return readers[task.kind](task)


def iter_inputs(paths: list[str], *, allow_pickle: bool = False) -> Iterator[dict]:
    """Yield every dict of every input, in order (all paths are checked up front)."""
    for task in plan_tasks(list(paths), 1):
        yield from iter_task(task, allow_pickle=allow_pickle)
