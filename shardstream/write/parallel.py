"""write_shards: pack samples with several worker processes, one manifest.

Each worker writes its own contiguous slice of the input into its own
staging folder; the parent then publishes every worker's shards in input
order and writes one merged manifest, last. Sequences are split by index
range (the children inherit them through ``fork``, nothing is pickled);
other iterables are read by the parent in chunks that the workers encode.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import shutil
import traceback
from collections.abc import Sequence
from functools import partial
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from shardstream.format.compression import Compression, parse_compression
from shardstream.format.encode import encode_sample
from shardstream.format.manifest import Manifest
from shardstream.format.schema import SchemaBuilder
from shardstream.write.arrow_encode import EncodedRows
from shardstream.write.output import make_staging, prepare_output
from shardstream.write.parquet import arrow_source
from shardstream.write.publish import publish
from shardstream.write.sink import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_BYTES, ShardSink, sample_key
from shardstream.write.writer import ShardWriter

__all__ = ["write_shards", "run_workers"]


ProgressFn = Callable[[int, int], None]  # (samples, bytes) since the last call


def _context() -> mp.context.BaseContext:
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def _worker(rank: int, make_iter: Callable[[], Iterator[dict]], staging: str,
            sink_kw: dict[str, Any], counters: Any, results: Any) -> None:
    """Child process: write one slice; report shards + schema or the error."""
    try:
        sink = ShardSink(staging, **sink_kw)
        done = 0
        for sample in make_iter():
            if type(sample) is EncodedRows:  # a batch encoded already (Arrow inputs)
                sink.write_rows(sample)
            else:
                sink.write(sample)
            if sink.num_samples - done >= 256:
                done = counters[2 * rank] = sink.num_samples
                counters[2 * rank + 1] = sink.bytes_written
        infos = sink.finish()
        counters[2 * rank] = sink.num_samples
        counters[2 * rank + 1] = sink.bytes_written
        results.put((rank, "ok", (infos, sink.schema.to_dict())))
    except BaseException as exc:  # report everything, also KeyboardInterrupt
        try:
            results.put((rank, "error", exc))
        except Exception:  # unpicklable exception
            results.put((rank, "error", RuntimeError("".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)))))


def run_workers(output_dir: str, slices: list[Callable[[], Iterator[dict]]], *,
                prefix: str = "shard", overwrite: bool = False, append: bool = False,
                key_field: str = "__key__", progress: ProgressFn | None = None,
                storage_options: dict[str, Any] | None = None, **sink_kw: Any) -> Manifest:
    """Run one worker process per slice (a zero-argument callable giving dicts).

    The parent holds the output's lock (:func:`~shardstream.write.output.prepare_output`)
    for the whole run; the workers only write into their staging folders. A
    remote ``output_dir`` (``s3://...``): workers stage locally, the parent
    uploads every shard and then the manifest.
    """
    compression = parse_compression(sink_kw.pop("compression", None), sink_kw.pop("level", None))
    sink_kw["compression"] = compression
    target = prepare_output(output_dir, prefix=prefix, overwrite=overwrite, append=append,
                            key_field=key_field, storage_options=storage_options,
                            compression=compression)  # locked until the finally below
    ctx = _context()
    stagings: list[str] = []
    procs: list[Any] = []
    outcome: dict[int, tuple[str, Any]] = {}
    seen = [0, 0]
    try:
        for _ in slices:
            stagings.append(make_staging(output_dir))
        counters = ctx.Array("q", 2 * len(slices), lock=False)
        results = ctx.Queue()
        kw = dict(sink_kw, key_field=key_field)
        procs += [ctx.Process(target=_worker, args=(r, fn, stagings[r], kw, counters, results),
                              daemon=True) for r, fn in enumerate(slices)]
        gc.freeze()  # children would otherwise copy every page the collector touches
        for p in procs:
            p.start()
        gc.unfreeze()
        while len(outcome) < len(procs):
            try:
                rank, status, payload = results.get(timeout=0.2)
                outcome[rank] = (status, payload)
                if status == "error":
                    break
            except Exception:  # queue.Empty: check for dead children
                dead = [r for r, p in enumerate(procs) if r not in outcome
                        and not p.is_alive() and p.exitcode not in (0, None)]
                if dead and results.empty():
                    outcome[dead[0]] = ("error", RuntimeError(
                        f"packing worker {dead[0]} died (exit code {procs[dead[0]].exitcode})"))
                    break
            if progress:
                now = [sum(counters[0::2]), sum(counters[1::2])]
                progress(now[0] - seen[0], now[1] - seen[1])
                seen = now
        errors = [p for s, p in outcome.values() if s == "error"]
        if errors:
            raise errors[0]
        for p in procs:
            p.join()
        staged, schema = [], SchemaBuilder()
        for rank in range(len(procs)):
            infos, part_schema = outcome[rank][1]
            staged += [(stagings[rank], i) for i in infos]
            schema.merge(part_schema)
        if progress:
            progress(sum(counters[0::2]) - seen[0], sum(counters[1::2]) - seen[1])
        return publish(target, staged, schema, key_field=key_field,
                       block_bytes=sink_kw.get("block_bytes", DEFAULT_BLOCK_BYTES),
                       compression=compression)
    finally:
        gc.unfreeze()
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
        for s in stagings:
            shutil.rmtree(s, ignore_errors=True)
        target.release()


def _range_slice(seq: Sequence, lo: int, hi: int) -> Callable[[], Iterator[dict]]:
    return lambda: (seq[i] for i in range(lo, hi))


def write_shards(samples: Iterable[dict], output_dir: str | os.PathLike, *, workers: int = 1,
                 prefix: str = "shard", max_samples: int | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 key_field: str = "__key__", overwrite: bool = False, append: bool = False,
                 fsync: bool = True, chunk_size: int = 1024,
                 progress: ProgressFn | None = None,
                 storage_options: dict[str, Any] | None = None,
                 compression: Compression | str | None = None,
                 level: int | None = None) -> Manifest:
    """Pack ``samples`` into shards in ``output_dir`` with ``workers`` processes.

    A sequence (list, ``torch`` map-style dataset, anything with ``len`` and
    ``[i]``) is split into ``workers`` contiguous ranges; the dataset keeps the
    input order either way. ``output_dir`` may be a URL (``s3://bucket/prefix``;
    ``storage_options`` go to fsspec). ``compression``/``level``: as for
    :class:`ShardWriter`. Returns the manifest written.

    A Hugging Face ``datasets.Dataset`` (no format or transform set) or a
    ``pyarrow.Table`` is read as Arrow batches, its values as ``shardstream-write``
    reads the same data from files (docs/inputs.md: lists of numbers -> numpy arrays
    in the column's dtype), and encoded a batch at a time; pass ``iter(ds)`` to store
    the dicts the dataset gives instead.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = os.fspath(output_dir)
    sink_kw = dict(max_samples=max_samples, max_bytes=max_bytes, block_bytes=block_bytes,
                   fsync=fsync, compression=parse_compression(compression, level))
    source = arrow_source(samples)
    if source is not None:  # compressing sinks narrow integer arrays: give them dicts
        rows = partial(source.items, encode=sink_kw["compression"] is None, key_field=key_field)
        n = len(source)
        if workers > 1 and n >= 2 * workers:
            cuts = [n * w // workers for w in range(workers + 1)]
            return run_workers(out, [partial(rows, cuts[w], cuts[w + 1]) for w in range(workers)],
                               prefix=prefix, overwrite=overwrite, append=append,
                               key_field=key_field, progress=progress,
                               storage_options=storage_options, **sink_kw)
        samples, workers = rows(0, n), 1
    if workers > 1 and isinstance(samples, Sequence) and len(samples) >= 2 * workers:
        n = len(samples)
        cuts = [n * w // workers for w in range(workers + 1)]
        slices = [_range_slice(samples, cuts[w], cuts[w + 1]) for w in range(workers)]
        return run_workers(out, slices, prefix=prefix, overwrite=overwrite, append=append,
                           key_field=key_field, progress=progress,
                           storage_options=storage_options, **sink_kw)
    if workers > 1:
        return _write_encoded(samples, out, workers, chunk_size, prefix, overwrite, append,
                              key_field, progress, dict(sink_kw, storage_options=storage_options))
    told = 0
    with ShardWriter(out, prefix=prefix, overwrite=overwrite, append=append,
                     key_field=key_field, storage_options=storage_options, **sink_kw) as w:
        for sample in samples:
            if type(sample) is EncodedRows:
                w.write_rows(sample)
            else:
                w.write(sample)
            if progress and w.num_samples - told >= 1024:
                progress(w.num_samples - told, 0)
                told = w.num_samples
    if progress:
        progress(w.num_samples - told, 0)
    return w.close()


def _encode_chunk(key_field: str, pack: bool, job: tuple[int, list[dict]]
                  ) -> tuple[list[bytes], dict]:
    first, chunk = job
    schema = SchemaBuilder()
    out = []
    for i, s in enumerate(chunk, first):
        key = sample_key(s, key_field, i)
        if schema.known(s):
            out.append(encode_sample(s, key=key, check=False, pack=pack))
        else:
            out.append(encode_sample(s, key=key, pack=pack))
            schema.observe(s)
    return out, schema.to_dict()


def _chunks(it: Iterable[dict], size: int, first: int) -> Iterator[tuple[int, list[dict]]]:
    it = iter(it)
    while chunk := list(islice(it, size)):
        yield first, chunk
        first += len(chunk)


def _write_encoded(samples: Iterable[dict], out: str, workers: int, chunk_size: int,
                   prefix: str, overwrite: bool, append: bool, key_field: str,
                   progress: ProgressFn | None, sink_kw: dict[str, Any]) -> Manifest:
    """Iterables: children encode chunks, the parent writes them in order."""
    w = ShardWriter(out, prefix=prefix, overwrite=overwrite, append=append,
                    key_field=key_field, **sink_kw)
    try:
        with _context().Pool(workers) as pool:
            jobs = _chunks(samples, chunk_size, w.first_ordinal)
            for encoded, schema in pool.imap(partial(_encode_chunk, key_field, w.packs), jobs):
                w.write_encoded(encoded, schema, packed=w.packs)
                if progress:
                    progress(len(encoded), 0)
            # let the children exit on their own: Pool.terminate() (what leaving the
            # with-block does) can hang joining a child blocked on the task queue's lock
            pool.close()
            pool.join()
        return w.close()
    except BaseException:
        w.abort()
        raise
