"""ShardStream: an IterableDataset over shards, exact per rank, resumable.

With a manifest (a dataset directory or its ``manifest.json``) epochs are
*exact*: see :mod:`shardstream.read.blocks` for the layout. Without one (brace
pattern, list of tars or URLs) shards are split per rank and worker; see
:mod:`shardstream.read.shardlist`.

The epoch, the resume point and the skipped-sample counters live in a small
shared-memory array created with the dataset, so ``set_epoch`` and
``load_state_dict`` called in the main process reach DataLoader workers --
persistent ones included -- at their next ``iter()``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from shardstream.errors import CorruptShardError, UsageError
from shardstream.format.codec import widen
from shardstream.format.index import verify_blocks_default
from shardstream.pytorch.collation import Collate, collate as default_collate
from shardstream.pytorch.wire import to_wire
from shardstream.read import shardlist
from shardstream.read.blocks import BlockReader, shard_refs
from shardstream.read.mixture import Mixture, MixtureReader, Source
from shardstream.read.order import EpochOrder, Layout
from shardstream.read.sources import resolve
from shardstream.read.world import World, get_world
from shardstream.storage import urls as storage_urls
from shardstream.storage.cache import DEFAULT_CACHE_LIMIT, RemoteCache
from shardstream.storage.retry import DEFAULT_RETRY, RetryPolicy

__all__ = ["ShardStream", "STATE_VERSION"]


STATE_VERSION = 1
_MAX_WORKERS = 256
_EPOCH, _START, _SKIP0 = 0, 1, 2  # slots of the shared array; _SKIP0 + worker + 1
_START_UNITS = 8  # batches whose shards start_fetch downloads
_SAMPLE_CHUNK = 256


def _is_mixture(source: Any, weights: Any) -> bool:
    return isinstance(source, Mixture) or weights is not None or (
        isinstance(source, (list, tuple)) and any(isinstance(s, Source) for s in source))


class _OrderReader:
    """Reads positions of one epoch's G of a single dataset."""

    def __init__(self, order: EpochOrder, reader: BlockReader) -> None:
        self.order, self.reader = order, reader

    def read(self, positions: np.ndarray, narrow: bool = False) -> list[Any]:
        return self.reader.read(*self.order.locate(positions), narrow=narrow)

    def close(self) -> None:
        self.reader.close()


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
    shards are downloaded ahead of the reader; ``retry`` is the
    :class:`~shardstream.storage.retry.RetryPolicy` of every request. A remote prefix
    without a manifest is read as the list of its ``*.tar`` objects, sorted.

    ``verify_blocks`` (default on, unless ``$SHARDSTREAM_VERIFY_BLOCKS=0``): check
    every block read against the checksum in its index (format v4; docs/safety.md).
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
                 retry: RetryPolicy = DEFAULT_RETRY, verify_blocks: bool | None = None) -> None:
        super().__init__()
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
        self.mixture: Mixture | None = None
        if _is_mixture(source, weights):
            self.mixture = self._mixture(source, weights, stop, epoch_size, resampled)
            self.dataset, self.urls, epoch_size = None, None, None
        elif stop is not None or source_field is not None:
            raise ValueError("stop= and source_field= apply to mixtures; pass a list of "
                             "sources with weights= (or a Mixture)")
        else:
            self.dataset, self.urls = resolve(source, storage_options)
        if self.dataset is None and self.mixture is None and resampled is False \
                and epoch_size is not None:
            raise ValueError("epoch_size needs resampled=True (a finite shard list ends "
                             "when its shards do)")
        if self.dataset is not None and resampled:
            raise ValueError("resampled=True is for sources without a manifest; a manifest "
                             "gives exact epochs already")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.block_shuffle = block_shuffle
        self.drop_last = drop_last
        self.remainder = remainder
        self.collate = collate or (Collate(missing="mask") if self.mixture else default_collate)
        self.source_field = source_field
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.on_error = on_error
        self.resampled = resampled
        self.epoch_size = epoch_size
        self.cache_bytes = cache_bytes
        self.remote = RemoteCache(storage_options, cache_dir=cache_dir, max_bytes=cache_limit,
                                  retry=retry)
        self.prefetch_shards = prefetch_shards
        self.verify_blocks = verify_blocks_default() if verify_blocks is None else verify_blocks
        self._shared = mp.RawArray("q", _SKIP0 + _MAX_WORKERS + 1)
        self._local: tuple[int, int, int] | None = None  # (epoch, start, units) in a worker
        self._units = 0  # units yielded by this process's current iteration
        self._wire = False  # set by loader(): workers send numpy, the loader makes tensors
        if self.dataset is not None and storage_urls.is_remote(self.dataset.root) \
                and prefetch_shards > 0:
            self._start_fetch()

    def _start_fetch(self) -> None:
        """Fetch the shards the first batches of this rank read (at most
        ``prefetch_shards``, and their indexes) in the background now, while workers
        start: see :meth:`RemoteCache.start_fetch`. Only those: a download beside
        them would slow them down; the workers read ahead once they have a batch."""
        try:
            world = self.world()
            layout = self.layout(world.world_size)
            counts = [s.num_samples for s in self.dataset.manifest.shards]
            order = EpochOrder(counts, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                               block_shuffle=False,
                               window=self.shuffle_buffer if self.shuffle else 1)
            # one batch per worker, up to 8 workers (samples: their first chunks)
            units = _START_UNITS * (1 if self.batch_size else _SAMPLE_CHUNK)
            spans = [layout.span(world.rank, k) for k in range(min(units, layout.num_units))]
            first = list(order.first_use([np.concatenate(
                [np.arange(a, a + n, dtype=np.int64) for a, n in spans])]))
            first = first[:self.prefetch_shards]
        except Exception:  # noqa: BLE001 - only a head start; iteration reports errors
            return
        refs = shard_refs(self.dataset)
        self.remote.start_fetch([(refs[s].path, refs[s].expected_bytes, refs[s].sha256,
                                  refs[s].index_path, refs[s].index_sha256) for s in first])

    @staticmethod
    def _mixture(source: Any, weights: Any, stop: str | None, epoch_size: int | None,
                 resampled: bool) -> Mixture:
        if resampled:
            raise ValueError("resampled=True is for sources without a manifest; a mixture "
                             "has exact epochs")
        if isinstance(source, Mixture):
            if weights is not None or stop is not None or epoch_size is not None:
                raise ValueError("set weights, stop and epoch_size on the Mixture itself")
            return source
        if isinstance(source, (str, os.PathLike)):
            raise ValueError("weights= needs a list of sources, one weight each")
        return Mixture(source, weights, stop=stop, epoch_size=epoch_size)

    def __getstate__(self) -> dict[str, Any]:
        """Plain pickling/deepcopy gets a private copy of the shared state; starting a
        worker process (spawn) keeps the shared memory itself."""
        state = self.__dict__.copy()
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is None:
            state["_shared"] = list(self._shared)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_shared"], list):
            shared = mp.RawArray("q", len(state["_shared"]))
            shared[:] = state["_shared"]
            state["_shared"] = shared
        self.__dict__.update(state)

    # -- public state --------------------------------------------------------
    @property
    def exact(self) -> bool:
        """Whether epochs are exact (a manifest is known, or a mixture of such)."""
        return self.dataset is not None or self.mixture is not None

    @property
    def num_samples(self) -> int | None:
        """Samples in one epoch's G (a mixture's per-epoch total); None without a manifest."""
        if self.mixture is not None:
            return self.mixture.num_samples
        return self.dataset.manifest.num_samples if self.dataset is not None else None

    @property
    def epoch(self) -> int:
        return int(self._shared[_EPOCH])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; clears a pending resume point of another epoch."""
        self._refuse_resplit()
        if epoch != self._shared[_EPOCH]:
            self._shared[_START] = 0
        self._shared[_EPOCH] = epoch
        self._moves += 1

    def _seek(self, epoch: int, consumed: int) -> None:
        """Read ``epoch`` from G offset ``consumed`` at the next ``iter()``."""
        self._shared[_EPOCH], self._shared[_START] = epoch, consumed
        self._moves += 1

    def _position(self) -> tuple[int, int]:
        """(epoch, G offset) the next ``iter()`` reads from."""
        return int(self._shared[_EPOCH]), int(self._shared[_START])

    _moves = 0  # set_epoch/load_state_dict calls in this process (ShardLoader watches it)

    def _refuse_resplit(self) -> None:
        """Fail loudly when accelerate splits a DataLoader around this stream again.

        ``accelerator.prepare(DataLoader(stream))`` either reads on rank 0 only and
        dispatches (``DataLoaderDispatcher``: half the data never read) or wraps the
        stream in ``IterableDatasetShard`` (split twice: samples lost and repeated).
        Both call ``set_epoch`` / ``iter`` on the stream from ``accelerate.data_loader``."""
        try:
            caller = sys._getframe(2)
        except ValueError:  # called from the top of the stack: nobody wraps us
            return
        if caller.f_globals.get("__name__") != "accelerate.data_loader":
            return
        world = self.world()
        if world.world_size == 1:  # nothing is split: the dispatcher's one batch is ours
            return
        where = getattr(caller.f_code, "co_qualname", caller.f_code.co_name)
        raise UsageError(
            f"ShardStream over {self._source_name()} is being re-split by accelerate "
            f"({where}, rank {world.rank} of {world.world_size}): the stream already splits "
            "its data by rank, so this would silently lose or repeat samples. Do not pass a "
            "DataLoader around a ShardStream to accelerator.prepare(); build the loader with "
            "shardstream.loader(stream, device=accelerator.device) and pass that (or nothing) "
            "to prepare(), and register_for_checkpointing(loader) for save_state/load_state. "
            "See docs/frameworks.md")

    def _source_name(self) -> str:
        if self.dataset is not None:
            return str(self.dataset.root)
        if self.mixture is not None:
            return "a mixture"
        urls = self.urls or []
        return f"{urls[0]} (+{len(urls) - 1} shards)" if len(urls) > 1 else str(urls[:1])

    @property
    def skipped(self) -> int:
        """Samples skipped after errors (``on_error="warn"``) by this process and its
        DataLoader workers (shared memory), summed over epochs."""
        return int(sum(self._shared[_SKIP0:]))

    def _count_skip(self, n: int) -> None:
        info = get_worker_info()
        slot = _SKIP0 + (info.id + 1 if info is not None else 0)
        self._shared[min(slot, len(self._shared) - 1)] += n

    def world(self) -> World:
        return get_world(self.rank, self.world_size)

    def layout(self, world_size: int | None = None, start: int | None = None) -> Layout:
        """The exact layout for this epoch (``start``: samples of G already consumed)."""
        if not self.exact:
            raise TypeError("an exact layout needs a manifest; this source has none")
        ws = self.world().world_size if world_size is None else world_size
        return Layout(self.num_samples, self._shared[_START] if start is None
                      else start, ws, self.batch_size or 1, self.drop_last, self.remainder)

    def __len__(self) -> int:
        """Per-rank batches (or samples, without batch_size) in one full epoch."""
        if self.exact:
            return self.layout(start=0).num_units
        if self.epoch_size is not None:
            return self._epoch_units(self.world().world_size)
        raise TypeError("len() needs a manifest (exact epochs) or resampled=True with "
                        "epoch_size; this source is a plain shard list")

    def _epoch_units(self, world_size: int) -> int:
        per_rank = self.epoch_size // world_size  # type: ignore[operator]
        return per_rank // self.batch_size if self.batch_size else per_rank

    # -- resume -----------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        out = {"seed": self.seed, "shuffle": self.shuffle,
               "shuffle_buffer": self.shuffle_buffer if self.shuffle else 1,
               "block_shuffle": self.block_shuffle and self.shuffle,
               "num_samples": self.num_samples}
        if self.mixture is not None:
            out["mixture"] = self.mixture.signature()
        return out

    def state_for(self, epoch: int, start: int, units: int) -> dict[str, Any]:
        """State after this rank consumed ``units`` units of an iteration that began at
        G offset ``start`` (every rank is assumed to have consumed as many)."""
        consumed = self.layout(start=start).consumed_after(units)
        if consumed is None:
            epoch, consumed = epoch + 1, 0
        return {"version": STATE_VERSION, "epoch": epoch, "consumed": consumed,
                **self._fingerprint()}

    def state_dict(self) -> dict[str, Any]:
        """Resume state. In the main process with ``num_workers=0`` it counts what this
        process yielded; with workers use :func:`shardstream.loader` (it counts the
        batches delivered). Inside a worker (torchdata's StatefulDataLoader) it is
        the worker's own progress."""
        if not self.exact:
            raise TypeError("state_dict() needs a manifest; manifest-less streams restart "
                            "their epoch")
        if get_worker_info() is not None:
            epoch, start, _ = self._local or (self.epoch, self._shared[_START], 0)
            return {"version": STATE_VERSION, "epoch": epoch, "start": start,
                    "worker_units": self._units, **self._fingerprint()}
        return self.state_for(self.epoch, self._iter_start, self._units)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next ``iter()``: the rest of its epoch."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {state.get('version')!r}")
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"state does not fit this stream (saved vs now: {diff}); resume "
                             "with the same dataset, seed and shuffle settings")
        if "worker_units" in state:  # a StatefulDataLoader worker's own state
            self._local = (int(state["epoch"]), int(state["start"]), int(state["worker_units"]))
            return
        self._shared[_EPOCH] = int(state["epoch"])
        self._shared[_START] = int(state["consumed"])
        self._iter_start = int(state["consumed"])
        self._moves += 1

    _iter_start = 0

    # -- iteration -----------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        self._refuse_resplit()
        world = self.world()
        if self._local is not None and get_worker_info() is not None:
            epoch, start, skip = self._local
            self._local = None
        else:
            epoch, start, skip = self.epoch, int(self._shared[_START]), 0
        self._iter_start = start
        self._units = skip
        if self.exact:
            it = self._iter_exact(world, epoch, start, skip)
        else:
            it = self._iter_shards(world, epoch)
        wire = self._wire and get_worker_info() is not None
        for item in it:
            self._units += 1
            yield to_wire(item) if wire else item

    def _epoch_reader(self, epoch: int) -> _OrderReader | MixtureReader:
        """Reads positions of ``epoch``'s G: one dataset, or a mixture of several."""
        window = self.shuffle_buffer if self.shuffle else 1
        if self.mixture is not None:
            return MixtureReader(self.mixture, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                                 block_shuffle=self.block_shuffle,
                                 shuffle_buffer=self.shuffle_buffer, on_error=self.on_error,
                                 cache_bytes=self.cache_bytes, on_skip=self._count_skip,
                                 source_field=self.source_field, remote=self.remote,
                                 verify_blocks=self.verify_blocks)
        # in order, a worker never comes back to a block: a big cache only churns memory
        # (~15 % of a worker's time on tokens); shuffled windows need it
        cache = self.cache_bytes if self.shuffle else min(self.cache_bytes, 4 << 20)
        reader = BlockReader(shard_refs(self.dataset), on_error=self.on_error,
                             cache_bytes=cache, on_skip=self._count_skip,
                             remote=self.remote, verify_blocks=self.verify_blocks)
        counts = [s.num_samples for s in self.dataset.manifest.shards]
        order = EpochOrder(counts, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                           block_shuffle=self.block_shuffle, window=window,
                           block_firsts=reader.block_firsts)
        return _OrderReader(order, reader)

    def _iter_exact(self, world: World, epoch: int, start: int, skip: int) -> Iterator[Any]:
        layout = self.layout(world.world_size, start)
        if layout.num_units == 0:
            return
        reader = self._epoch_reader(epoch)
        units = layout.units_of(world.rank, world.worker, world.num_workers)[skip:]
        if isinstance(reader, _OrderReader) and storage_urls.is_remote(self.dataset.root) \
                and self.prefetch_shards > 0:
            self._prefetch(reader, layout, world, units, epoch)
        try:
            if self.batch_size and self._collates_narrow(reader):
                for j in units:  # packed ids are widened per batch, not per sample
                    a, n = layout.span(world.rank, j)
                    samples = reader.read(np.arange(a, a + n, dtype=np.int64), narrow=True)
                    yield self.collate(self._finish(samples), narrow=True)
            elif self.batch_size:
                for j in units:
                    a, n = layout.span(world.rank, j)
                    samples = reader.read(np.arange(a, a + n, dtype=np.int64))
                    yield self.collate(self._finish(samples))
            else:
                js = np.asarray(units, dtype=np.int64)
                for c in range(0, len(js), _SAMPLE_CHUNK):
                    pos = start + js[c:c + _SAMPLE_CHUNK] * world.world_size + world.rank
                    yield from self._finish(reader.read(pos))
        finally:
            reader.close()

    def _prefetch(self, reader: _OrderReader, layout: Layout, world: World, units: range,
                  epoch: int) -> None:
        """Download this worker's shards ahead, in the order its units first touch them."""
        o = reader.order  # a private copy: the prefetch thread must not share its caches
        order = EpochOrder(o.counts, seed=o.seed, epoch=epoch, shuffle=self.shuffle,
                           block_shuffle=False, window=o.window)

        def positions() -> Iterator[np.ndarray]:
            for c in range(0, len(units), 32):
                if self.batch_size:
                    spans = [layout.span(world.rank, j) for j in units[c:c + 32]]
                    yield np.concatenate([np.arange(a, a + n, dtype=np.int64)
                                          for a, n in spans])
                else:
                    js = np.asarray(units[c:c + 32], dtype=np.int64)
                    yield layout.start + js * world.world_size + world.rank
        reader.reader.prefetch(order.first_use(positions()), depth=self.prefetch_shards)

    def _collates_narrow(self, reader: Any) -> bool:
        """Read batches with packed arrays left narrow? For compressed (format v3)
        datasets, when nothing but our own collation (which widens them) sees the
        samples."""
        comp = self.dataset.manifest.compression if self.dataset is not None else None
        return comp is not None and comp.framed and self.transform is None and \
            isinstance(reader, _OrderReader) and \
            (self.collate is default_collate or type(self.collate) is Collate)

    _last_good: list | None = None

    def _finish(self, samples: list) -> list:
        """Apply the transform; fill skipped (None) slots by repeating good samples so
        batch counts and sizes stay equal across ranks."""
        if None in samples:
            good = [s for s in samples if s is not None] or \
                [widen(s) for s in self._last_good or ()]  # may hold narrow arrays
            if not good:
                raise CorruptShardError("every sample so far was skipped after errors; no "
                                        "sample to pad with (see the warnings above)")
            samples = [s if s is not None else good[i % len(good)]
                       for i, s in enumerate(samples)]
        self._last_good = samples[:1]
        if self.transform is not None:
            samples = [self.transform(s) for s in samples]
        return samples

    def _iter_shards(self, world: World, epoch: int) -> Iterator[Any]:
        urls: Sequence[str] = self.urls  # type: ignore[assignment]
        if self.resampled:
            shard_iter: Any = shardlist.resampled_shards(urls, seed=self.seed, epoch=epoch,
                                                       rank=world.rank, worker=world.worker)
        else:
            shard_iter = shardlist.split_shards(
                urls, rank=world.rank, world_size=world.world_size, worker=world.worker,
                num_workers=world.num_workers, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        data: Any = shardlist.iter_shards(shard_iter, on_error=self.on_error,
                                        on_skip=self._count_skip, remote=self.remote,
                                        prefetch=self.prefetch_shards)
        if self.transform is not None:
            data = map(self.transform, data)
        if self.shuffle:
            data = shardlist.buffer_shuffle(data, self.shuffle_buffer, seed=self.seed, epoch=epoch,
                                          rank=world.rank, worker=world.worker)
        if self.epoch_size is not None:
            units = self._epoch_units(world.world_size)
            mine = len(range(world.worker, units, world.num_workers))
            data = shardlist.limit(data, mine * (self.batch_size or 1))
        if self.batch_size:
            data = shardlist.batched(data, self.batch_size, self.collate,
                                   partial=not self.drop_last and self.epoch_size is None)
        return data
