"""Pipeline stages: the exact epoch layout and order, and shard-level stages.

Exact mode (a manifest gives every count up front)
---------------------------------------------------
An epoch is one global sequence ``G`` of the dataset's ``N`` samples:

1. shards in an order permuted by ``(seed, epoch)``, laid end to end;
2. inside each shard, blocks in an order permuted by ``(seed, epoch, shard)``
   (``block_shuffle``; cheap decorrelation, whole blocks stay contiguous);
3. positions permuted inside fixed windows of ``shuffle_buffer`` positions
   by ``(seed, epoch, window)`` -- a resumable stand-in for a shuffle buffer.

``G`` does not depend on world size or worker count. :class:`Layout` cuts
``G[start:]`` into *units* (a batch, or one sample) dealt round-robin: global
unit ``g`` goes to rank ``g % world_size`` as its unit ``g // world_size``,
and rank unit ``j`` is produced by worker ``j % num_workers`` -- exactly the
order in which a DataLoader collects from its workers. So every rank yields
the same count, every sample appears once (minus the dropped / plus the
padded remainder), and after each rank consumed ``k`` units the consumed
samples are the prefix ``G[:start + k * world_size * unit]``: the resume
state is one integer, valid for any world size or worker count.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Layout", "EpochOrder", "split_shards", "resampled_shards", "buffer_shuffle",
           "batched", "limit"]

_SHARD_TAG, _BLOCK_TAG, _WINDOW_TAG, _BUFFER_TAG, _RESAMPLE_TAG = 1, 2, 3, 4, 5


def rng_for(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints (seed, epoch, tag, ...)."""
    return np.random.default_rng([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])


# ---------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """How ``G[start:]`` is cut into equal per-rank units (see module docstring).

    ``remainder="drop"`` gives each rank ``(N - start) // world_size`` samples;
    ``"pad"`` gives ``ceil`` of it, repeating samples from the start of ``G``.
    With ``drop_last`` a partial last unit is dropped, else each rank's last
    unit holds ``last_size`` samples.
    """

    num_samples: int
    start: int
    world_size: int
    unit: int
    drop_last: bool
    remainder: str

    @property
    def per_rank(self) -> int:
        rest = max(self.num_samples - self.start, 0)
        if self.remainder == "pad":
            return -(-rest // self.world_size)
        return rest // self.world_size

    @property
    def num_units(self) -> int:
        """Units per rank (batches in batch mode, samples otherwise)."""
        if self.drop_last:
            return self.per_rank // self.unit
        return -(-self.per_rank // self.unit)

    @property
    def last_size(self) -> int:
        if self.drop_last or self.num_units == 0:
            return self.unit
        return self.per_rank - (self.num_units - 1) * self.unit

    def span(self, rank: int, j: int) -> tuple[int, int]:
        """(first position in G, size) of rank ``rank``'s unit ``j``."""
        full = self.num_units - 1
        g = j * self.world_size + rank
        if j < full or self.drop_last:
            return self.start + g * self.unit, self.unit
        base = self.start + full * self.world_size * self.unit
        return base + (g - full * self.world_size) * self.last_size, self.last_size

    def units_of(self, rank: int, worker: int, num_workers: int) -> range:
        """The rank units one worker produces, in order."""
        return range(worker, self.num_units, num_workers)

    def consumed_after(self, units: int) -> int | None:
        """Prefix of G consumed when every rank consumed ``units``; None: epoch done."""
        if units >= self.num_units:
            return None
        return self.start + units * self.world_size * self.unit


# ---------------------------------------------------------------- epoch order
class EpochOrder:
    """Maps positions of G to (shard, shard-local sample) for one epoch.

    ``counts``: samples per shard in manifest order; ``block_firsts(shard)``
    returns that shard's ``block_first`` array (only needed with block shuffle).
    """

    def __init__(self, counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool,
                 block_shuffle: bool, window: int,
                 block_firsts: Callable[[int], np.ndarray] | None = None) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.seed, self.epoch, self.window = seed, epoch, window
        self.block_shuffle = shuffle and block_shuffle
        n = len(self.counts)
        self.order = rng_for(seed, epoch, _SHARD_TAG).permutation(n) if shuffle else np.arange(n)
        self.cum = np.concatenate([[0], np.cumsum(self.counts[self.order])])
        self._block_firsts = block_firsts
        self._shard_orders: dict[int, np.ndarray] = {}
        self._windows: dict[int, np.ndarray] = {}

    def _window_perm(self, w: int) -> np.ndarray:
        perm = self._windows.get(w)
        if perm is None:
            size = min(self.window, self.num_samples - w * self.window)
            perm = rng_for(self.seed, self.epoch, _WINDOW_TAG, w).permutation(size)
            if len(self._windows) > 8:
                self._windows.clear()
            self._windows[w] = perm
        return perm

    def _shard_order(self, shard: int) -> np.ndarray:
        """Shard-local sample ordinals in block-shuffled order."""
        order = self._shard_orders.get(shard)
        if order is None:
            n = int(self.counts[shard])
            firsts = np.asarray(self._block_firsts(shard), dtype=np.int64)  # type: ignore[misc]
            perm = rng_for(self.seed, self.epoch, _BLOCK_TAG, shard).permutation(len(firsts))
            sizes = np.diff(np.append(firsts, n))
            starts = np.repeat(firsts[perm], sizes[perm])
            within = np.arange(n) - np.repeat(np.cumsum(sizes[perm]) - sizes[perm], sizes[perm])
            order = starts + within
            if len(self._shard_orders) > 64:
                self._shard_orders.clear()
            self._shard_orders[shard] = order
        return order

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, shard-local ordinals) of the samples at ``positions`` of G."""
        y = positions % self.num_samples
        if self.window > 1:
            w = y // self.window
            if w[0] == w[-1]:
                y = w[0] * self.window + self._window_perm(int(w[0]))[y - w[0] * self.window]
            else:
                y = y.copy()
                for wi in np.unique(w):
                    sel = w == wi
                    y[sel] = wi * self.window + self._window_perm(int(wi))[y[sel] - wi * self.window]
        k = np.searchsorted(self.cum, y, side="right") - 1
        shards = self.order[k]
        local = y - self.cum[k]
        if self.block_shuffle:
            for s in np.unique(shards):
                sel = shards == s
                local[sel] = self._shard_order(int(s))[local[sel]]
        return shards, local


# ---------------------------------------------------------------- shard-level stages
def split_shards(urls: Sequence[str], *, rank: int, world_size: int, worker: int,
                 num_workers: int, seed: int, epoch: int, shuffle: bool) -> list[str]:
    """Shuffle shards by (seed, epoch), then keep this rank's and worker's share."""
    order = list(urls)
    if shuffle:
        order = [order[i] for i in rng_for(seed, epoch, _SHARD_TAG).permutation(len(order))]
    return order[rank::world_size][worker::num_workers]


def resampled_shards(urls: Sequence[str], *, seed: int, epoch: int, rank: int,
                     worker: int) -> Iterator[str]:
    """Endless shards drawn with replacement, seeded per (seed, epoch, rank, worker)."""
    rng = rng_for(seed, epoch, _RESAMPLE_TAG, rank, worker)
    while True:
        for i in rng.integers(0, len(urls), 1024):
            yield urls[int(i)]


def buffer_shuffle(data: Iterable[Any], size: int, *, seed: int, epoch: int, rank: int,
                   worker: int) -> Iterator[Any]:
    """Deterministic buffer shuffle (webdataset's algorithm, seeded per reader)."""
    import webdataset as wds

    rng = random.Random(hash((seed, epoch, _BUFFER_TAG, rank, worker)))
    return wds.filters._shuffle(iter(data), bufsize=size, initial=min(size, 100), rng=rng)


def batched(data: Iterable[dict], size: int, collate: Callable[[list], Any], *,
            partial: bool) -> Iterator[Any]:
    """Group samples into lists of ``size`` and collate each."""
    batch: list = []
    for sample in data:
        batch.append(sample)
        if len(batch) == size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)


def limit(data: Iterable[Any], n: int) -> Iterator[Any]:
    """The first ``n`` items."""
    if n <= 0:
        return
    for i, item in enumerate(data, 1):
        yield item
        if i >= n:
            return
