"""The epoch layout: which sample each position of an epoch reads, and which
positions each rank, worker and batch gets.

:class:`EpochOrder` maps a position of the epoch's global sequence G to (shard,
sample): shards permuted by (seed, epoch), blocks optionally permuted, samples
permuted inside windows. :class:`Layout` cuts G into units (batches or samples)
dealt round-robin to ranks, exact and equal per rank, resumable at any offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Layout", "EpochOrder", "first_use", "first_use_at", "rng_for", "SHARD_TAG",
           "BLOCK_TAG", "WINDOW_TAG", "BUFFER_TAG", "RESAMPLE_TAG"]


SHARD_TAG, BLOCK_TAG, WINDOW_TAG, BUFFER_TAG, RESAMPLE_TAG = 1, 2, 3, 4, 5

# Bounds, in entries, of EpochOrder's two caches; a full cache is emptied before the
# next entry goes in. Entries are rebuilt on demand, so a bound trades memory for
# rebuilding and never changes a result. A reader walks G forward a batch (or a chunk
# of samples) at a time, so it needs the one or two windows it is in, and the shards
# those windows reach into.
# Window permutations: ``window`` int64 each (64 KiB at shuffle_buffer=8192).
_WINDOW_CACHE = 8
# Block-shuffled shard orders: one int64 per sample of the shard; a window over many
# small shards reaches dozens of them at once.
_SHARD_ORDER_CACHE = 64


def rng_for(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints (seed, epoch, tag, ...)."""
    return np.random.default_rng([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])


def first_use(shards_at: Callable[[np.ndarray], np.ndarray],
              positions: Iterable[np.ndarray]) -> Iterator[int]:
    """Shard ids (``shards_at`` of each batch of ``positions``) in the order the batches
    first touch them, each once."""
    seen: set[int] = set()
    for pos in positions:
        u, first = np.unique(shards_at(pos), return_index=True)
        for s in u[np.argsort(first)].tolist():
            if s not in seen:
                seen.add(s)
                yield s


def first_use_at(shards_at: Callable[[np.ndarray], np.ndarray], start: int, end: int,
                 step: int = 4096) -> Iterator[tuple[int, int]]:
    """``(shard id, position of first use)`` over positions ``start .. end`` of a schedule,
    in that order, each shard once: what a node's read-ahead walks."""
    seen: set[int] = set()
    for a in range(start, end, step):
        u, first = np.unique(shards_at(np.arange(a, min(a + step, end), dtype=np.int64)),
                             return_index=True)
        for k in np.argsort(first).tolist():
            s = int(u[k])
            if s not in seen:
                seen.add(s)
                yield s, a + int(first[k])


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
    Positions may come in any order and are taken modulo N (pad positions wrap).
    """

    def __init__(self, counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool,
                 block_shuffle: bool, window: int,
                 block_firsts: Callable[[int], np.ndarray] | None = None,
                 order: np.ndarray | None = None, stratified: bool = False) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.seed, self.epoch, self.window = seed, epoch, window
        self.block_shuffle = shuffle and block_shuffle
        n = len(self.counts)
        if order is None:  # else the shards' order is given (a node's staggered chunks)
            order = rng_for(seed, epoch, SHARD_TAG).permutation(n) if shuffle else np.arange(n)
        self.order = np.asarray(order, dtype=np.int64)
        self.stratified = stratified
        self.cum = np.concatenate([[0], np.cumsum(self.counts[self.order])])
        # indexed by k = searchsorted(cum, i, "right"), 1 + the place in ``order`` of the
        # shard holding S index i: that shard, and its first S index
        self._shard_after = np.concatenate([[-1], self.order])
        self._first_after = np.concatenate([[-1], self.cum[:-1]])
        self._block_firsts = block_firsts
        self._shard_orders: dict[int, np.ndarray] = {}
        self._windows: dict[int, np.ndarray] = {}

    def _window_perm(self, w: int) -> np.ndarray:
        """The permutation of window ``w`` (the last window may be short)."""
        perm = self._windows.get(w)
        if perm is None:
            size = min(self.window, self.num_samples - w * self.window)
            rng = rng_for(self.seed, self.epoch, WINDOW_TAG, w)
            perm = self._stratified(w * self.window, size, rng) if self.stratified \
                else rng.permutation(size)
            if len(self._windows) >= _WINDOW_CACHE:
                self._windows.clear()
            self._windows[w] = perm
        return perm

    def _stratified(self, lo: int, size: int, rng: np.random.Generator) -> np.ndarray:
        """A window's permutation that deals the window's shards round robin: each
        shard's samples (in random order) at evenly spread, jittered places, so any run
        of positions draws from the shards in proportion to their part of the window."""
        k = np.searchsorted(self.cum, np.arange(lo, lo + size), side="right")  # shard slot
        slot, first, part = np.unique(k, return_index=True, return_counts=True)
        by = np.lexsort((rng.random(size), k))  # by shard, random inside
        rank = np.arange(size) - np.repeat(first, part)
        key = (rank + rng.random(size)) / np.repeat(part, part)
        return by[np.argsort(key, kind="stable")]

    def _sequence_index(self, positions: np.ndarray) -> np.ndarray:
        """For positions of G, the indexes into S, the epoch's shards end to end in
        their order, of the samples they read: each window of ``window`` positions (of
        G modulo N) reads the S indexes of its own positions, permuted."""
        n, win = self.num_samples, self.window
        if win <= 1 or len(positions) == 0:
            return positions % n
        if positions.dtype != np.int64:
            positions = positions.astype(np.int64)
        w0 = int(positions[0]) % n // win
        lo, perm = w0 * win, self._window_perm(w0)
        hi = lo + len(perm)
        # the usual batch lies in one window (so in [0, N): no modulo): its ends do, and
        # then all its offsets from lo (as unsigned, a negative one is huge)
        if lo <= int(positions[0]) < hi and lo <= int(positions[-1]) < hi:
            d = positions - lo
            if int(d.view(np.uint64).max()) < len(perm):
                return lo + perm[d]
        y = positions % n
        w = y // win
        for wi in np.unique(w).tolist():
            sel = w == wi
            y[sel] = wi * win + self._window_perm(wi)[y[sel] - wi * win]
        return y

    def _shard_order(self, shard: int) -> np.ndarray:
        """Shard-local sample ordinals in block-shuffled order."""
        order = self._shard_orders.get(shard)
        if order is None:
            n = int(self.counts[shard])
            firsts = np.asarray(self._block_firsts(shard), dtype=np.int64)  # type: ignore[misc]
            perm = rng_for(self.seed, self.epoch, BLOCK_TAG, shard).permutation(len(firsts))
            sizes = np.diff(np.append(firsts, n))
            starts = np.repeat(firsts[perm], sizes[perm])
            within = np.arange(n) - np.repeat(np.cumsum(sizes[perm]) - sizes[perm], sizes[perm])
            order = starts + within
            if len(self._shard_orders) >= _SHARD_ORDER_CACHE:
                self._shard_orders.clear()
            self._shard_orders[shard] = order
        return order

    def shards_at(self, positions: np.ndarray) -> np.ndarray:
        """Shard ids of the samples at ``positions`` (no block shuffle, no index needed)."""
        return self._shard_after[np.searchsorted(self.cum, self._sequence_index(positions),
                                                 side="right")]

    def first_use(self, positions: Iterable[np.ndarray]) -> Iterator[int]:
        """Shard ids in the order the batches of ``positions`` first touch them."""
        return first_use(self.shards_at, positions)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, shard-local ordinals) of the samples at ``positions`` of G."""
        y = self._sequence_index(positions)
        k = np.searchsorted(self.cum, y, side="right")
        shards = self._shard_after[k]
        local = y - self._first_after[k]
        if self.block_shuffle:
            for s in np.unique(shards).tolist():
                sel = shards == s
                local[sel] = self._shard_order(s)[local[sel]]
        return shards, local
