"""``shardstream cat``: samples as JSON lines, for eyes, ``jq`` and ``head``.

Each line is one sample: ``{"__index__": i, "__key__": key, field: value, ...}``.
By default numpy arrays print as ``{"dtype": ..., "shape": [...]}`` and bytes
as ``{"bytes": n}``; ``full=True`` prints arrays as nested lists and bytes as
``{"base64": ...}``. Non-finite floats print as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` so every line stays valid JSON. Control, bidi and other
invisible characters (DEL, C1, U+202E, ...) are written as ``\\uXXXX`` escapes
(:func:`shardstream.cli.text.escape_json`): a line is safe to print on a terminal
and parses back to the same strings.
"""

from __future__ import annotations

import base64
import json
import math
import os
from typing import Any, Iterator

import numpy as np

from shardstream.cli.text import escape_json
from shardstream.pytorch.random_access import ShardDataset

__all__ = ["cat_lines", "to_jsonable", "sample_key"]


def to_jsonable(value: Any, *, full: bool = False) -> Any:
    """A JSON-ready copy of a decoded value (arrays and bytes summarised unless ``full``)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, full=full) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, full=full) for v in value]
    if isinstance(value, np.ndarray):
        if full:
            return to_jsonable(value.tolist(), full=True)
        return {"dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        if full:
            return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
        return {"bytes": len(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, complex):
        return [to_jsonable(value.real), to_jsonable(value.imag)]
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), full=full)
    return value


def sample_key(sample: dict, i: int, key_field: str = "__key__") -> str:
    """The key a sample is found by: its key field, else the global ordinal ``%09d``."""
    k = sample.get(key_field, sample.get("__key__"))
    return f"{i:09d}" if k is None else str(k)


def _line(ds: ShardDataset, i: int, full: bool) -> str:
    sample = ds[i]
    head = {"__index__": i, "__key__": sample_key(sample, i, ds.key_field)}
    body = {k: v for k, v in sample.items() if k != "__key__"}
    return escape_json(json.dumps({**head, **to_jsonable(body, full=full)}, ensure_ascii=False))


def cat_lines(source: str | os.PathLike | ShardDataset, *, limit: int | None = None,
              key: str | None = None, index: int | None = None,
              full: bool = False) -> Iterator[str]:
    """Yield samples of a dataset as JSON lines (no trailing newline).

    ``index``: only the sample at that position (negative counts from the end;
    ``IndexError`` if out of range). ``key``: every sample whose key equals it
    (``KeyError`` if none). ``limit``: at most that many lines.
    """
    if index is not None and key is not None:
        raise ValueError("pass index or key, not both")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    ds = source if isinstance(source, ShardDataset) else ShardDataset(source)
    if index is not None:
        n = len(ds)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range: the dataset holds {n} samples")
        yield _line(ds, index % n, full)
        return
    emitted = 0
    for i in range(len(ds)):
        if limit is not None and emitted >= limit:
            return
        if key is not None and sample_key(ds[i], i, ds.key_field) != key:
            continue
        yield _line(ds, i, full)
        emitted += 1
    if key is not None and not emitted:
        raise KeyError(f"no sample has key {key!r}")
