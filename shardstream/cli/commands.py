"""Command line: ``shardstream-write`` and ``shardstream {write,info,verify,index,cat,convert}``.

A thin layer: parse, call the library, print ``ErrorType: message`` for
shardstream errors. Exit codes: 0 ok, 1 data or storage error, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

from shardstream import __version__
from shardstream.cli.args import (add_storage_arg, add_write_args, compression_arg, out, parse_size,
                                  positive_int, storage_options)
from shardstream.cli.text import escape_json
from shardstream.cli.write import cmd_write
from shardstream.errors import ShardstreamError, StorageError

__all__ = ["main", "write_main"]


_DESCRIPTION = ("Pack files of dicts into shardstream shards (write, or the shardstream-write "
                "command), and inspect, check, index, print or convert datasets.")
_EPILOG = "Exit codes: 0 ok, 1 data or storage error, 2 usage error."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardstream", description=_DESCRIPTION, epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"shardstream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_write_args(sub.add_parser("write", help="pack input files into shards"))
    info = sub.add_parser("info", help="counts, sizes and schema of a dataset")
    info.add_argument("dataset")
    info.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    add_storage_arg(info)
    ver = sub.add_parser("verify", help="recompute checksums and decode every sample")
    ver.add_argument("dataset")
    ver.add_argument("--no-decode", action="store_true", help="checksums and structure only")
    ver.add_argument("-q", "--quiet", action="store_true")
    add_storage_arg(ver)
    idx = sub.add_parser("index", help="build indexes + manifest for existing tar shards")
    idx.add_argument("shards", nargs="+", help="tar files (webdataset or shardstream)")
    idx.add_argument("-o", "--output", default=None,
                     help="where manifest.json goes (default: the shards' directory)")
    idx.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    cat = sub.add_parser("cat", help="print samples as JSON lines")
    cat.add_argument("dataset")
    cat.add_argument("--limit", type=positive_int, default=None)
    cat.add_argument("--key", default=None, help="only the sample with this key")
    cat.add_argument("--index", type=int, default=None, help="only the sample at this position")
    cat.add_argument("--full", action="store_true", help="print arrays and bytes in full")
    conv = sub.add_parser("convert", help="rewrite a dataset with or without compression")
    conv.add_argument("dataset", help="the (local) dataset to read")
    conv.add_argument("output", help="new dataset directory or URL")
    conv.add_argument("--compress", type=compression_arg, required=True, metavar="CODEC[:LEVEL]",
                      help="zstd, zstd:LEVEL, or none to store blocks uncompressed")
    conv.add_argument("--max-size", type=parse_size, default="256MiB",
                      help="bytes per shard (default: 256MiB)")
    conv.add_argument("--block-size", type=parse_size, default=None,
                      help="uncompressed block size (default: the source's)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output")
    conv.add_argument("--no-fsync", action="store_true", help="skip fsync")
    conv.add_argument("-q", "--quiet", action="store_true")
    add_storage_arg(conv)
    return p


def _run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return fn(args)
    except (ShardstreamError, LookupError, ValueError, NotImplementedError) as exc:
        out(f"{type(exc).__name__}: {str(exc).strip(chr(39))}", err=True)
        return 1
    except OSError as exc:  # not translated deeper down: still say what and where
        err = StorageError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        out(f"StorageError: {err}", err=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was published", file=sys.stderr)
        return 130
    except Exception:  # a bug: the traceback, escaped (it may quote crafted data)
        for line in traceback.format_exc().splitlines():
            out(line, err=True)
        out("this is a bug in shardstream: please report it with the traceback above",
            err=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the writer, which drops its staging files


# ---------------------------------------------------------------- info / verify
def _describe(comp: Any) -> str:
    """How ``info`` names a dataset's compression."""
    if comp is None:
        return "none"
    if not comp.framed:
        return (f"{comp.spec()}, one frame per block (format v2: `shardstream convert "
                "--compress zstd` upgrades it)")
    dictionary = f"a {comp.dict_bytes // 1024} KiB dictionary" if comp.dict_bytes else \
        "no dictionary"
    return f"{comp.spec()} in {comp.frame_bytes}-byte frames with {dictionary}"


def _cmd_info(args: argparse.Namespace) -> int:
    from shardstream.read.dataset import open_dataset
    from shardstream.storage.io import load_manifest
    from shardstream.storage.urls import is_remote

    if is_remote(args.dataset):
        root = args.dataset
        m = load_manifest(root, storage_options(args.storage_option))
    else:
        ds = open_dataset(args.dataset)
        root, m = os.path.abspath(ds.root), ds.manifest
    if args.json:
        doc = json.loads(m.to_json())
        doc.pop("shards")
        doc["shards"] = [s.name for s in m.shards]
        print(escape_json(json.dumps(doc, indent=1)))  # DEL is ASCII: ensure_ascii keeps it
        return 0
    sizes = [s.bytes for s in m.shards] or [0]
    out(f"dataset      {root}")
    out(f"format       shardstream v{m.version} ({m.created_by})")
    out(f"samples      {m.num_samples:,}")
    out(f"shards       {len(m.shards)} (bytes min/max {min(sizes):,}/{max(sizes):,})")
    out(f"size         {m.total_bytes / 1e6:,.1f} MB with indexes")
    out(f"key field    {m.key_field}")
    out(f"compression  {_describe(m.compression)}")
    out("schema")
    for path, f in m.schema.items():
        extra = ""
        if "dtypes" in f:
            shape = "?" if f["shape"] is None else \
                "(" + ", ".join("*" if d is None else str(d) for d in f["shape"]) + ")"
            extra = f" {'|'.join(f['dtypes'])} {shape}"
        out(f"  {path:<24} {'|'.join(f['types'])}{extra}  in {f['count']:,} samples")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from shardstream.read.verify import verify
    from shardstream.storage.download import fetch_to_cache
    from shardstream.storage.urls import is_remote

    start = time.perf_counter()
    if is_remote(args.dataset):  # download into a temporary directory, check that
        with tempfile.TemporaryDirectory(prefix="shardstream-verify-") as tmp:
            local = fetch_to_cache(args.dataset, tmp, None, storage_options(args.storage_option))
            report = verify(local, decode=not args.no_decode)
    else:
        report = verify(args.dataset, decode=not args.no_decode)
    for p in report.problems:
        out(f"BAD {p}", err=True)
    if report.problems:
        out(f"verify: {len(report.problems)} of {report.shards} shards have problems", err=True)
        return 1
    if not args.quiet:
        out(f"OK: {report.shards} shards, {report.samples:,} samples, "
             f"{report.bytes / 1e6:,.1f} MB verified in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from shardstream.write.reindex import build_index

    manifest = build_index(args.shards, args.output, overwrite=args.overwrite)
    out(f"indexed {len(manifest.shards)} shards, {manifest.num_samples:,} samples")
    return 0


def _cmd_cat(args: argparse.Namespace) -> int:
    from shardstream.cli.inspect import cat_lines

    for line in cat_lines(args.dataset, limit=args.limit, key=args.key, index=args.index,
                          full=args.full):
        print(line)  # escaped by cat_lines
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from shardstream.write.convert import convert

    start = time.perf_counter()
    m = convert(args.dataset, args.output, compression=args.compress, max_bytes=args.max_size,
                block_bytes=args.block_size, overwrite=args.overwrite,
                fsync=not args.no_fsync, storage_options=storage_options(args.storage_option))
    if not args.quiet:
        out(f"converted {m.num_samples:,} samples into {args.output}: {len(m.shards)} "
            f"shards, {m.total_bytes / 1e6:,.1f} MB in {time.perf_counter() - start:.1f} s",
            err=True)
    return 0


_COMMANDS = {"write": cmd_write, "info": _cmd_info, "verify": _cmd_verify,
             "index": _cmd_index, "cat": _cmd_cat, "convert": _cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
    """``shardstream COMMAND ...``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _run(_COMMANDS[args.command], args)
    except BrokenPipeError:  # `shardstream cat | head`
        sys.stderr.close()
        return 0


def write_main(argv: Sequence[str] | None = None) -> int:
    """``shardstream-write INPUT... -o OUT``: the same as ``shardstream write``."""
    p = argparse.ArgumentParser(prog="shardstream-write",
                                description="Pack input files of dicts into shardstream shards "
                                            "(the same as shardstream write).", epilog=_EPILOG)
    add_write_args(p)
    return _run(cmd_write, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
