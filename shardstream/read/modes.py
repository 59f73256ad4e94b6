"""The three reading modes behind one interface: one dataset, a mixture, a shard list.

A stream holds one mode, chosen from its source by :func:`open_mode`. The *exact*
modes (:class:`DatasetMode`, :class:`MixtureMode`) know their sample count up front
and open an :class:`EpochReader` that reads any positions of one epoch's global
sequence G; the stream's :class:`~shardstream.read.order.Layout` decides which
positions each rank and worker reads. :class:`ShardListMode` (no manifest) streams
each worker's shards in turn: no exact epochs, no resume inside an epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from shardstream.errors import CorruptShardError
from shardstream.format.codec import widen
from shardstream.read import shardlist
from shardstream.read.blocks import BlockReader
from shardstream.read.dataset import Dataset
from shardstream.read.mixorder import MixSequence
from shardstream.read.mixture import Mixture, MixtureReader, Source
from shardstream.read.nodes import NextUse, NodeOrder, cache_needed, node_shares, remaining
from shardstream.read.order import EpochOrder, first_use_at
from shardstream.read.shards import shard_refs
from shardstream.read.sources import resolve
from shardstream.read.world import World
from shardstream.storage.cache import RemoteCache
from shardstream.storage.urls import is_remote

__all__ = ["ReadOptions", "Placement", "EpochReader", "DatasetMode", "MixtureMode",
           "ShardListMode", "open_mode", "pad_skipped", "placed"]

OnSkip = Callable[[int], None]


@dataclass(frozen=True)
class ReadOptions:
    """How a stream reads, whatever its mode (see ShardStream for each option)."""

    seed: int = 0
    shuffle: bool = False
    shuffle_buffer: int = 8192
    block_shuffle: bool = True
    on_error: str = "raise"
    cache_bytes: int = 64 << 20
    verify_blocks: bool = True
    prefetch_shards: int = 2
    source_field: str | None = None
    node_shares: str = "fixed"

    @property
    def window(self) -> int:
        """Positions permuted together: the shuffle buffer when shuffling, else 1."""
        return self.shuffle_buffer if self.shuffle else 1


@dataclass(frozen=True)
class Placement:
    """Where one rank's node sits in an epoch's layout (see :mod:`shardstream.read.nodes`).

    ``chain``: for an epoch resumed on another number of nodes, the (nodes, consumed)
    of each earlier part of the epoch, oldest first; empty otherwise."""

    nodes: int = 1
    node: int = 0
    chain: tuple[tuple[int, int], ...] = ()

    @property
    def node_local(self) -> bool:
        return self.nodes > 1 or bool(self.chain)


class EpochReader(Protocol):
    """Reads positions of one epoch's G (None where a sample was skipped)."""

    def read(self, positions: np.ndarray, narrow: bool = False) -> list[Any]: ...

    def close(self) -> None: ...


def placed(orders: Callable[[int, int | None], list[Any]], place: Placement) -> Any:
    """The order ``place``'s node reads: ``orders(nodes, only)`` gives every node's order
    on ``nodes`` nodes (or only node ``only``'s); an epoch resumed on another node count
    is the rest of the first layout, cut anew at each change (``place.chain``)."""
    if not place.chain:
        return orders(place.nodes, place.node if place.nodes > 1 else None)[0]
    parts = orders(place.chain[0][0], None)
    after = [nodes for nodes, _ in place.chain[1:]] + [place.nodes]
    for (_, consumed), nodes in zip(place.chain, after):
        parts = remaining(parts, consumed, nodes)
    return parts[place.node]


class _OrderReader:
    """Reads positions of one epoch's G of a single dataset."""

    def __init__(self, order: EpochOrder, reader: BlockReader) -> None:
        self.order, self.reader = order, reader
        self.position = -1  # of the last read: where eviction looks from

    def read(self, positions: np.ndarray, narrow: bool = False) -> list[Any]:
        if len(positions):
            self.position = int(positions[0])
            self.reader.advance(self.position)
        return self.reader.read(*self.order.locate(positions), narrow=narrow)

    def close(self) -> None:
        self.reader.close()


class DatasetMode:
    """One dataset with a manifest (local or remote): exact epochs."""

    exact = True

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.remote = is_remote(dataset.root)
        comp = dataset.manifest.compression
        #: packed arrays may stay narrow until collation (compressed, framed: format v3+)
        self.narrow = comp is not None and comp.framed

    @property
    def num_samples(self) -> int:
        return self.dataset.manifest.num_samples

    @property
    def name(self) -> str:
        return str(self.dataset.root)

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def _counts(self) -> list[int]:
        return [s.num_samples for s in self.dataset.manifest.shards]

    def order(self, epoch: int, opts: ReadOptions, place: Placement,
              block_firsts: Callable[[int], np.ndarray] | None = None) -> Any:
        """The order of ``place``'s node (the whole dataset's on one node): positions ->
        (shard, sample). Without ``block_firsts`` blocks are not shuffled (the shards
        each position reads are the same either way)."""
        bs = opts.block_shuffle and block_firsts is not None

        def orders(nodes: int, only: int | None = None) -> list[Any]:
            """Every node's order (or only node ``only``'s) on ``nodes`` nodes."""
            if nodes == 1:
                return [EpochOrder(self._counts(), seed=opts.seed, epoch=epoch,
                                   shuffle=opts.shuffle, block_shuffle=bs,
                                   window=opts.window, block_firsts=block_firsts)]
            shares = node_shares(self._counts(), nodes, seed=opts.seed, epoch=epoch,
                                 shuffle=opts.shuffle, shares=opts.node_shares)
            return [NodeOrder(shares[n], seed=opts.seed, epoch=epoch, node=n,
                              shuffle=opts.shuffle, window=opts.window)
                    for n in (range(nodes) if only is None else [only])]
        return placed(orders, place)

    def cache_needed(self, epoch: int, opts: ReadOptions, place: Placement) -> int:
        """Bytes of node cache this node's schedule needs at once (see
        :func:`~shardstream.read.nodes.cache_needed`); 0 for a local dataset."""
        if not self.remote:
            return 0
        sizes = np.array([s.bytes for s in self.dataset.manifest.shards], dtype=np.int64)
        return cache_needed(self.order(epoch, opts, place), sizes, opts.window,
                            opts.prefetch_shards)

    def reader(self, epoch: int, opts: ReadOptions, *, remote: RemoteCache | None,
               on_skip: OnSkip | None, place: Placement = Placement()) -> _OrderReader:
        # in order, a worker never comes back to a block: a big cache only churns memory
        # (~15 % of a worker's time on tokens); shuffled windows need it
        cache = opts.cache_bytes if opts.shuffle else min(opts.cache_bytes, 4 << 20)
        reader = BlockReader(shard_refs(self.dataset), on_error=opts.on_error,
                             cache_bytes=cache, on_skip=on_skip, remote=remote,
                             verify_blocks=opts.verify_blocks)
        order = self.order(epoch, opts, place, block_firsts=reader.block_firsts)
        return _OrderReader(order, reader)

    def prefetch(self, reader: EpochReader, epoch: int, opts: ReadOptions,
                 schedule: tuple[int, int], place: Placement = Placement()) -> None:
        """Download shards ahead along the node's schedule: positions ``schedule =
        (start, end)`` of the node's sequence, which every rank and worker of the node
        walks, in the order they first touch them (see ``Prefetcher(positioned=True)``)."""
        if not self.remote or opts.prefetch_shards <= 0 or not isinstance(reader, _OrderReader):
            return
        # a private order: the prefetch thread must not share the reader's caches
        order = self.order(epoch, opts, place)
        reader.reader.prefetch(first_use_at(order.shards_at, *schedule),
                               depth=opts.prefetch_shards, positioned=True)
        if reader.reader.remote is not None:  # evict by the same schedule's next use
            refs, store = reader.reader.shards, reader.reader.remote
            nu = NextUse(
                self.order(epoch, opts, place).shards_at, *schedule,
                position=lambda: reader.position,
                entries=lambda: {store.entry_name(r.path, size=r.bytes, sha256=r.sha256): s
                                 for s, r in enumerate(refs) if r.bytes is not None},
                window=opts.window)
            store.next_use, reader.reader.next_use = nu, nu.steps
            reader.reader.release_every = max(nu.step // 2, 1)

    def start_fetch(self, epoch: int, opts: ReadOptions, remote: RemoteCache,
                    positions: np.ndarray, place: Placement = Placement()) -> None:
        """Start downloading the first ``prefetch_shards`` shards ``positions`` need (and
        their indexes) in the background: see :meth:`RemoteCache.start_fetch`."""
        if not self.remote or opts.prefetch_shards <= 0:
            return
        order = self.order(epoch, opts, place)
        first = list(order.first_use([positions]))[:opts.prefetch_shards]
        refs = shard_refs(self.dataset)
        remote.start_fetch([(refs[s].path, refs[s].bytes, refs[s].sha256, refs[s].index_path,
                             refs[s].index_sha256) for s in first])


class MixtureMode:
    """Several datasets mixed by weights: exact epochs, each source in its own order."""

    exact = True
    remote = False  # sources download as they are read; no read-ahead plan yet
    narrow = False

    def __init__(self, mixture: Mixture) -> None:
        self.mixture = mixture

    @property
    def num_samples(self) -> int:
        return self.mixture.num_samples

    @property
    def name(self) -> str:
        return "a mixture"

    def fingerprint(self) -> dict[str, Any]:
        return {"mixture": self.mixture.signature()}

    def order(self, epoch: int, opts: ReadOptions, place: Placement,
              block_firsts: Callable[[int], np.ndarray] | None = None) -> Any:
        """The sequence ``place``'s node reads (the whole epoch's on one node): positions
        -> (shard among all sources' shards, sample); see :mod:`~shardstream.read.mixorder`."""
        def orders(nodes: int, only: int | None = None) -> list[Any]:
            return [MixSequence(self.mixture, epoch=epoch, seed=opts.seed, shuffle=opts.shuffle,
                                block_shuffle=opts.block_shuffle, block_firsts=block_firsts,
                                shuffle_buffer=opts.shuffle_buffer, nodes=nodes, node=n,
                                shares=opts.node_shares)
                    for n in (range(nodes) if only is None else [only])]
        return placed(orders, place)

    def reader(self, epoch: int, opts: ReadOptions, *, remote: RemoteCache | None,
               on_skip: OnSkip | None, place: Placement = Placement()) -> MixtureReader:
        return MixtureReader(self.mixture, epoch=epoch, seed=opts.seed, shuffle=opts.shuffle,
                             block_shuffle=opts.block_shuffle,
                             shuffle_buffer=opts.shuffle_buffer, on_error=opts.on_error,
                             cache_bytes=opts.cache_bytes, on_skip=on_skip,
                             source_field=opts.source_field, remote=remote,
                             verify_blocks=opts.verify_blocks,
                             order=lambda firsts: self.order(epoch, opts, place, firsts))

    def prefetch(self, reader: EpochReader, epoch: int, opts: ReadOptions,
                 schedule: tuple[int, int], place: Placement = Placement()) -> None:
        return None

    def start_fetch(self, epoch: int, opts: ReadOptions, remote: RemoteCache,
                    positions: np.ndarray, place: Placement = Placement()) -> None:
        return None


class ShardListMode:
    """Shards without a manifest (tars, URLs): split per rank and worker, no exact epochs.

    ``resampled``: draw shards with replacement; ``epoch_size`` (samples per epoch over
    all ranks) then ends each epoch."""

    exact = False

    def __init__(self, urls: Sequence[str], resampled: bool, epoch_size: int | None) -> None:
        self.urls, self.resampled, self.epoch_size = list(urls), resampled, epoch_size

    @property
    def name(self) -> str:
        urls = self.urls
        return f"{urls[0]} (+{len(urls) - 1} shards)" if len(urls) > 1 else str(urls[:1])

    def epoch_units(self, world_size: int, batch_size: int | None) -> int:
        """Units (batches, or samples) per rank of an ``epoch_size`` epoch."""
        per_rank = self.epoch_size // world_size  # type: ignore[operator]
        return per_rank // batch_size if batch_size else per_rank

    def iterate(self, world: World, epoch: int, opts: ReadOptions, *,
                batch_size: int | None, drop_last: bool, collate: Callable[[list], Any],
                transform: Callable[[dict], dict] | None, remote: RemoteCache | None,
                on_skip: OnSkip | None) -> Iterator[Any]:
        """This worker's samples (or collated batches) of ``epoch``."""
        if self.resampled:
            shards: Any = shardlist.resampled_shards(self.urls, seed=opts.seed, epoch=epoch,
                                                     rank=world.rank, worker=world.worker)
        else:
            shards = shardlist.split_shards(
                self.urls, rank=world.rank, world_size=world.world_size, worker=world.worker,
                num_workers=world.num_workers, seed=opts.seed, epoch=epoch,
                shuffle=opts.shuffle)
        data: Any = shardlist.iter_shards(shards, on_error=opts.on_error, on_skip=on_skip,
                                          remote=remote, prefetch=opts.prefetch_shards)
        if transform is not None:
            data = map(transform, data)
        if opts.shuffle:
            data = shardlist.buffer_shuffle(data, opts.shuffle_buffer, seed=opts.seed,
                                            epoch=epoch, rank=world.rank, worker=world.worker)
        if self.epoch_size is not None:
            units = self.epoch_units(world.world_size, batch_size)
            mine = len(range(world.worker, units, world.num_workers))
            data = shardlist.limit(data, mine * (batch_size or 1))
        if batch_size:
            data = shardlist.batched(data, batch_size, collate,
                                     partial=not drop_last and self.epoch_size is None)
        return data


Mode = DatasetMode | MixtureMode | ShardListMode


def _is_mixture(source: Any, weights: Any) -> bool:
    return isinstance(source, Mixture) or weights is not None or (
        isinstance(source, (list, tuple)) and any(isinstance(s, Source) for s in source))


def _mixture(source: Any, weights: Any, stop: str | None, epoch_size: int | None) -> Mixture:
    if isinstance(source, Mixture):
        if weights is not None or stop is not None or epoch_size is not None:
            raise ValueError("set weights, stop and epoch_size on the Mixture itself")
        return source
    if isinstance(source, (str, os.PathLike)):
        raise ValueError("weights= needs a list of sources, one weight each")
    return Mixture(source, weights, stop=stop, epoch_size=epoch_size)


def open_mode(source: Any, *, weights: Sequence[float] | None = None, stop: str | None = None,
              epoch_size: int | None = None, resampled: bool = False,
              source_field: str | None = None,
              storage_options: dict[str, Any] | None = None) -> Mode:
    """The mode for ``source`` (see ShardStream), after checking the options fit it.

    Opens the manifest (or lists the tars) but reads no shard and starts no download."""
    if _is_mixture(source, weights):
        if resampled:
            raise ValueError("resampled=True is for sources without a manifest; a mixture "
                             "has exact epochs")
        return MixtureMode(_mixture(source, weights, stop, epoch_size))
    if stop is not None or source_field is not None:
        raise ValueError("stop= and source_field= apply to mixtures; pass a list of "
                         "sources with weights= (or a Mixture)")
    dataset, urls = resolve(source, storage_options)
    if dataset is not None:
        if resampled:
            raise ValueError("resampled=True is for sources without a manifest; a manifest "
                             "gives exact epochs already")
        return DatasetMode(dataset)
    if not resampled and epoch_size is not None:
        raise ValueError("epoch_size needs resampled=True (a finite shard list ends "
                         "when its shards do)")
    return ShardListMode(urls or [], resampled, epoch_size)


def pad_skipped(samples: list, fallback: list | None) -> list:
    """``samples`` with skipped (None) slots filled by repeating good ones (of this
    batch, else ``fallback``: an earlier good sample, widened as it may be narrow), so
    batch counts and sizes stay equal across ranks."""
    if None not in samples:
        return samples
    good = [s for s in samples if s is not None] or [widen(s) for s in fallback or ()]
    if not good:
        raise CorruptShardError("every sample so far was skipped after errors; no "
                                "sample to pad with (see the warnings above)")
    return [s if s is not None else good[i % len(good)] for i, s in enumerate(samples)]
