"""``shardstream-write``: pack input files into a dataset, with a progress line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import chain
from typing import Any, Callable, Iterator

from shardstream.cli.args import out, storage_options

__all__ = ["cmd_write"]


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


def cmd_write(args: argparse.Namespace) -> int:
    from shardstream.storage.io import load_manifest
    from shardstream.write.arrow_encode import EncodedRows
    from shardstream.write.inputs import iter_task
    from shardstream.write.parallel import run_workers
    from shardstream.write.plan import group_tasks, plan_tasks, task_bytes
    from shardstream.write.writer import ShardWriter

    tasks = plan_tasks(args.inputs, args.workers)
    allow, arrays = args.allow_pickle, args.arrays
    groups = [g for g in group_tasks(tasks, args.workers) if g]
    stdin = any(t.kind == "stdin" for t in tasks)
    progress = _Progress(not args.quiet and args.engine == "local",
                         None if stdin else sum(map(task_bytes, tasks)), len(groups))

    # Parquet/Arrow batches come encoded already where their column types allow
    encode = args.compress is None

    def slice_of(group: list, slot: int = 0) -> Callable[[], Iterator[Any]]:
        read = progress.reader(slot)
        return lambda: chain.from_iterable(iter_task(
            t, allow_pickle=allow, arrays=arrays, progress=read, encode=encode,
            key_field=args.key_field) for t in group)

    common = dict(prefix=args.prefix, overwrite=args.overwrite, append=args.append,
                  key_field=args.key_field, storage_options=storage_options(args.storage_option))
    sink = dict(max_samples=args.max_samples, max_bytes=args.max_size,
                block_bytes=args.block_size, fsync=not args.no_fsync,
                compression=args.compress)
    start = time.perf_counter()
    try:
        if args.engine == "ray":
            from shardstream.integrations.ray import write_inputs_with_ray

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
            told = 0
            with ShardWriter(args.output, **common, **sink) as w:
                for sample in slice_of(tasks)():
                    if type(sample) is EncodedRows:
                        w.write_rows(sample)
                    else:
                        w.write(sample)
                    if w.num_samples - told >= 256:
                        progress(w.num_samples - told, 0)
                        told = w.num_samples
            progress(w.num_samples - told, 0)
            manifest = w.close()
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    if not args.quiet:
        n, mb = progress.samples, manifest.total_bytes / 1e6
        out(f"wrote {n:,} samples to {args.output} in {seconds:.1f} s "
            f"({n / max(seconds, 1e-9):,.0f} samples/s); the dataset now holds "
            f"{manifest.num_samples:,} samples in {len(manifest.shards)} shards, {mb:,.1f} MB",
            err=True)
    return 0
