"""Argument parsing shared by the commands: sizes, compression, storage options."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from shardstream.cli.text import escape
from shardstream.write.inputs import ARRAYS

__all__ = ["parse_size", "add_storage_arg", "add_write_args", "compression_arg",
           "storage_options", "positive_int", "out"]


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """``"256MB"`` -> 256_000_000, ``"64KiB"`` -> 65536, ``"1e6"`` -> 1_000_000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a number with an optional unit (KB, MB, GB, KiB, MiB, GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def compression_arg(text: str) -> Any:
    """``zstd``, ``zstd:19`` or ``none`` -> a Compression (or None)."""
    from shardstream.format.compression import parse_compression

    try:
        return parse_compression(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _storage_option(text: str) -> tuple[str, Any]:
    """``key=value``; the value is parsed as JSON when it is JSON (true, 3, {...})."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def storage_options(pairs: list[tuple[str, Any]] | None) -> dict[str, Any] | None:
    """``[("client_kwargs.region_name", "x")]`` -> ``{"client_kwargs": {"region_name": "x"}}``."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for key, value in pairs:
        *parents, leaf = key.split(".")
        d = out
        for k in parents:
            d = d.setdefault(k, {})
        d[leaf] = value
    return out


def add_storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", dest="storage_option", action="append",
                   type=_storage_option, metavar="KEY=VALUE",
                   help="fsspec option for s3:// / gs:// / http(s):// URLs, repeatable "
                        "(endpoint_url=http://host:9000, anon=true, "
                        "client_kwargs.region_name=eu-west-1)")


def add_write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="JSONL (.jsonl, .jsonl.gz), JSON array, msgpack stream, Parquet, "
                        "Arrow IPC (.arrow, file or streaming format), a Hugging Face "
                        "save_to_disk folder (one split), pickle (with --allow-pickle), "
                        "or - for JSONL on stdin")
    p.add_argument("-o", "--output", required=True,
                   help="output dataset directory or URL (s3://bucket/prefix, gs://...)")
    p.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    p.add_argument("--max-samples", type=positive_int, default=None, help="samples per shard")
    p.add_argument("--max-size", type=parse_size, default="256MiB",
                   help="bytes per shard on disk, e.g. 256MB, 1GiB (default: 256MiB)")
    p.add_argument("--block-size", type=parse_size, default="64KiB",
                   help="target size of a block of small samples (default: 64KiB)")
    p.add_argument("--workers", type=positive_int, default=1, help="packing processes")
    p.add_argument("--compress", type=compression_arg, default=None, metavar="CODEC[:LEVEL]",
                   help="compress samples in small zstd frames with a trained dictionary "
                        "(random access stays fast): zstd (level 3) or zstd:LEVEL (-7..22); "
                        "default: none")
    p.add_argument("--key-field", default="__key__",
                   help="field holding each sample's key (default: __key__; absent -> ordinal)")
    p.add_argument("--arrays", choices=ARRAYS, default="auto",
                   help="auto (default): lists of numbers or bools become numpy arrays, from "
                        "every input kind (JSONL: int64/float64/bool, Parquet: the column's "
                        "type); never: every list stays a Python list")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    mode.add_argument("--append", action="store_true", help="add shards to an existing dataset")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .pkl inputs (unpickling runs code: only for files you trust)")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync (faster, less durable)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local process pool (default) or a Ray cluster (pip install "
                        "'shardstream[ray]'); with ray, --workers sets the number of tasks")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --engine ray (e.g. auto, ray://head:10001); "
                        "default: start a local Ray runtime")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    add_storage_arg(p)


def out(line: str = "", *, err: bool = False) -> None:
    """Print one line of text, data-derived parts escaped (see :mod:`shardstream.cli.text`)."""
    print(escape(line), file=sys.stderr if err else sys.stdout)
