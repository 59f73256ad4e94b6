"""Pack a Ray Dataset into a shardstream dataset, one staging folder per write task.

>>> import ray, shardstream.integrations.ray as ssray          # doctest: +SKIP
>>> manifest = ssray.write(ray.data.read_parquet("in/"), "out", max_bytes=256 << 20)

Every write task packs its rows into shards and indexes inside its own
``.staging-ray-<job>-<order>-<random>`` folder in the output directory (a
retried attempt gets a fresh folder). The driver then moves the shards of the
successful attempts to their final names in task order, writes
``manifest.json`` last (:func:`shardstream.write.publish.publish`) and removes every
staging folder of the job, so a dataset is complete or has no new manifest.
The driver holds the output's lock (:func:`shardstream.write.output.prepare_output`)
from ``prepare`` until the commit or the failure; the tasks write under it.

The output is a path that the driver and every worker node see (a local disk
on one machine, a shared filesystem on a cluster), or an object-storage URL
(``s3://``, ``gs://``, ``az://``, with ``storage_options``): then each task
stages its shards in a local temporary folder on its node and uploads them
under job- and attempt-unique final names, and the driver PUTs the manifest
last and deletes whatever the job uploaded that it does not list
(:mod:`shardstream.integrations.ray_remote`). Remote outputs are not locked.

Reading a dataset into Ray Data (:func:`read`, :class:`ShardstreamDatasource`,
:func:`arrow_batch`) lives in :mod:`shardstream.integrations.ray_read`, re-exported here.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from itertools import chain
from typing import Any, Iterable, Iterator

try:
    import ray
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink
    from ray.data.extensions import get_arrow_extension_tensor_types
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("shardstream.integrations.ray needs Ray Data: "
                      "pip install 'shardstream[ray]'") from exc

from shardstream.errors import EncodeError, InputError, StorageError
from shardstream.format.compression import Compression, parse_compression
from shardstream.format.manifest import STAGING_PREFIX, Manifest
from shardstream.format.schema import SchemaBuilder
from shardstream.integrations.ray_read import ShardstreamDatasource, arrow_batch, read
from shardstream.integrations.ray_remote import (RemoteJob, StagedPart, check_remote_output,
                                                 ordered_parts)
from shardstream.storage import urls
from shardstream.write.inputs import iter_task
from shardstream.write.output import PreparedOutput, prepare_output
from shardstream.write.plan import InputTask, group_tasks, plan_tasks
from shardstream.write.publish import publish
from shardstream.write.sink import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_BYTES, ShardSink

__all__ = ["ShardstreamDatasink", "write", "write_inputs_with_ray", "block_rows",
           "RAY_STAGING_PREFIX", "ShardstreamDatasource", "read", "arrow_batch"]

RAY_STAGING_PREFIX = STAGING_PREFIX + "ray-"
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def output_location(output: str | os.PathLike) -> str:
    """An object-storage URL as it is; else the absolute local path (``file://`` dropped)."""
    path = os.fspath(output)
    if urls.is_remote(path):
        return check_remote_output(path)
    m = _URL.match(path)
    return os.path.abspath(path[len("file://"):] if m else path)


# ---------------------------------------------------------------- rows
def block_rows(block: Any) -> Iterator[dict]:
    """The rows of a Ray block as plain dicts, equal to ``Dataset.iter_rows()``.

    Arrow blocks are converted a column at a time (about 2.5x faster than
    Ray's row accessor): tensor columns give one ``np.ndarray`` per row,
    other columns Python values (``None`` for null, nested dicts for structs).
    """
    import pyarrow as pa

    if not isinstance(block, pa.Table):
        return (dict(r) for r in BlockAccessor.for_block(block).iter_rows(public_row_format=True))
    names = block.column_names
    if not names:
        return ({} for _ in range(block.num_rows))
    columns = [_column_values(block.column(i)) for i in range(block.num_columns)]
    return (dict(zip(names, values)) for values in zip(*columns))


def _column_values(col: Any) -> list:
    if not isinstance(col.type, get_arrow_extension_tensor_types()):
        return col.to_pylist()
    out: list = []
    for chunk in col.chunks:
        if chunk.null_count:
            out += chunk.to_pylist()
        else:
            out += list(chunk.to_numpy())  # fixed shape: row views; ragged: object array
    return out


# ---------------------------------------------------------------- worker side
def pack_rows(output_dir: str, job: str, order: int, rows: Iterable[dict],
              sink_kw: dict[str, Any], where: str) -> StagedPart:
    """Write ``rows`` into a fresh staging folder; on error nothing is left behind."""
    try:
        staging = tempfile.mkdtemp(prefix=f"{RAY_STAGING_PREFIX}{job}-{order:06d}-",
                                   dir=output_dir)
    except FileNotFoundError:
        raise StorageError(f"{output_dir} does not exist on Ray node {_node()}: on a cluster "
                           "the output must be a shared filesystem path that every node "
                           "mounts at the same place") from None
    except OSError as exc:
        raise StorageError(f"cannot create a staging folder in {output_dir} on Ray node "
                           f"{_node()}: {exc.strerror or exc}", errno=exc.errno) from exc
    sink = ShardSink(staging, **sink_kw)
    try:
        for row in rows:
            sink.write(row)
        infos = sink.finish()
    except EncodeError as exc:
        sink.close_files()
        shutil.rmtree(staging, ignore_errors=True)
        raise EncodeError(f"{where} (samples counted from its first row): {exc}",
                          sample=exc.sample, path=exc.path) from exc
    except BaseException:
        sink.close_files()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StagedPart(order, os.path.basename(staging), tuple(infos), sink.schema.to_dict(),
                      sink.num_samples)


def _node() -> str:
    try:
        return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # outside a Ray worker
        return "?"


# ---------------------------------------------------------------- driver side
def remove_staging(output_dir: str, job: str) -> None:
    """Remove every staging folder of ``job`` (finished, failed or retried attempts)."""
    try:
        entries = os.listdir(output_dir)
    except OSError:
        return
    for e in entries:
        if e.startswith(f"{RAY_STAGING_PREFIX}{job}-"):
            shutil.rmtree(os.path.join(output_dir, e), ignore_errors=True)


def commit(target: PreparedOutput, parts: list[StagedPart], *, key_field: str,
           block_bytes: int, compression: Compression | None = None) -> Manifest:
    """Publish the staged parts in ``order`` and write ``manifest.json`` last.

    ``target``: from :func:`~shardstream.write.output.prepare_output`, whose lock the
    driver holds from ``prepare`` until the job is committed or failed."""
    output_dir = target.output_dir
    parts = ordered_parts(parts)
    schema = SchemaBuilder()
    for p in parts:
        schema.merge(p.schema)
    staged = [(os.path.join(output_dir, p.staging), info) for p in parts for info in p.shards]
    return publish(target, staged, schema, key_field=key_field, block_bytes=block_bytes,
                   compression=compression)


_PREFIX = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")


class ShardstreamDatasink(Datasink):
    """A Ray Data sink writing a shardstream dataset into ``output``.

    >>> ds.write_datasink(ShardstreamDatasink("out", max_bytes=64 << 20))  # doctest: +SKIP

    Takes :class:`~shardstream.ShardWriter`'s options (``storage_options`` for a URL
    output go to every task). The dataset order is
    the write-task order (``ctx.task_idx``), which is the input order when
    ``DataContext.execution_options.preserve_order`` is set (:func:`write` sets
    it). Every task writes at least one shard: with many tiny Ray blocks, set
    ``min_bytes_per_write`` (about ``max_bytes``) or ``min_rows_per_write`` so
    that Ray hands each task more rows. ``manifest`` holds the result.
    """

    def __init__(self, output: str | os.PathLike, *, prefix: str = "shard",
                 max_samples: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, key_field: str = "__key__",
                 overwrite: bool = False, append: bool = False, fsync: bool = True,
                 storage_options: dict[str, Any] | None = None,
                 compression: Compression | str | None = None, level: int | None = None,
                 min_rows_per_write: int | None = None,
                 min_bytes_per_write: int | None = None) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r} must be letters, digits, '_', '.' or '-'")
        if overwrite and append:
            raise ValueError("overwrite and append are mutually exclusive")
        if min_rows_per_write is not None and min_bytes_per_write is not None:
            raise ValueError("set min_rows_per_write or min_bytes_per_write, not both")
        self.output_dir = output_location(output)
        self.storage_options = storage_options
        self.prefix = prefix
        self.key_field = key_field
        self.block_bytes = block_bytes
        self.overwrite = overwrite
        self.append = append
        self.compression = parse_compression(compression, level)
        self._sink_kw = dict(max_samples=max_samples, max_bytes=max_bytes,
                             block_bytes=block_bytes, key_field=key_field, fsync=fsync,
                             compression=self.compression)
        ShardSink(self.output_dir, **self._sink_kw)  # check the limits here, not in a task
        self._min_rows = min_rows_per_write
        self._min_bytes = min_bytes_per_write
        self.job = uuid.uuid4().hex[:12]
        #: the object-storage side of the job (None: a local or shared path)
        self.remote = RemoteJob(self.output_dir, storage_options, prefix, self.job) \
            if urls.is_remote(self.output_dir) else None
        self.manifest: Manifest | None = None
        self._prepared: PreparedOutput | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_prepared": None, "manifest": None}  # tasks need neither

    # -- driver ---------------------------------------------------------------
    def prepare(self) -> None:
        """Lock and check the output (exists? overwrite? append?) once, before any task
        writes; the lock is held until :meth:`release` (after the commit or a failure)."""
        if self._prepared is None:
            self._prepared = prepare_output(self.output_dir, prefix=self.prefix,
                                            overwrite=self.overwrite, append=self.append,
                                            key_field=self.key_field,
                                            storage_options=self.storage_options,
                                            compression=self.compression)

    def commit(self, parts: list[StagedPart]) -> Manifest:
        """Publish the parts of a finished job; ``manifest.json`` last."""
        self.prepare()  # an empty dataset may never start a write task
        assert self._prepared is not None
        if self.remote is not None:
            self.manifest = self.remote.commit(
                self._prepared, parts, key_field=self.key_field, block_bytes=self.block_bytes,
                compression=self.compression, overwrite=self.overwrite)
        else:
            self.manifest = commit(self._prepared, parts, key_field=self.key_field,
                                   block_bytes=self.block_bytes, compression=self.compression)
        return self.manifest

    def release(self) -> None:
        """Remove this job's staging folders (a URL: its unpublished objects), then
        release the output's lock."""
        prepared, self._prepared = self._prepared, None
        if self.remote is None:
            remove_staging(self.output_dir, self.job)
        elif prepared is not None:  # once per job: listing a store is not free
            self.remote.cleanup()
        if prepared is not None:
            prepared.release()

    def pack(self, order: int, rows: Iterable[dict], where: str) -> StagedPart:
        """In a task: pack ``rows`` as part ``order`` into a fresh staging folder (a URL:
        a local one, each finished shard uploaded)."""
        if self.remote is not None:
            return self.remote.pack(order, rows, self._sink_kw, where)
        return pack_rows(self.output_dir, self.job, order, rows, self._sink_kw, where)

    def on_write_start(self, schema: Any = None) -> None:
        self.prepare()

    def on_write_complete(self, write_result: Any) -> None:
        returns = getattr(write_result, "write_returns", write_result)  # older Ray: a list
        try:
            self.commit([p for ret in returns if ret for p in ret])
        finally:
            self.release()

    def on_write_failed(self, error: Exception) -> None:
        self.release()

    # -- workers --------------------------------------------------------------
    def write(self, blocks: Iterable[Any], ctx: Any) -> list[StagedPart]:
        rows = chain.from_iterable(block_rows(b) for b in blocks)
        return [self.pack(ctx.task_idx, rows, f"Ray write task {ctx.task_idx}")]

    @property
    def min_rows_per_write(self) -> int | None:
        return self._min_rows

    @property
    def min_bytes_per_write(self) -> int | None:
        return self._min_bytes

    def get_name(self) -> str:
        return "Shardstream"


def write(ray_ds: Any, output: str | os.PathLike, *, preserve_order: bool = True,
          ray_remote_args: dict[str, Any] | None = None, concurrency: int | None = None,
          **writer_kwargs: Any) -> Manifest:
    """Pack ``ray_ds`` into a shardstream dataset at ``output``; returns its manifest.

    ``writer_kwargs`` are :class:`ShardstreamDatasink`'s options. With
    ``preserve_order`` (default) the dataset keeps the Ray Dataset's row order.
    """
    sink = ShardstreamDatasink(output, **writer_kwargs)
    sink.prepare()  # fail before anything is read
    options = ray_ds.context.execution_options
    before = options.preserve_order
    options.preserve_order = before or preserve_order
    try:
        ray_ds.write_datasink(sink, ray_remote_args=ray_remote_args, concurrency=concurrency)
    finally:
        options.preserve_order = before
        sink.release()  # in case Ray called neither on_write_complete nor on_write_failed
    if sink.manifest is None:  # pragma: no cover - Ray skipped on_write_complete
        raise RuntimeError("Ray finished the write without committing it")
    return sink.manifest


# ---------------------------------------------------------------- CLI inputs
def _stop(refs: list[Any], timeout: float = 60.0) -> None:
    """Cancel the tasks of ``refs`` still running and wait (bounded) until all ended."""
    if not refs:
        return
    _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in running:
        ray.cancel(ref)
    if running:
        ray.wait(running, num_returns=len(running), timeout=timeout)


def _pack_group(sink: "ShardstreamDatasink", order: int, group: list[InputTask],
                allow_pickle: bool) -> StagedPart:
    """Ray task: read one input group with shardstream's readers and pack it."""
    rows = chain.from_iterable(iter_task(t, allow_pickle=allow_pickle) for t in group)
    return sink.pack(order, rows, f"input group {order} (from {group[0].path})")


def write_inputs_with_ray(inputs: list[str], output: str, *, address: str | None,
                          allow_pickle: bool, parts: int | None = None,
                          **writer_kwargs: Any) -> Manifest:
    """The CLI's ``--engine ray``: pack input files on a Ray cluster, in input order.

    Files are planned like ``--workers`` (JSONL split by byte ranges, Parquet
    by row groups) into ``parts`` groups (default: the cluster's CPUs); each
    group is read and packed by one Ray task with shardstream's own readers,
    so rows stay exact (no Arrow round trip) and errors name file and line.
    Connects with ``ray.init(address)`` unless Ray is already initialised (and
    then shuts down what it started). Inputs must be paths that every node
    sees; the output too, or an object-storage URL (``storage_options``).
    """
    if "-" in inputs:
        raise InputError("the Ray engine cannot read standard input ('-'): Ray tasks read "
                         "files; save the input to a file on a shared path first")
    paths = [os.path.abspath(p) for p in inputs]
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        n = parts or max(1, int(ray.cluster_resources().get("CPU", 1)))
        tasks = plan_tasks(paths, n)
        if not allow_pickle:
            for t in tasks:
                if t.kind == "pickle":
                    iter_task(t)  # raises the standard refusal, reads nothing
        groups = [g for g in group_tasks(tasks, n) if g]
        # plain tasks, one per input group, all at once: no Ray Data round trip (rows
        # never leave the task that reads them), and the same staging + commit path
        sink = ShardstreamDatasink(output, **writer_kwargs)
        sink.prepare()  # refuse a bad output before any task runs
        task = ray.remote(max_retries=3, retry_exceptions=False)(_pack_group)
        refs: list[Any] = []
        try:
            for g, group in enumerate(groups):
                refs.append(task.remote(sink, g, group, allow_pickle))
            return sink.commit(ray.get(refs))
        except ray.exceptions.RayTaskError as exc:  # the task's own error, e.g. InputError
            cause = exc.as_instanceof_cause()
            raise (cause.cause if isinstance(getattr(cause, "cause", None), Exception)
                   else cause) from None
        finally:
            _stop(refs)  # no task still writing while the job's leftovers are removed
            sink.release()
    finally:
        if started:
            ray.shutdown()
