"""Command line: ``shardstream-write`` and ``shardstream {write,info,verify,index,cat,convert}``.

A thin layer: parse, call the library, print ``ErrorType: message`` for
shardstream errors. Exit codes: 0 ok, 1 data or storage error, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from itertools import chain
from typing import Any, Callable, Iterator, Sequence

from . import __version__
from .errors import ShardstreamError, StorageError
from .inputs import ARRAYS
from .text import escape, escape_json

__all__ = ["main", "write_main", "parse_size"]

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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _compress(text: str) -> Any:
    """``zstd``, ``zstd:19`` or ``none`` -> a Compression (or None)."""
    from .compression import parse_compression

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


def _options(pairs: list[tuple[str, Any]] | None) -> dict[str, Any] | None:
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


def _add_storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", dest="storage_option", action="append",
                   type=_storage_option, metavar="KEY=VALUE",
                   help="fsspec option for s3:// / gs:// / http(s):// URLs, repeatable "
                        "(endpoint_url=http://host:9000, anon=true, "
                        "client_kwargs.region_name=eu-west-1)")


def _add_write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="JSONL (.jsonl, .jsonl.gz), JSON array, msgpack stream, Parquet, "
                        "pickle (with --allow-pickle), or - for JSONL on stdin")
    p.add_argument("-o", "--output", required=True,
                   help="output dataset directory or URL (s3://bucket/prefix, gs://...)")
    p.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    p.add_argument("--max-samples", type=_positive, default=None, help="samples per shard")
    p.add_argument("--max-size", type=parse_size, default="256MiB",
                   help="bytes per shard on disk, e.g. 256MB, 1GiB (default: 256MiB)")
    p.add_argument("--block-size", type=parse_size, default="64KiB",
                   help="target size of a block of small samples (default: 64KiB)")
    p.add_argument("--workers", type=_positive, default=1, help="packing processes")
    p.add_argument("--compress", type=_compress, default=None, metavar="CODEC[:LEVEL]",
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
    _add_storage_arg(p)


_DESCRIPTION = ("Pack files of dicts into shardstream shards (write, or the shardstream-write "
                "command), and inspect, check, index, print or convert datasets.")
_EPILOG = "Exit codes: 0 ok, 1 data or storage error, 2 usage error."


def _out(line: str = "", *, err: bool = False) -> None:
    """Print one line of text, data-derived parts escaped (see :mod:`shardstream.text`)."""
    print(escape(line), file=sys.stderr if err else sys.stdout)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardstream", description=_DESCRIPTION, epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"shardstream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_write_args(sub.add_parser("write", help="pack input files into shards"))
    info = sub.add_parser("info", help="counts, sizes and schema of a dataset")
    info.add_argument("dataset")
    info.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    _add_storage_arg(info)
    ver = sub.add_parser("verify", help="recompute checksums and decode every sample")
    ver.add_argument("dataset")
    ver.add_argument("--no-decode", action="store_true", help="checksums and structure only")
    ver.add_argument("-q", "--quiet", action="store_true")
    _add_storage_arg(ver)
    idx = sub.add_parser("index", help="build indexes + manifest for existing tar shards")
    idx.add_argument("shards", nargs="+", help="tar files (webdataset or shardstream)")
    idx.add_argument("-o", "--output", default=None,
                     help="where manifest.json goes (default: the shards' directory)")
    idx.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    cat = sub.add_parser("cat", help="print samples as JSON lines")
    cat.add_argument("dataset")
    cat.add_argument("--limit", type=_positive, default=None)
    cat.add_argument("--key", default=None, help="only the sample with this key")
    cat.add_argument("--index", type=int, default=None, help="only the sample at this position")
    cat.add_argument("--full", action="store_true", help="print arrays and bytes in full")
    conv = sub.add_parser("convert", help="rewrite a dataset with or without compression")
    conv.add_argument("dataset", help="the (local) dataset to read")
    conv.add_argument("output", help="new dataset directory or URL")
    conv.add_argument("--compress", type=_compress, required=True, metavar="CODEC[:LEVEL]",
                      help="zstd, zstd:LEVEL, or none to store blocks uncompressed")
    conv.add_argument("--max-size", type=parse_size, default="256MiB",
                      help="bytes per shard (default: 256MiB)")
    conv.add_argument("--block-size", type=parse_size, default=None,
                      help="uncompressed block size (default: the source's)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output")
    conv.add_argument("--no-fsync", action="store_true", help="skip fsync")
    conv.add_argument("-q", "--quiet", action="store_true")
    _add_storage_arg(conv)
    return p


def _run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return fn(args)
    except (ShardstreamError, LookupError, ValueError, NotImplementedError) as exc:
        _out(f"{type(exc).__name__}: {str(exc).strip(chr(39))}", err=True)
        return 1
    except OSError as exc:  # not translated deeper down: still say what and where
        err = StorageError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        _out(f"StorageError: {err}", err=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was published", file=sys.stderr)
        return 130
    except Exception:  # a bug: the traceback, escaped (it may quote crafted data)
        for line in traceback.format_exc().splitlines():
            _out(line, err=True)
        _out("this is a bug in shardstream: please report it with the traceback above",
             err=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the writer, which drops its staging files


# ---------------------------------------------------------------- write
class _Progress:
    """tqdm bar on a TTY, silent otherwise.

    With a known input size (files, not stdin) the bar counts input bytes read
    (MB/s; compressed bytes for .gz) and shows the samples written as its postfix;
    readers add to one shared counter per worker slot (``reader(slot)``), which
    forked worker processes inherit. Otherwise it counts samples.
    """

    def __init__(self, enabled: bool, total_bytes: int | None, slots: int = 1) -> None:
        self.samples = 0
        self.bar = None
        self.read: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            if total_bytes is None:
                self.bar = tqdm(unit=" samples", unit_scale=True, dynamic_ncols=True,
                                file=sys.stderr)
            else:
                import multiprocessing as mp

                self.read = mp.get_context("fork" if "fork" in mp.get_all_start_methods()
                                           else "spawn").Array("q", max(1, slots), lock=False)
                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True,
                                unit_divisor=1000, dynamic_ncols=True, file=sys.stderr)

    def reader(self, slot: int) -> Callable[[int], None] | None:
        """The ``progress`` callback for the input readers of worker ``slot`` (or None)."""
        read = self.read
        if read is None:
            return None

        def add(nbytes: int) -> None:
            read[slot] += nbytes
        return add

    def __call__(self, samples: int, nbytes: int) -> None:
        self.samples += samples
        if self.bar is None:
            return
        if self.read is None:
            self.bar.update(samples)
            return
        self.bar.set_postfix_str(f"{self.samples:,} samples", refresh=False)
        self.bar.update(sum(self.read) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_write(args: argparse.Namespace) -> int:
    from .inputs import group_tasks, iter_task, plan_tasks, task_bytes
    from .manifest import load_manifest
    from .parallel import run_workers
    from .writer import ShardWriter

    tasks = plan_tasks(args.inputs, args.workers)
    allow, arrays = args.allow_pickle, args.arrays
    groups = [g for g in group_tasks(tasks, args.workers) if g]
    stdin = any(t.kind == "stdin" for t in tasks)
    progress = _Progress(not args.quiet and args.engine == "local",
                         None if stdin else sum(map(task_bytes, tasks)), len(groups))

    def slice_of(group: list, slot: int = 0) -> Callable[[], Iterator[dict]]:
        read = progress.reader(slot)
        return lambda: chain.from_iterable(iter_task(t, allow_pickle=allow, arrays=arrays,
                                                     progress=read) for t in group)

    common = dict(prefix=args.prefix, overwrite=args.overwrite, append=args.append,
                  key_field=args.key_field, storage_options=_options(args.storage_option))
    sink = dict(max_samples=args.max_samples, max_bytes=args.max_size,
                block_bytes=args.block_size, fsync=not args.no_fsync,
                compression=args.compress)
    start = time.perf_counter()
    try:
        if args.engine == "ray":
            from .integrations.ray import write_inputs_with_ray

            if common.pop("storage_options"):
                raise ValueError("--engine ray writes to a shared filesystem path; "
                                 "--storage-option is for the local engine")
            if arrays != "auto":
                raise ValueError(f"--arrays {arrays} is not supported with --engine ray yet "
                                 "(its tasks read with the default, auto); use the local "
                                 "engine (--workers N)")
            before = 0
            if args.append and os.path.exists(os.path.join(args.output, "manifest.json")):
                before = load_manifest(args.output).num_samples
            manifest = write_inputs_with_ray(
                args.inputs, args.output, address=args.address, allow_pickle=allow,
                parts=args.workers if args.workers > 1 else None, **common, **sink)
            progress.samples = manifest.num_samples - before
        elif args.workers > 1 and len(groups) > 1 and not stdin:
            manifest = run_workers(args.output, [slice_of(g, i) for i, g in enumerate(groups)],
                                   progress=progress, **common, **sink)
        else:
            with ShardWriter(args.output, **common, **sink) as w:
                for sample in slice_of(tasks)():
                    w.write(sample)
                    if w.num_samples & 255 == 0:
                        progress(256, 0)
            progress(w.num_samples & 255, 0)
            manifest = w.close()
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    if not args.quiet:
        n, mb = progress.samples, manifest.total_bytes / 1e6
        _out(f"wrote {n:,} samples to {args.output} in {seconds:.1f} s "
             f"({n / max(seconds, 1e-9):,.0f} samples/s); the dataset now holds "
             f"{manifest.num_samples:,} samples in {len(manifest.shards)} shards, {mb:,.1f} MB",
             err=True)
    return 0


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
    from .manifest import load_manifest
    from .shard import open_dataset
    from .storage import is_remote

    if is_remote(args.dataset):
        root = args.dataset
        m = load_manifest(root, _options(args.storage_option))
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
    _out(f"dataset      {root}")
    _out(f"format       shardstream v{m.version} ({m.created_by})")
    _out(f"samples      {m.num_samples:,}")
    _out(f"shards       {len(m.shards)} (bytes min/max {min(sizes):,}/{max(sizes):,})")
    _out(f"size         {m.total_bytes / 1e6:,.1f} MB with indexes")
    _out(f"key field    {m.key_field}")
    _out(f"compression  {_describe(m.compression)}")
    _out("schema")
    for path, f in m.schema.items():
        extra = ""
        if "dtypes" in f:
            shape = "?" if f["shape"] is None else \
                "(" + ", ".join("*" if d is None else str(d) for d in f["shape"]) + ")"
            extra = f" {'|'.join(f['dtypes'])} {shape}"
        _out(f"  {path:<24} {'|'.join(f['types'])}{extra}  in {f['count']:,} samples")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .storage import fetch_to_cache, is_remote
    from .verify import verify

    start = time.perf_counter()
    if is_remote(args.dataset):  # download into a temporary directory, check that
        with tempfile.TemporaryDirectory(prefix="shardstream-verify-") as tmp:
            local = fetch_to_cache(args.dataset, tmp, None, _options(args.storage_option))
            report = verify(local, decode=not args.no_decode)
    else:
        report = verify(args.dataset, decode=not args.no_decode)
    for p in report.problems:
        _out(f"BAD {p}", err=True)
    if report.problems:
        _out(f"verify: {len(report.problems)} of {report.shards} shards have problems", err=True)
        return 1
    if not args.quiet:
        _out(f"OK: {report.shards} shards, {report.samples:,} samples, "
              f"{report.bytes / 1e6:,.1f} MB verified in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .wdsindex import build_index

    manifest = build_index(args.shards, args.output, overwrite=args.overwrite)
    _out(f"indexed {len(manifest.shards)} shards, {manifest.num_samples:,} samples")
    return 0


def _cmd_cat(args: argparse.Namespace) -> int:
    from .inspect import cat_lines

    for line in cat_lines(args.dataset, limit=args.limit, key=args.key, index=args.index,
                          full=args.full):
        print(line)  # escaped by cat_lines
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    start = time.perf_counter()
    m = convert(args.dataset, args.output, compression=args.compress, max_bytes=args.max_size,
                block_bytes=args.block_size, overwrite=args.overwrite,
                fsync=not args.no_fsync, storage_options=_options(args.storage_option))
    if not args.quiet:
        _out(f"converted {m.num_samples:,} samples into {args.output}: {len(m.shards)} "
             f"shards, {m.total_bytes / 1e6:,.1f} MB in {time.perf_counter() - start:.1f} s",
             err=True)
    return 0


_COMMANDS = {"write": _cmd_write, "info": _cmd_info, "verify": _cmd_verify,
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
    _add_write_args(p)
    return _run(_cmd_write, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
