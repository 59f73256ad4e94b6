"""Read a shardstream dataset as a Ray Dataset: read tasks over shards or sample ranges.

>>> import shardstream.integrations.ray as ssray                     # doctest: +SKIP
>>> ds = ssray.read("s3://bucket/ds", storage_options={"anon": False})
>>> for batch in ds.iter_batches(batch_size=256): ...        # numpy; see arrow_batch for torch

The driver reads only the manifest. :meth:`ShardstreamDatasource.get_read_tasks`
cuts the dataset, in order, into about ``parallelism`` read tasks: whole
consecutive shards when there are more shards than tasks, otherwise each shard
cut into sample ranges in proportion to its count. Every sample belongs to
exactly one range, so a read is exact: every sample once (in dataset order when
``DataContext.execution_options.preserve_order`` is set).

A read task opens its shards with a :class:`~shardstream.read.blocks.BlockReader`
(index checked against the manifest, blocks checked against their checksums)
and yields Arrow blocks of about ``block_bytes`` of stored samples, each built
:data:`CHUNK_BYTES` of samples at a time by
:func:`~shardstream.integrations.ray_columns.samples_to_block`. Remote shards
(``s3://``, ``http://``...) are downloaded whole into the node-local cache
(:class:`~shardstream.storage.cache.RemoteCache`, ``cache_dir``): once per node,
shared by every task and process of that node. Tasks get only settings and
paths (``storage_options`` included); no file is open until a task runs.

The manifest's schema decides each top-level field's Arrow type, so the blocks of
every task agree: ndarray fields of one dtype and one shape become fixed-shape
tensor columns, of one dtype and ndim but varying sizes variable-shaped tensor
columns; ``int``/``float``/``bool``/``str``/``bytes`` fields int64/float64/bool/
string/binary (null where a sample lacks the field); nested dicts of such fields
structs. Anything else goes through Ray's own conversion, block by block (lists,
mixed types, ndarrays missing from some samples, ints beyond int64). The columns
are built in bulk (:mod:`shardstream.integrations.ray_columns`).
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Sequence

import numpy as np

try:
    import pyarrow as pa
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
    from ray.data.extensions import ArrowVariableShapedTensorType, get_arrow_extension_tensor_types
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("shardstream.integrations.ray_read needs Ray Data: "
                      "pip install 'shardstream[ray]'") from exc

from shardstream.errors import ManifestError
from shardstream.integrations.ray_columns import column_plan, rows_to_block, samples_to_block
from shardstream.read.blocks import BlockReader
from shardstream.read.shards import ShardRef, shard_refs
from shardstream.read.sources import resolve
from shardstream.storage.cache import RemoteCache
from shardstream.storage.urls import is_remote

__all__ = ["ShardstreamDatasource", "read", "arrow_batch", "Piece", "plan_pieces",
           "column_plan", "rows_to_block", "DEFAULT_BLOCK_BYTES", "CHUNK_BYTES"]

#: stored sample bytes per Arrow block a read task yields
DEFAULT_BLOCK_BYTES = 32 << 20
#: stored sample bytes decoded at a time while a block is built (kept small: the decoded
#: samples of a chunk stay in cache until their columns are built and they are freed)
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` (shard-local) of one shard, read by one task."""

    ref: ShardRef
    start: int
    stop: int


def plan_pieces(refs: Sequence[ShardRef], tasks: int) -> list[list[Piece]]:
    """Cut the shards, in order, into about ``tasks`` lists of pieces (one per task).

    More shards than tasks: consecutive whole shards, balanced by sample count.
    Otherwise: each shard cut into ranges in proportion to its sample count.
    """
    refs = [r for r in refs if r.num_samples]
    total = sum(r.num_samples for r in refs)  # type: ignore[misc]
    if not total:
        return []
    tasks = max(1, min(int(tasks), total))
    if tasks < len(refs):
        groups: list[list[Piece]] = [[] for _ in range(tasks)]
        before = 0
        for r in refs:
            n = r.num_samples or 0
            g = min(tasks - 1, int((before + n / 2) * tasks / total))
            groups[g].append(Piece(r, 0, n))
            before += n
        return [g for g in groups if g]
    cuts_of = [1] * len(refs)  # ranges per shard: each next one to the longest ranges
    heap = [(-(r.num_samples or 0), s) for s, r in enumerate(refs)]
    heapq.heapify(heap)
    for _ in range(tasks - len(refs)):
        _, s = heapq.heappop(heap)
        n = refs[s].num_samples or 0
        cuts_of[s] += 1
        if cuts_of[s] < n:
            heapq.heappush(heap, (-n / cuts_of[s], s))
        if not heap:
            break
    out = []
    for r, k in zip(refs, cuts_of):
        n = r.num_samples or 0
        cuts = [n * j // k for j in range(k + 1)]
        out += [[Piece(r, a, z)] for a, z in zip(cuts, cuts[1:]) if z > a]
    return out


# ---------------------------------------------------------------- batches
def arrow_batch(table: pa.Table, pad_value: int | float = 0) -> dict[str, Any]:
    """A pyarrow batch as numpy, collated like ShardStream, without a Python object per row.

    Fixed-shape tensors: ``[n, *shape]``; variable-shaped ones whose rows differ in dim 0
    only: right-padded with ``pad_value`` plus ``<name>_lengths`` (int64), other ragged
    ones a list of arrays; numbers and bools without nulls: arrays; the rest: lists.
    Arrays are fresh (writable). For ``iter_batches(batch_format="pyarrow")`` or an
    ``ArrowBatchCollateFn`` feeding ``iter_torch_batches``.
    """
    out: dict[str, Any] = {}
    for name, col in zip(table.column_names, table.columns):
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if isinstance(arr.type, ArrowVariableShapedTensorType):
            padded = _padded(arr, pad_value) if arr.null_count == 0 and len(arr) else None
            if padded is None:
                out[name] = list(arr.to_numpy())
            else:
                out[name], out[f"{name}_lengths"] = padded
        elif isinstance(arr.type, get_arrow_extension_tensor_types()):  # fixed shape
            out[name] = np.array(arr.to_numpy())
        elif (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
              or pa.types.is_boolean(arr.type)) and arr.null_count == 0:
            out[name] = np.array(arr.to_numpy(zero_copy_only=False))
        else:
            out[name] = arr.to_pylist()
    return out


def _padded(arr: Any, pad_value: int | float) -> tuple[np.ndarray, np.ndarray] | None:
    """(padded rows, lengths) of a variable-shaped tensor array; None if the rows differ
    beyond dim 0."""
    shapes = np.array(arr.storage.field("shape").flatten(), dtype=np.int64)
    shapes = shapes.reshape(len(arr), arr.type.ndim)
    if arr.type.ndim > 1 and (shapes[:, 1:] != shapes[0, 1:]).any():
        return None
    data = arr.storage.field("data")
    offsets = data.offsets
    flat = data.values[offsets[0].as_py():offsets[-1].as_py()].to_numpy(zero_copy_only=False)
    lengths = shapes[:, 0]
    trail = tuple(int(d) for d in shapes[0, 1:])
    out = np.full((len(arr), int(lengths.max()), *trail), pad_value, dtype=flat.dtype)
    out[np.arange(out.shape[1]) < lengths[:, None]] = flat.reshape(-1, *trail)
    return out, lengths


# ---------------------------------------------------------------- read tasks
def read_pieces(pieces: Sequence[Piece], plan: dict[str, tuple[str, Any]],
                block_rows: int, storage_options: dict[str, Any] | None,
                cache_dir: str | None, verify_blocks: bool | None,
                chunk_rows: int | None = None) -> Iterator[pa.Table]:
    """One read task: the samples of ``pieces`` as Arrow blocks of ``block_rows`` rows,
    each decoded and converted ``chunk_rows`` samples at a time."""
    refs = list(dict.fromkeys(p.ref for p in pieces))
    remote = (RemoteCache(storage_options, cache_dir=cache_dir)
              if any(is_remote(r.path) for r in refs) else None)
    reader = BlockReader(refs, remote=remote, verify_blocks=verify_blocks)
    if remote is not None and len(refs) > 1:
        reader.prefetch(range(len(refs)))  # the next shards download while one is read
    step = max(1, chunk_rows or block_rows)

    def chunks(s: int, a: int, z: int) -> Iterator[list]:
        for c in range(a, z, step):
            local = np.arange(c, min(c + step, z), dtype=np.int64)
            yield reader.read(np.full(len(local), s, dtype=np.int64), local)

    try:
        for p in pieces:
            s = refs.index(p.ref)
            k = -(-(p.stop - p.start) // block_rows)  # blocks of even size
            cuts = [p.start + (p.stop - p.start) * j // k for j in range(k + 1)]
            for a, z in zip(cuts, cuts[1:]):
                yield samples_to_block(chunks(s, a, z), plan)
    finally:
        reader.close()


class ShardstreamDatasource(Datasource):
    """A Ray Data source over a shardstream dataset with a manifest (local or a URL).

    >>> ray.data.read_datasource(ShardstreamDatasource("ds"))  # doctest: +SKIP

    ``columns``: the top-level fields to read (default: all). ``cache_dir``: the
    node cache for remote shards (default :func:`~shardstream.storage.cache.default_cache_dir`).
    ``block_bytes``: stored bytes of samples per yielded block.
    """

    def __init__(self, source: Any, *, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 columns: Sequence[str] | None = None, verify_blocks: bool | None = None,
                 block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        super().__init__()
        self.source = _absolute(source)
        dataset, _ = resolve(self.source, storage_options)
        if dataset is None:
            raise ManifestError(f"{self.source}: Ray reads need a dataset with a manifest "
                                "(a dataset directory, its manifest.json, or its URL)")
        self.manifest = dataset.manifest
        self.refs = shard_refs(dataset)
        self.plan = column_plan(self.manifest.schema, columns, where=str(self.source))
        self.storage_options = dict(storage_options or {})
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.verify_blocks = verify_blocks
        self.block_bytes = max(1, int(block_bytes))

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(r.bytes or 0 for r in self.refs) or None

    def get_name(self) -> str:
        return "Shardstream"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for pieces in plan_pieces(self.refs, parallelism):
            rows = sum(p.stop - p.start for p in pieces)
            nbytes = sum((p.ref.bytes or 0) * (p.stop - p.start) // max(p.ref.num_samples or 1, 1)
                         for p in pieces)
            per_row = max(1, nbytes // max(rows, 1))
            block_rows = max(1, min(rows, self.block_bytes // per_row))
            chunk_rows = max(16, min(block_rows, CHUNK_BYTES // per_row))
            meta = BlockMetadata(num_rows=rows, size_bytes=int(nbytes), exec_stats=None,
                                 input_files=list(dict.fromkeys(p.ref.path for p in pieces)))
            fn = partial(read_pieces, pieces, self.plan, block_rows, self.storage_options,
                         self.cache_dir, self.verify_blocks, chunk_rows)
            tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _absolute(source: Any) -> Any:
    """Local paths made absolute on the driver: Ray workers run in other directories."""
    if isinstance(source, (list, tuple)):
        return [_absolute(s) for s in source]
    path = os.fspath(source)
    return path if is_remote(path) or "{" in path else os.path.abspath(path)


def default_num_blocks(num_shards: int) -> int:
    """One task per shard, and at least two per CPU of the Ray cluster."""
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else \
            (os.cpu_count() or 1)
    except Exception:  # noqa: BLE001 - no cluster to ask
        cpus = os.cpu_count() or 1
    return max(num_shards, 2 * cpus, 1)


def read(source: Any, *, storage_options: dict[str, Any] | None = None,
         cache_dir: str | os.PathLike | None = None, columns: Sequence[str] | None = None,
         verify_blocks: bool | None = None, override_num_blocks: int | None = None,
         block_bytes: int = DEFAULT_BLOCK_BYTES, **read_args: Any) -> "ray.data.Dataset":
    """A shardstream dataset (directory, ``manifest.json`` or URL) as a ``ray.data.Dataset``.

    Exact: every sample once. ``override_num_blocks``: the number of read tasks
    (default: one per shard, at least two per cluster CPU, shards cut into sample
    ranges as needed). Other keywords (``concurrency``, ``num_cpus``,
    ``ray_remote_args``...) go to ``ray.data.read_datasource``.
    """
    src = ShardstreamDatasource(source, storage_options=storage_options, cache_dir=cache_dir,
                                columns=columns, verify_blocks=verify_blocks,
                                block_bytes=block_bytes)
    if override_num_blocks is None:
        override_num_blocks = default_num_blocks(sum(1 for r in src.refs if r.num_samples))
    return ray.data.read_datasource(src, override_num_blocks=max(1, override_num_blocks),
                                    **read_args)
