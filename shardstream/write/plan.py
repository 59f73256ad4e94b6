"""Input files: detect each one's kind, measure it, and cut the work into tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

from shardstream.errors import InputError

__all__ = ["InputTask", "detect_kind", "plan_tasks", "group_tasks", "estimate_total",
           "task_bytes", "KINDS", "open_input", "parquet_groups", "pyarrow_parquet"]


Progress = Callable[[int], None]  # bytes of the input consumed since the last call

KINDS = ("jsonl", "jsonl.gz", "json", "msgpack", "parquet", "pickle", "stdin")
_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz",
    ".json": "json", ".msgpack": "msgpack", ".mp": "msgpack", ".mpk": "msgpack",
    ".parquet": "parquet", ".pq": "parquet", ".pkl": "pickle", ".pickle": "pickle",
}


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
    pq = pyarrow_parquet()
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from exc
    groups = (meta.row_group(i) for i in range(meta.num_row_groups))
    return tuple((rg.num_rows, sum(rg.column(j).total_compressed_size for j in range(rg.num_columns)))
                 for rg in groups)


def parquet_groups(path: str) -> tuple[tuple[int, int], ...]:
    st = _stat(path)
    return _row_groups(path, st.st_mtime_ns, st.st_size)


def task_bytes(task: InputTask) -> int:
    """Estimated bytes the task reads (on disk; 0 for stdin), for progress and balancing."""
    if task.kind == "stdin":
        return 0
    if task.kind == "parquet":
        return sum(b for _, b in parquet_groups(task.path)[task.start:task.stop])
    size = _stat(task.path).st_size
    return max(0, (size if task.stop is None else min(task.stop, size)) - task.start)


def estimate_total(tasks: Iterable[InputTask]) -> int | None:
    """Total rows if known from metadata alone (Parquet only), else ``None``."""
    total = 0
    for t in tasks:
        if t.kind != "parquet":
            return None
        total += sum(r for r, _ in parquet_groups(t.path)[t.start:t.stop])
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
            for _, nb in parquet_groups(t.path):
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


def pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: pip install 'shardstream[parquet]'") from None
    return pq


def open_input(path: str) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
