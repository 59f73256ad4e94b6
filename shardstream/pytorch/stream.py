"""ShardStream: an IterableDataset over shards, exact per rank, resumable.

The stream reads through one mode (:mod:`shardstream.read.modes`): a dataset with a
manifest or a mixture of them (exact epochs: :mod:`shardstream.read.order` lays
them out), or a shard list without manifest (split per rank and worker; see
:mod:`shardstream.read.shardlist`). This module adds what torch needs: the
DataLoader worker split, collation, the shared-memory wire and resume state.

The epoch, the resume point and the skipped-sample counters live in a small
shared-memory array created with the dataset, so ``set_epoch`` and
``load_state_dict`` called in the main process reach DataLoader workers --
persistent ones included -- at their next ``iter()``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from shardstream.errors import UsageError
from shardstream.format.index import verify_blocks_default
from shardstream.pytorch.collation import Collate
from shardstream.pytorch.collation import collate as default_collate
from shardstream.pytorch.resume import (STATE_VERSION, check_state, fingerprint, plan, resume_state,
                                        seek_to, state_nodes)
from shardstream.pytorch.shared import SharedState
from shardstream.pytorch.wire import to_wire
from shardstream.read.modes import DatasetMode, MixtureMode, ReadOptions, open_mode, pad_skipped
from shardstream.read.nodes import SHARES
from shardstream.read.order import Layout
from shardstream.read.world import World, get_world
from shardstream.storage.cache import DEFAULT_CACHE_LIMIT, RemoteCache
from shardstream.storage.retry import DEFAULT_RETRY, RetryPolicy

__all__ = ["ShardStream", "STATE_VERSION"]


_START_UNITS = 8  # batches whose shards start_fetch downloads
_SAMPLE_CHUNK = 256


def _check_args(batch_size: int | None, remainder: str, on_error: str, shuffle_buffer: int,
                epoch_size: int | None, node_shares: str) -> None:
    if node_shares not in SHARES:
        raise ValueError(f"node_shares must be one of {SHARES}, got {node_shares!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if remainder not in ("pad", "drop"):
        raise ValueError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    if epoch_size is not None and epoch_size < 1:
        raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")


def _from_mode(name: str, doc: str) -> Any:
    """A read-only property: the mode's attribute ``name``, None where it has none."""
    return property(lambda self: getattr(self.mode, name, None), doc=doc)


def _check_cache_limit(stream: ShardStream, limit: int | None) -> None:
    """A ``cache_limit`` below what this rank's node needs at once is a ValueError now,
    naming the minimum (else the cache would download shards again and again)."""
    if limit is None or not isinstance(stream.mode, DatasetMode) or not stream.mode.remote:
        return
    if sum(s.bytes for s in stream.mode.dataset.manifest.shards) <= limit:
        return  # the whole dataset fits: nothing to compute
    place = plan(stream, stream.world(), 0)[2]
    need = stream.mode.cache_needed(stream.epoch, stream.options, place)
    if limit < need:
        raise ValueError(
            f"cache_limit={limit} bytes is below what reading {stream.mode.name} needs in "
            f"the node cache at once: {need} bytes (the shards two consecutive shuffle "
            f"windows touch, plus {stream.options.prefetch_shards} read-ahead shards). "
            f"Raise cache_limit to at least {need}, or lower shuffle_buffer or "
            "prefetch_shards")


def _refuse_resplit(stream: ShardStream) -> None:
    """Fail loudly when accelerate splits a DataLoader around ``stream`` again.

    ``accelerator.prepare(DataLoader(stream))`` either reads on rank 0 only and
    dispatches (``DataLoaderDispatcher``: half the data never read) or wraps the
    stream in ``IterableDatasetShard`` (split twice: samples lost and repeated).
    Both call ``set_epoch`` / ``iter`` on the stream from ``accelerate.data_loader``;
    this runs inside those methods, so frame 2 is their caller."""
    try:
        caller = sys._getframe(2)
    except ValueError:  # called from the top of the stack: nobody wraps us
        return
    if caller.f_globals.get("__name__") != "accelerate.data_loader":
        return
    world = stream.world()
    if world.world_size == 1:  # nothing is split: the dispatcher's one batch is ours
        return
    where = getattr(caller.f_code, "co_qualname", caller.f_code.co_name)
    raise UsageError(
        f"ShardStream over {stream.mode.name} is being re-split by accelerate "
        f"({where}, rank {world.rank} of {world.world_size}): the stream already splits "
        "its data by rank, so this would silently lose or repeat samples. Do not pass a "
        "DataLoader around a ShardStream to accelerator.prepare(); build the loader with "
        "shardstream.loader(stream, device=accelerator.device) and pass that (or nothing) "
        "to prepare(), and register_for_checkpointing(loader) for save_state/load_state. "
        "See docs/frameworks.md")


class ShardStream(IterableDataset):
    """Stream samples or collated batches from shardstream shards (or webdataset tars).

    ``source``: dataset directory, ``manifest.json`` path, brace pattern or list of
    paths/URLs. ``batch_size``: yield collated batches (recommended) instead of
    samples. ``shuffle``: shuffle shards and blocks by (seed, epoch) and samples in
    windows of ``shuffle_buffer``. ``remainder``: ``"pad"`` (repeat samples so every
    rank gets ``ceil(N / world)``) or ``"drop"``. ``on_error``: ``"raise"`` or
    ``"warn"`` (skip the rest of a damaged shard, count it in :attr:`skipped`).
    ``resampled``/``epoch_size``: for manifest-less sources, draw shards with
    replacement and end each epoch after ``epoch_size`` samples per rank.

    Mixtures (see :mod:`shardstream.read.mixture`): ``source`` a :class:`Mixture`, or a
    list of dataset directories / :class:`Source` with ``weights=`` and ``stop=``
    (``"exhaust_all"`` default, ``"first_exhausted"``) or ``epoch_size=`` (samples
    per epoch over all ranks). ``source_field``: put each sample's source index
    (int; names in ``stream.mixture.names``) in that field. A mixture's default
    collate is ``Collate(missing="mask")``.

    Object storage (``s3://``, ``gs://``, ``http(s)://``; see docs/storage.md):
    ``storage_options`` go to the fsspec filesystem; remote shards are
    downloaded whole into the node-local ``cache_dir`` (default a per-user temp
    dir, shared by workers and ranks of a node, at most ``cache_limit`` bytes,
    least recently used evicted) and read from there; ``prefetch_shards``
    shards are downloaded ahead of the reader (:meth:`start_fetch` gives the first
    ones a head start; :func:`shardstream.loader` calls it); ``retry`` is the
    :class:`~shardstream.storage.retry.RetryPolicy` of every request. A remote prefix
    without a manifest is read as the list of its ``*.tar`` objects, sorted.

    ``verify_blocks`` (default on, unless ``$SHARDSTREAM_VERIFY_BLOCKS=0``): check
    every block read against the checksum in its index (format v4; docs/safety.md).

    ``local_world_size`` (default torchrun's ``$LOCAL_WORLD_SIZE``, else all ranks):
    ranks per node. On several nodes each node reads only its share of a dataset's
    shards (``node_shares="fixed"``: the same every epoch; ``"epoch"``: drawn anew)
    and every global batch mixes all shares (:mod:`shardstream.read.nodes`).
    """

    def __init__(self, source: Any, *, batch_size: int | None = None, shuffle: bool = False,
                 seed: int = 0, shuffle_buffer: int = 8192, block_shuffle: bool = True,
                 drop_last: bool = False, remainder: str = "pad",
                 collate: Callable[[list], Any] | None = None,
                 transform: Callable[[dict], dict] | None = None, rank: int | None = None,
                 world_size: int | None = None, on_error: str = "raise",
                 resampled: bool = False, epoch_size: int | None = None,
                 cache_bytes: int = 64 << 20, weights: Sequence[float] | None = None,
                 stop: str | None = None, source_field: str | None = None,
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 cache_limit: int | None = DEFAULT_CACHE_LIMIT, prefetch_shards: int = 2,
                 retry: RetryPolicy = DEFAULT_RETRY, verify_blocks: bool | None = None,
                 local_world_size: int | None = None, node_shares: str = "fixed") -> None:
        super().__init__()
        _check_args(batch_size, remainder, on_error, shuffle_buffer, epoch_size, node_shares)
        self.mode = open_mode(source, weights=weights, stop=stop, epoch_size=epoch_size,
                              resampled=resampled, source_field=source_field,
                              storage_options=storage_options)
        self.options = ReadOptions(
            seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
            block_shuffle=block_shuffle, on_error=on_error, cache_bytes=cache_bytes,
            verify_blocks=verify_blocks_default() if verify_blocks is None else verify_blocks,
            prefetch_shards=prefetch_shards, source_field=source_field, node_shares=node_shares)
        self.batch_size, self.drop_last, self.remainder = batch_size, drop_last, remainder
        self.collate = collate or (Collate(missing="mask") if isinstance(self.mode, MixtureMode)
                                   else default_collate)
        self.rank, self.world_size, self.local_world_size = rank, world_size, local_world_size
        self.transform = transform
        self.shared = SharedState()  # epoch, resume point and counters, shared with workers
        self.remote = RemoteCache(storage_options, cache_dir=cache_dir, max_bytes=cache_limit,
                                  retry=retry, stats=self.shared)
        _check_cache_limit(self, cache_limit)
        self._local: tuple[int, int, int] | None = None  # (epoch, start, units) in a worker
        self._units = 0  # units yielded by this process's current iteration
        self.wire = False  #: workers hand batches over as numpy in shared memory (loader())
        self._iter_start = 0

    # -- what is read ------------------------------------------------------------
    dataset = _from_mode("dataset", "The dataset (one manifest), else None.")
    mixture = _from_mode("mixture", "The :class:`Mixture`, else None.")
    urls = _from_mode("urls", "The shards of a source without manifest, else None.")
    epoch_size = _from_mode("epoch_size", "Samples per epoch of a resampled shard list.")

    verify_blocks = property(lambda self: self.options.verify_blocks)
    cache_stats = property(lambda self: self.shared.cache_stats)  #: this rank's, with workers

    @property
    def exact(self) -> bool:
        """Whether epochs are exact (a manifest is known, or a mixture of such)."""
        return self.mode.exact

    @property
    def num_samples(self) -> int | None:
        """Samples in one epoch's G (a mixture's per-epoch total); None without a manifest."""
        return self.mode.num_samples if self.mode.exact else None

    # -- epoch and position --------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.shared.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; clears a pending resume point of another epoch."""
        _refuse_resplit(self)
        same = epoch == self.shared.epoch
        self.seek(epoch, self.shared.start if same else 0, self.shared.chain if same else ())

    def seek(self, epoch: int, consumed: int, chain: tuple[tuple[int, int], ...] = ()) -> None:
        """Read ``epoch`` from offset ``consumed`` of its sequence at the next ``iter()``
        (``chain``: see :class:`~shardstream.read.modes.Placement`)."""
        self.shared.set(epoch, consumed, chain)
        self.moves += 1

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, G offset) the next ``iter()`` reads from."""
        return self.shared.epoch, self.shared.start

    #: set_epoch/seek/load_state_dict calls in this process (a loader watches it)
    moves = 0

    @property
    def skipped(self) -> int:
        """Samples skipped after errors (``on_error="warn"``) by this process and its
        DataLoader workers (shared memory), summed over epochs."""
        return self.shared.skipped

    def world(self) -> World:
        return get_world(self.rank, self.world_size, self.local_world_size)

    def layout(self, world_size: int | None = None, start: int | None = None) -> Layout:
        """This rank's exact layout (``world_size``: as on that many ranks of one node)."""
        if not self.exact:
            raise TypeError("an exact layout needs a manifest; this source has none")
        world = self.world() if world_size is None else World(0, world_size)
        return plan(self, world, self.shared.start if start is None else start)[0]

    def __len__(self) -> int:
        """Per-rank batches (or samples, without batch_size) in one full epoch."""
        if self.exact:
            return self.layout(start=0).num_units
        if self.epoch_size is not None:
            return self.mode.epoch_units(self.world().world_size, self.batch_size)
        raise TypeError("len() needs a manifest (exact epochs) or resampled=True with "
                        "epoch_size; this source is a plain shard list")

    # -- resume -----------------------------------------------------------------
    def state_for(self, epoch: int, start: int, units: int) -> dict[str, Any]:
        """State after this rank consumed ``units`` units of an iteration that began at
        G offset ``start`` (every rank is assumed to have consumed as many)."""
        layout, _, place = plan(self, self.world(), start)
        return resume_state(self, epoch, layout.consumed_after(units), place)

    def state_dict(self) -> dict[str, Any]:
        """Resume state. In the main process with ``num_workers=0`` it counts what this
        process yielded; with workers use :func:`shardstream.loader` (it counts the
        batches delivered). Inside a worker (torchdata's StatefulDataLoader) it is
        the worker's own progress."""
        if not self.exact:
            raise TypeError("state_dict() needs a manifest; manifest-less streams restart "
                            "their epoch")
        if get_worker_info() is not None:
            epoch, start, _ = self._local or (self.epoch, self.shared.start, 0)
            place = plan(self, self.world(), start)[2]
            return resume_state(self, epoch, start, place, start=start, worker_units=self._units)
        return self.state_for(self.epoch, self._iter_start, self._units)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next ``iter()``: the rest of its epoch."""
        check_state(state, fingerprint(self))
        if "worker_units" in state:  # a StatefulDataLoader worker's own state
            if state.get("chain") or state.get("nodes") != \
                    state_nodes(plan(self, self.world(), 0)[2]):
                raise ValueError("a DataLoader worker's own state resumes on the node count it "
                                 "was saved on only; save the loader's state instead")
            self._local = (int(state["epoch"]), int(state["start"]), int(state["worker_units"]))
            return
        seek_to(self, state)
        self._iter_start = self.shared.start

    # -- iteration -----------------------------------------------------------------
    def start_fetch(self) -> None:
        """Start downloading the shards the first batches of this rank read (at most
        ``prefetch_shards``, with their indexes) in the background, while DataLoader
        workers start; a no-op for local sources. Only those: a download beside them
        would slow them down; the workers read ahead once they have a batch."""
        try:
            layout, r, place = plan(self, self.world(), self.shared.start)
            batched = bool(self.batch_size)
            n = _START_UNITS * (1 if batched else _SAMPLE_CHUNK)  # a batch per worker, <= 8
            for first in _positions(layout, r, range(min(n, layout.num_units)), batched, n):
                self.mode.start_fetch(self.epoch, self.options, self.remote, first, place)
        except Exception:  # noqa: BLE001 - only a head start; iteration reports errors
            return

    def __iter__(self) -> Iterator[Any]:
        _refuse_resplit(self)
        world = self.world()
        if self._local is not None and get_worker_info() is not None:
            epoch, start, skip = self._local
            self._local = None
        else:
            epoch, start, skip = self.shared.epoch, self.shared.start, 0
        self._iter_start = start
        self._units = skip
        if self.exact:
            it = self._iter_exact(world, epoch, start, skip)
        else:
            it = self.mode.iterate(world, epoch, self.options, batch_size=self.batch_size,
                                   drop_last=self.drop_last, collate=self.collate,
                                   transform=self.transform, remote=self.remote,
                                   on_skip=self.shared.count_skip)
        wire = self.wire and get_worker_info() is not None
        for item in it:
            self._units += 1
            yield to_wire(item) if wire else item

    def _iter_exact(self, world: World, epoch: int, start: int, skip: int) -> Iterator[Any]:
        layout, r, place = plan(self, world, start)
        if layout.num_units == 0:
            return
        reader = self.mode.reader(epoch, self.options, remote=self.remote,
                                  on_skip=self.shared.count_skip, place=place)
        units = layout.units_of(r, world.worker, world.num_workers)[skip:]
        self.mode.prefetch(reader, epoch, self.options, _schedule(layout, r, units), place)
        try:
            if self.batch_size:
                narrow = _collates_narrow(self)  # packed ids widened per batch, not sample
                for j in units:
                    a, n = layout.span(r, j)
                    samples = reader.read(np.arange(a, a + n, dtype=np.int64), narrow=narrow)
                    batch = self._finish(samples)
                    yield self.collate(batch, narrow=True) if narrow else self.collate(batch)
            else:
                js = np.asarray(units, dtype=np.int64)
                for c in range(0, len(js), _SAMPLE_CHUNK):
                    pos = start + js[c:c + _SAMPLE_CHUNK] * layout.world_size + r
                    yield from self._finish(reader.read(pos))
        finally:
            reader.close()

    _last_good: list | None = None

    def _finish(self, samples: list) -> list:
        """Pad skipped (None) slots with good samples so batch counts and sizes stay
        equal across ranks; apply the transform."""
        samples = pad_skipped(samples, self._last_good)
        self._last_good = samples[:1]
        if self.transform is not None:
            samples = [self.transform(s) for s in samples]
        return samples


def _collates_narrow(stream: ShardStream) -> bool:
    """Read batches with packed arrays left narrow? When the mode can (framed
    datasets) and nothing but our own collation (which widens them) sees them."""
    return stream.mode.narrow and stream.transform is None and \
        (stream.collate is default_collate or type(stream.collate) is Collate)


def _schedule(layout: Layout, rank: int, units: range) -> tuple[int, int]:
    """Positions (start, end) of the node's sequence from ``rank``'s first ``units``
    to the end of the epoch: the schedule its read-ahead walks."""
    if not len(units):
        return 0, 0
    last = layout.span(layout.world_size - 1, layout.num_units - 1)
    return layout.span(rank, units[0])[0], last[0] + last[1]


def _positions(layout: Layout, rank: int, units: range, batched: bool,
               step: int = 32) -> Iterator[np.ndarray]:
    """The G positions of ``rank``'s ``units``, ``step`` units at a time (read-ahead)."""
    for c in range(0, len(units), step):
        if batched:
            spans = [layout.span(rank, j) for j in units[c:c + step]]
            yield np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in spans])
        else:
            js = np.asarray(units[c:c + step], dtype=np.int64)
            yield layout.start + js * layout.world_size + rank
