"""Input files: detect each one's kind, measure it, and cut the work into tasks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

from shardstream.errors import InputError
from shardstream.write.arrow import open_ipc, require_pyarrow

__all__ = ["InputTask", "detect_kind", "plan_tasks", "group_tasks", "estimate_total",
           "task_bytes", "KINDS", "open_input", "parquet_groups", "pyarrow_parquet",
           "arrow_batches", "hf_files"]


Progress = Callable[[int], None]  # bytes of the input consumed since the last call

#: ``arrow``: an Arrow IPC file; ``hf``: a Hugging Face ``save_to_disk`` folder (planned as
#: the ``arrow`` tasks of its files)
KINDS = ("jsonl", "jsonl.gz", "json", "msgpack", "parquet", "arrow", "hf", "pickle", "stdin")
_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz",
    ".json": "json", ".msgpack": "msgpack", ".mp": "msgpack", ".mpk": "msgpack",
    ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".arrows": "arrow",
    ".feather": "arrow", ".ipc": "arrow", ".pkl": "pickle", ".pickle": "pickle",
}
_BATCHED = ("parquet", "arrow")  # split by row groups / record batches


@dataclass(frozen=True)
class InputTask:
    """A contiguous, independently readable slice of one input.

    JSONL: byte range ``[start, stop)``; Parquet: row groups ``[start, stop)``; Arrow:
    record batches ``[start, stop)``; otherwise the whole file (``start=0, stop=None``).
    ``stop=None`` means "to the end".
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
    """Return the kind of input ``path`` (one of :data:`KINDS`) from its extension; a
    directory must be a Hugging Face ``save_to_disk`` folder (``hf``)."""
    if path == "-":
        return "stdin"
    if os.path.isdir(path):
        hf_files(path)  # checked now: a DatasetDict or any other folder is an error
        return "hf"
    name = os.path.basename(path).lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            kind = _EXTENSIONS[ext]
            break
    else:
        raise InputError(f"cannot tell the kind of input file {path}: supported are "
                         + ", ".join(sorted(_EXTENSIONS)) + ", a Hugging Face save_to_disk "
                         "folder and '-' for JSONL on stdin")
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


def _hf_splits(path: str) -> list[str]:
    try:
        with open(os.path.join(path, "dataset_dict.json"), "rb") as f:
            splits = json.load(f)["splits"]
        if isinstance(splits, list) and splits and all(isinstance(x, str) for x in splits):
            return splits
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def hf_files(path: str) -> list[str]:
    """The Arrow files of a Hugging Face ``save_to_disk`` folder (``state.json`` and
    ``dataset_info.json`` beside them), in order; anything else is an :class:`InputError`."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = _hf_splits(path) or ["SPLIT"]
        raise InputError(f"{path} is a Hugging Face DatasetDict with the splits "
                         f"{', '.join(splits)}: pass one split's folder, e.g. "
                         f"{os.path.join(path, splits[0])}")
    state = os.path.join(path, "state.json")
    if not (os.path.isfile(state) and os.path.isfile(os.path.join(path, "dataset_info.json"))):
        raise InputError(f"input path is a directory, not a Hugging Face save_to_disk folder "
                         f"(it has no state.json and dataset_info.json): {path}; pass the "
                         "input files in it instead")
    try:
        with open(state, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{state}: cannot read it ({exc}); save the dataset again with "
                         "save_to_disk") from None
    files = doc.get("_data_files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise InputError(f'{state}: no "_data_files" list of {{"filename": ...}} entries; is '
                         "it a save_to_disk folder? Save the dataset again with save_to_disk")
    out = []
    for entry in files:
        name = entry["filename"]
        full = os.path.join(path, name)
        if name in ("", ".", "..") or os.path.basename(name) != name:
            raise InputError(f"{state}: data file {name!r} is not a file name inside {path}")
        if not os.path.isfile(full):
            raise InputError(f"{state} lists {name}, which is missing: the folder is "
                             "incomplete; save the dataset again with save_to_disk")
        out.append(full)
    return out


@lru_cache(maxsize=256)
def _ipc_batches(path: str, _mtime: int, size: int) -> tuple[tuple[int, int], ...]:
    """(rows, bytes) per record batch; the bytes, pro rata of the batches' buffers,
    add up to the file size."""
    pa = require_pyarrow("Arrow IPC files")
    with open_ipc(path) as reader:
        rows, bufs = [], []
        try:
            if hasattr(reader, "get_batch"):
                batches: Iterable[Any] = (reader.get_batch(i)
                                          for i in range(reader.num_record_batches))
            else:
                batches = reader
            for b in batches:
                rows.append(b.num_rows)
                bufs.append(b.get_total_buffer_size())
        except pa.ArrowException as exc:
            raise InputError(f"{path}: record batch {len(rows)} cannot be read ({exc}); the "
                             "file is truncated or corrupt: write it again") from None
    weights = bufs if sum(bufs) else [1] * len(bufs)
    total, acc, cum = max(sum(weights), 1), 0, [0]
    for w in weights:
        acc += w
        cum.append(size * acc // total)
    return tuple((r, cum[i + 1] - cum[i]) for i, r in enumerate(rows))


def arrow_batches(path: str) -> tuple[tuple[int, int], ...]:
    """(rows, bytes) per record batch of an Arrow IPC file (read once, then cached)."""
    st = _stat(path)
    return _ipc_batches(path, st.st_mtime_ns, st.st_size)


def _units(task: InputTask) -> tuple[tuple[int, int], ...]:
    """(rows, bytes) per row group / record batch of a Parquet / Arrow file."""
    return (parquet_groups if task.kind == "parquet" else arrow_batches)(task.path)


def task_bytes(task: InputTask) -> int:
    """Estimated bytes the task reads (on disk; 0 for stdin), for progress and balancing."""
    if task.kind == "stdin":
        return 0
    if task.kind in _BATCHED:
        return sum(b for _, b in _units(task)[task.start:task.stop])
    if task.kind == "hf":
        return sum(task_bytes(InputTask(p, "arrow")) for p in hf_files(task.path))
    size = _stat(task.path).st_size
    return max(0, (size if task.stop is None else min(task.stop, size)) - task.start)


def estimate_total(tasks: Iterable[InputTask]) -> int | None:
    """Total rows if known from metadata alone (Parquet, Arrow), else ``None``."""
    total = 0
    for t in tasks:
        if t.kind not in _BATCHED:
            return None
        total += sum(r for r, _ in _units(t)[t.start:t.stop])
    return total


def plan_tasks(paths: list[str], parts: int) -> list[InputTask]:
    """Split ``paths`` into tasks, in input order, cut where ``parts`` equal groups meet.

    Every path is checked first (missing file or unknown kind -> :class:`InputError`);
    a Hugging Face folder becomes its Arrow files. With ``parts <= 1`` each input is one
    unsplit task (exact line numbers in errors).
    """
    whole = []
    for p in paths:
        kind = detect_kind(p)
        whole += [InputTask(f, "arrow") for f in hf_files(p)] if kind == "hf" else \
            [InputTask(p, kind)]
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
        elif t.kind in _BATCHED and inside:
            cum = [0]
            for _, nb in _units(t):
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
