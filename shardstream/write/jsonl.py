"""Readers for JSON lines (plain or gzip), JSON arrays, msgpack and pickle inputs."""

from __future__ import annotations

import gzip
import json
import pickle
import zlib
from typing import Any, Callable, Iterable, Iterator

from shardstream.errors import InputError
from shardstream.write.infer import (DIGIT_RUN, DIGITS, BadValue, arrays_in, check_ints,
                                     convert_arrays, loads)
from shardstream.write.plan import InputTask, Progress, open_input

__all__ = ["iter_gzip", "iter_json_array", "iter_jsonl", "iter_msgpack", "iter_pickle",
           "iter_plain_jsonl"]


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number",
               float: "number", bool: "boolean", type(None): "null"}


def _jtype(obj: Any) -> str:
    return _JSON_TYPES.get(type(obj), type(obj).__name__)


def _where(label: str, lineno: int, pos: int, numbered: bool) -> str:
    """Where a JSON line is, for errors: ``file:line`` (or its byte offset in a split read)."""
    if numbered:
        return f"{label}:{lineno}"
    return f"{label}: line at byte offset {pos} (split read, line number unknown)"


def iter_jsonl(lines: Iterable[bytes], label: str, pos: int, stop: int | None,
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
                obj, slow = loads(text)
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
                        check_ints(obj)
                    if auto:
                        arrays_in(obj)
                except BadValue as bad:
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


def iter_plain_jsonl(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    with open_input(task.path) as f:
        pos = 0
        if task.start > 0:  # skip the line begun in the previous range
            f.seek(task.start - 1)
            pos = task.start - 1 + len(f.readline())
        yield from iter_jsonl(f, task.path, pos, task.stop, task.start == 0, arrays,
                              progress)


def iter_gzip(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    try:
        with gzip.open(task.path, "rb") as f:
            raw = f.fileobj  # the compressed file: progress counts the bytes read from disk
            yield from iter_jsonl(f, task.path, 0, None, True, arrays, progress, raw.tell)
    except FileNotFoundError:
        raise InputError(f"input file not found: {task.path}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{task.path}: damaged gzip stream: {exc}") from exc


def iter_json_array(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    """A JSON array of objects; the whole document is loaded into memory."""
    with open_input(task.path) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{task.path}: invalid JSON: {exc}") from None
    if progress is not None:
        progress(len(raw))
    slow = DIGIT_RUN in raw.translate(DIGITS)  # json keeps big ints exact: check them
    del raw
    if not isinstance(data, list):
        raise InputError(f"{task.path}: expected a JSON array of objects, got {_jtype(data)}")
    for i, item in enumerate(data):
        if type(item) is not dict:
            raise InputError(f"{task.path}: element [{i}] of the array is {_jtype(item)}, "
                             "expected an object")
        yield convert_arrays(item, arrays, slow, lambda: f"{task.path}: element [{i}]")


def iter_msgpack(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    import msgpack

    with open_input(task.path) as f:
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
            yield convert_arrays(item, arrays, False,
                                 lambda: f"{task.path}: msgpack item {i} (byte offset {pos})")
            i += 1


def iter_pickle(task: InputTask, arrays: str, progress: Progress | None) -> Iterator[dict]:
    with open_input(task.path) as f:
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
        yield convert_arrays(item, arrays, True, lambda: f"{task.path}: element [{i}]")
