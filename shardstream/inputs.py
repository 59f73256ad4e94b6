"""Read the writer's input files as dicts, split into tasks for parallel workers.

Supported kinds: JSONL (``.jsonl .ndjson``, optionally ``.gz``), a JSON array
(``.json``; a ``.json`` file not starting with ``[`` is read as JSONL), msgpack
streams (``.msgpack .mp .mpk``), Parquet (``.parquet .pq``), pickle
(``.pkl .pickle``, opt-in only) and ``-`` for JSONL on standard input.

Uncompressed JSONL is split by byte ranges (a line belongs to the range in
which it starts) and Parquet by row groups; every other input is one task.

Values stay exact: an integer outside the 64 bits msgpack stores (a JSON
``123456789012345678901234567890``) is an :class:`InputError` naming file,
line and field, never a silently rounded float.

Lists -> arrays, one rule for every kind (``arrays="auto"``, the default; see
docs/inputs.md): a list whose items are all numbers (ints, or ints and floats)
or all bools, or lists that become arrays of one shape, becomes one numpy
array; any other list stays a list and the rule applies to its items. The
dtype is the column's Arrow type for Parquet, else int64 (uint64 when needed),
float64 if any float, bool. A numeric list holding a null is an
:class:`InputError` (fill it, or keep lists with ``arrays="never"``).
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
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import InputError

try:  # optional: ~3x faster than json.loads on typical lines
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

__all__ = ["InputTask", "detect_kind", "plan_tasks", "group_tasks", "iter_task",
           "iter_inputs", "estimate_total", "task_bytes", "KINDS", "ARRAYS"]

ARRAYS = ("auto", "never")  # lists -> numpy arrays by the module's rule / keep every list
Progress = Callable[[int], None]  # bytes of the input consumed since the last call

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


# ---------------------------------------------------------------- exact values, arrays
_INT_MIN, _INT_MAX, _UINT_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_EXACT = 1 << 53  # float64 holds every integer in [-2**53, 2**53] exactly
# An integer literal follows a delimiter (or "-"); fraction and exponent digits follow
# ".", "e", "+": digits -> "0", delimiters -> " ", anything else -> "x"; a run of 19 digits
# after a delimiter is the only way to spell an integer that may not fit int64.
_DIGITS = bytes(48 if 48 <= b <= 57 else 32 if b in b" \t\r\n:,[-" else 120 for b in range(256))
_RUN = b" " + b"0" * 19
_NONE = type(None)
_NUMBERS = frozenset({int, float})
_NUMERIC_OR_NONE = frozenset({int, float, bool, _NONE})
_NEVER_HINT = "or pass --arrays never (arrays='never') to keep lists as Python lists"
_ARROW_NULL_FIX = ("so it cannot become a numpy array: fill the nulls "
                   f"(pyarrow.compute.fill_null), {_NEVER_HINT}")


class _Bad(Exception):
    """A value the rules refuse; ``parts`` is its field path, filled in while unwinding."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.parts: list[str | int] = []

    def at(self, part: str | int) -> "_Bad":
        self.parts.append(part)
        return self

    def describe(self) -> str:
        path = ""
        for p in reversed(self.parts):
            path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
        return f'field "{path}": {self.message}'


def _digits(n: int) -> str:
    s = str(n)
    return s if len(s) <= 40 else f"{s[:20]}...{s[-10:]} ({len(s.lstrip('-'))} digits)"


def _check_ints(obj: Any) -> None:
    """Refuse integers msgpack cannot store (outside ``[-2**63, 2**64)``)."""
    t = type(obj)
    if t is int:
        if not _INT_MIN <= obj <= _UINT_MAX:
            raise _Bad(f"integer {_digits(obj)} does not fit in 64 bits; store it as a string")
    elif t is dict:
        for k, v in obj.items():
            try:
                _check_ints(v)
            except _Bad as bad:
                raise bad.at(str(k))
    elif t is list or t is tuple:
        for i, v in enumerate(obj):
            try:
                _check_ints(v)
            except _Bad as bad:
                raise bad.at(i)


def _arrays_in(d: dict) -> None:
    """Apply the lists -> arrays rule to every list in ``d``, in place."""
    for k, v in d.items():
        t = type(v)
        if t is list:
            try:
                d[k] = _as_array(v)
            except _Bad as bad:
                raise bad.at(str(k))
        elif t is dict:
            try:
                _arrays_in(v)
            except _Bad as bad:
                raise bad.at(str(k))


def _items(lst: list) -> None:
    """A list that stays a list: apply the rule to the lists and dicts inside it."""
    for i, v in enumerate(lst):
        t = type(v)
        try:
            if t is list:
                lst[i] = _as_array(v)
            elif t is dict:
                _arrays_in(v)
        except _Bad as bad:
            raise bad.at(i)


def _as_array(lst: list) -> Any:
    """One list under the rule: an ndarray, or the list (its items converted)."""
    if not lst:
        return lst  # no items, no dtype: an empty list stays []
    types = list(map(type, lst))
    t = types[0]
    if types.count(t) == len(types):  # one kind (count compares by identity first: fast)
        if t is float:
            return np.array(lst, np.float64)
        if t is int:
            return _int_array(lst)
        if t is bool:
            return np.array(lst, np.bool_)
        if t is list:
            return _nested(lst)
        if t is dict:
            _items(lst)
        return lst
    kinds = set(types)
    if kinds == _NUMBERS:
        return _float_array(lst)
    if _NONE in kinds and kinds <= _NUMERIC_OR_NONE:
        i = next(i for i, v in enumerate(lst) if v is None)
        raise _Bad(f"a list of numbers holds null at [{i}], so it cannot become a numpy "
                   f"array: fill the nulls (e.g. with 0 or NaN), {_NEVER_HINT}")
    _items(lst)  # mixed kinds ([1, "a"], [true, 1]): a list
    return lst


def _int_array(lst: list) -> np.ndarray:
    try:
        return np.array(lst, np.int64)
    except OverflowError:
        pass
    try:
        return np.array(lst, np.uint64)
    except OverflowError:
        raise _Bad("a list of integers mixes negative values with values >= 2**63: no "
                   f"64-bit integer dtype holds them all; store them as strings, "
                   f"{_NEVER_HINT}") from None


def _float_array(lst: list) -> np.ndarray:
    for i, v in enumerate(lst):
        if type(v) is int and not -_EXACT <= v <= _EXACT:
            raise _Bad(f"a list of floats holds the integer {_digits(v)} at [{i}], which "
                       f"float64 cannot hold exactly; write it as a float or a string, "
                       f"{_NEVER_HINT}")
    return np.array(lst, np.float64)


def _nested(lst: list) -> Any:
    """Lists of lists: one array when every item becomes an array of one shape."""
    _items(lst)
    if not all(type(v) is np.ndarray for v in lst) or len({v.shape for v in lst}) != 1:
        return lst  # ragged (or not all numeric): a list of arrays and lists
    dtypes = {v.dtype for v in lst}
    if len(dtypes) == 1:
        return np.stack(lst)
    if dtypes == {np.dtype(np.int64), np.dtype(np.float64)}:
        for i, v in enumerate(lst):
            if v.dtype.kind == "i" and ((v < -_EXACT).any() or (v > _EXACT).any()):
                raise _Bad(f"rows of floats and integers, and the integers at [{i}] do not "
                           f"all fit float64 exactly; write them as floats, {_NEVER_HINT}")
        return np.stack(lst).astype(np.float64, copy=False)
    return lst  # bool rows among number rows, int64 among uint64: a list of arrays


def _convert(obj: dict, arrays: str, slow: bool, where: Callable[[], str]) -> dict:
    """Check integers (``slow``: parsed by a reader that keeps big ints) and apply the
    arrays rule; a refused value is an :class:`InputError` at ``where()``."""
    try:
        if slow:
            _check_ints(obj)
        if arrays == "auto":
            _arrays_in(obj)
    except _Bad as bad:
        raise InputError(f"{where()}: {bad.describe()}") from None
    return obj


def _check_arrays(arrays: str) -> None:
    if arrays not in ARRAYS:
        raise ValueError(f"arrays must be one of {', '.join(map(repr, ARRAYS))}, got {arrays!r}")


def _loads(line: bytes) -> tuple[Any, bool]:
    """Parse one JSON line; ``True`` with it when its integers still need checking.

    orjson turns integer literals outside 64 bits into floats silently, so a line
    with a run of 19+ digits (the only way to spell such an integer) goes to
    ``json``, which keeps them exact for :func:`_check_ints` to refuse.
    """
    if _orjson is not None and _RUN not in line.translate(_DIGITS):  # faster than a regex
        try:
            return _orjson.loads(line), False
        except ValueError:
            pass  # let json decide (NaN, BOM) and word the error
    return json.loads(line), True


def _where(label: str, lineno: int, pos: int, numbered: bool) -> str:
    """Where a JSON line is, for errors: ``file:line`` (or its byte offset in a split read)."""
    if numbered:
        return f"{label}:{lineno}"
    return f"{label}: line at byte offset {pos} (split read, line number unknown)"


def _iter_jsonl(lines: Iterable[bytes], label: str, pos: int, stop: int | None,
                numbered: bool, arrays: str = "auto", progress: Progress | None = None,
                tell: Callable[[], int] | None = None) -> Iterator[dict]:
    """Parse JSON lines; ``pos`` is the byte offset of the first line, ``stop`` the range end.

    ``progress(nbytes)`` every 256 lines: the bytes consumed, from ``tell()`` (e.g. the
    compressed offset of a gzip file) or else from the line lengths.
    """
    lineno = 0
    auto = arrays == "auto"
    reported = done = tell() if tell is not None else pos
    for line in lines:
        if stop is not None and pos >= stop:
            break
        lineno += 1
        text = line.rstrip()  # keep leading blanks so error columns match the file
        if text:
            try:
                obj, slow = _loads(text)
            except (ValueError, RecursionError) as exc:  # say "column", not json's "line 1"
                why = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
                raise InputError(f"{_where(label, lineno, pos, numbered)}: invalid JSON: {why}; "
                                 "fix or remove the line") from None
            if type(obj) is not dict:
                raise InputError(f"{_where(label, lineno, pos, numbered)}: expected a JSON "
                                 f"object per line, got {_jtype(obj)}")
            if slow or auto:
                try:
                    if slow:
                        _check_ints(obj)
                    if auto:
                        _arrays_in(obj)
                except _Bad as bad:
                    where = _where(label, lineno, pos, numbered)
                    raise InputError(f"{where}: {bad.describe()}") from None
            yield obj
        pos += len(line)
        if progress is not None and not lineno & 255:
            done = tell() if tell is not None else pos
            progress(done - reported)
            reported = done
    if progress is not None:
        done = tell() if tell is not None else pos
        progress(done - reported)


def _iter_plain_jsonl(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    with _open(task.path) as f:
        pos = 0
        if task.start > 0:  # skip the line begun in the previous range
            f.seek(task.start - 1)
            pos = task.start - 1 + len(f.readline())
        yield from _iter_jsonl(f, task.path, pos, task.stop, task.start == 0, arrays,
                               progress)


def _iter_gzip(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    try:
        with gzip.open(task.path, "rb") as f:
            raw = f.fileobj  # the compressed file: progress counts the bytes read from disk
            yield from _iter_jsonl(f, task.path, 0, None, True, arrays, progress, raw.tell)
    except FileNotFoundError:
        raise InputError(f"input file not found: {task.path}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{task.path}: damaged gzip stream: {exc}") from exc


def _iter_json_array(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    """A JSON array of objects; the whole document is loaded into memory."""
    with _open(task.path) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{task.path}: invalid JSON: {exc}") from None
    if progress is not None:
        progress(len(raw))
    slow = _RUN in raw.translate(_DIGITS)  # json keeps big ints exact: check them
    del raw
    if not isinstance(data, list):
        raise InputError(f"{task.path}: expected a JSON array of objects, got {_jtype(data)}")
    for i, item in enumerate(data):
        if type(item) is not dict:
            raise InputError(f"{task.path}: element [{i}] of the array is {_jtype(item)}, "
                             "expected an object")
        yield _convert(item, arrays, slow, lambda: f"{task.path}: element [{i}]")


def _iter_msgpack(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    import msgpack

    with _open(task.path) as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=0)
        i = reported = 0
        while True:
            pos = unpacker.tell()
            if progress is not None and not i & 255:
                progress(pos - reported)
                reported = pos
            try:
                item = unpacker.unpack()
            except msgpack.OutOfData:
                if unpacker.tell() != pos:
                    raise InputError(f"{task.path}: msgpack stream truncated in item {i} "
                                     f"(byte offset {pos})") from None
                if progress is not None:
                    progress(pos - reported)
                return
            except (ValueError, msgpack.UnpackException) as exc:
                raise InputError(f"{task.path}: invalid msgpack in item {i} "
                                 f"(byte offset {pos}): {exc!r}") from None
            if not isinstance(item, dict):
                raise InputError(f"{task.path}: msgpack item {i} is a {type(item).__name__}, "
                                 "expected a map")
            yield _convert(item, arrays, False,
                           lambda: f"{task.path}: msgpack item {i} (byte offset {pos})")
            i += 1


def _iter_pickle(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    with _open(task.path) as f:
        try:
            data = pickle.load(f)
        except Exception as exc:  # unpickling can fail in any number of ways
            raise InputError(f"{task.path}: cannot unpickle: {exc!r}") from exc
        if progress is not None:
            progress(f.tell())
    if not isinstance(data, (list, tuple)):
        raise InputError(f"{task.path}: expected a pickled list of dicts, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InputError(f"{task.path}: element [{i}] is a {type(item).__name__}, expected a dict")
        yield _convert(item, arrays, True, lambda: f"{task.path}: element [{i}]")


def _pq() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: pip install 'shardstream[parquet]'") from None
    return pq


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
        raise _Bad(f"{_type_name(t)} holds a null at {at}, {_ARROW_NULL_FIX}")
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
            except _Bad as bad:
                raise bad.at(i)
        return out
    if pa.types.is_struct(t):
        for i in range(t.num_fields):
            f = t.field(i)
            try:
                v[f.name] = _typed(v[f.name], f.type)
            except _Bad as bad:
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
        raise _Bad(f"{_type_name(col.type)} holds a null at [{at}], {_ARROW_NULL_FIX}"
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
        except _Bad as bad:
            raise bad.at(r)
    return rows


def _iter_parquet(task: InputTask, batch_rows: int, arrays: str,
                  progress: Progress | None) -> Iterator[dict]:
    pq = _pq()
    meta = _parquet_groups(task.path)
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
            except _Bad as bad:
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


def _open(path: str) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None


def iter_task(task: InputTask, *, allow_pickle: bool = False, batch_rows: int = 8192,
              arrays: str = "auto", progress: Progress | None = None) -> Iterator[dict]:
    """Yield the dicts of one task, streaming where the format allows.

    ``arrays="auto"``: lists of numbers/bools become numpy arrays by the module's
    rule (Parquet's are read-only views in the column's dtype; ``None`` for a null
    list); ``"never"``: every list stays a Python list. Parquet is read
    ``batch_rows`` rows at a time. ``progress(nbytes)`` is called now and then with
    the bytes of the file consumed since the last call (compressed bytes for
    ``.gz`` and Parquet); the calls of a whole file add up to its size.
    """
    _check_arrays(arrays)
    if task.kind == "pickle" and not allow_pickle:  # refuse now, not on first next()
        raise InputError(_REFUSE_PICKLE.format(task.path))
    if task.kind == "stdin":
        return _iter_jsonl(sys.stdin.buffer, "<stdin>", 0, None, True, arrays, progress)
    if task.kind == "parquet":
        return _iter_parquet(task, batch_rows, arrays, progress)
    readers = {"jsonl": _iter_plain_jsonl, "jsonl.gz": _iter_gzip, "json": _iter_json_array,
               "msgpack": _iter_msgpack, "pickle": _iter_pickle}
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
