"""Node-local epochs: each node reads its share of the shards, every global batch
mixes all shares.

With ``nodes > 1`` an exact epoch is laid out per node instead of as one global
sequence:

1. **Shares.** The shards, permuted by ``seed`` (``shares="fixed"``: the same for
   every epoch, so a node's cache serves all epochs) or by ``(seed, epoch)``
   (``shares="epoch"``), are laid end to end and cut into ``nodes`` runs of
   ``N // nodes`` or ``N // nodes + 1`` samples; a shard at a cut is split between
   two nodes by samples (each reads its part through the index).
2. **The node's sequence.** :class:`NodeOrder` cuts the share into chunks of
   :data:`CHUNK` samples, permutes them across all the node's shards and then the
   positions in windows of ``shuffle_buffer`` (a block shuffle, then windows), so a
   window, and the rank batches cut from it, spans most of the node's shards.
3. **Equal units.** Every node's sequence counts as ``M`` samples
   (:func:`node_length`: ``ceil(N / nodes)`` with ``remainder="pad"``, shorter
   sequences wrapping round; ``N // nodes`` with ``"drop"``) and is cut by a
   :class:`~shardstream.read.order.Layout` over the node's local ranks. Every rank
   gets the same number of units; step ``j`` of every rank reads unit ``j`` of its
   node, so one global batch draws from every share. Fewer than ``world_size``
   samples are repeated (pad) or dropped (drop) per epoch.

A resume state is one offset into every node's sequence, valid for any number of
local ranks, workers or batch size. Into another number of nodes, the rest of the
epoch is cut anew (:func:`remaining`): the samples no node has read yet, grouped by
old node and shard, are cut into the new number of contiguous runs (each keeping the
order its samples had), so each new node again reads about its share of what is left.
Mixtures and shard lists are laid out as before (one global sequence).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from shardstream.read.order import EpochOrder, first_use, rng_for

__all__ = ["SHARE_TAG", "STAGGER_TAG", "SHARES", "CHUNK", "Pieces", "node_shares", "node_length", "NodeOrder",
           "ListOrder", "remaining", "left_after", "cache_needed", "NextUse",
           "cut_points", "GOLDEN_MIX"]

SHARE_TAG, STAGGER_TAG = 6, 7
SHARES = ("fixed", "epoch")
#: samples per chunk of a node's sequence: permuted across the node's shards, read as a
#: run (a chunk spans one or two blocks of a shard), so a window mixes many shards
CHUNK = 64
_GOLDEN = GOLDEN_MIX = 0x9E3779B97F4A7C15  # spreads node ids over the seed space
_MASK = (1 << 64) - 1

#: one share: (shard ids, first shard-local sample, end) of its pieces, in share order
Pieces = tuple[np.ndarray, np.ndarray, np.ndarray]


def node_shares(counts: Sequence[int], nodes: int, *, seed: int, epoch: int, shuffle: bool,
                shares: str = "fixed") -> list[Pieces]:
    """Each node's share of the shards (see the module docstring, step 1)."""
    counts = np.asarray(counts, dtype=np.int64)
    if shuffle:
        drawn = 0 if shares == "fixed" else epoch
        order = rng_for(seed, drawn, SHARE_TAG).permutation(len(counts))
    else:
        order = np.arange(len(counts))
    c = counts[order]
    ends = np.cumsum(c)
    starts = ends - c
    total = int(ends[-1]) if len(ends) else 0
    cuts = cut_points(total, nodes)
    out = []
    for n in range(nodes):
        a, b = int(cuts[n]), int(cuts[n + 1])
        i0 = int(np.searchsorted(ends, a, side="right"))
        i1 = int(np.searchsorted(starts, b, side="left"))
        k = np.arange(i0, i1)
        lo = np.maximum(a - starts[k], 0)
        hi = np.minimum(b - starts[k], c[k])
        keep = hi > lo
        out.append((order[k][keep], lo[keep], hi[keep]))
    return out


def node_length(num_samples: int, nodes: int, remainder: str) -> int:
    """Samples every node's sequence counts as, so all ranks get equal units."""
    return -(-num_samples // nodes) if remainder == "pad" else num_samples // nodes


def staggered(piece: np.ndarray, first: np.ndarray, per: np.ndarray, live: int,
              rng: np.random.Generator) -> np.ndarray:
    """The order of a node's chunks: chunk ``first[c]`` of piece ``piece[c]`` (of
    ``per[p]`` chunks) at ``t_p + (first + jitter) * gap_p`` round a circle of all
    ``C`` chunks, ``t_p`` random and ``gap_p = min(live, C / per[p])``: each piece's
    chunks are spread over ``per * live`` places, so about ``live`` shards are read at
    any time (what the cache holds) and each of them about once every ``live`` chunks;
    a share with fewer chunks than that is spread evenly (stratified) over the epoch."""
    c = len(piece)
    if c == 0:
        return np.zeros(0, np.int64)
    start = rng.random(len(per)) * c
    gap = np.minimum(float(live), c / np.maximum(per, 1))
    key = (start[piece] + (first + rng.random(c)) * gap[piece]) % c
    return np.argsort(key, kind="stable")


class NodeOrder:
    """One node's share as a sequence, in its epoch order: positions -> (shard, sample).

    The share's pieces are cut into chunks of :data:`CHUNK` consecutive samples; when
    shuffling, the chunks of all the node's shards are permuted by (seed, epoch, node)
    and the positions then permuted inside windows of ``window`` (a block shuffle
    across shards, then windows), so a window spans most of the node's shards while
    each chunk is still read as a run from one or two blocks. No index is needed to
    know the order. Positions are taken modulo the share's size (pads wrap round)."""

    def __init__(self, pieces: Pieces, *, seed: int, epoch: int, node: int, shuffle: bool,
                 window: int) -> None:
        shard, lo, hi = pieces
        counts = hi - lo
        self.num_samples = int(counts.sum())
        per = -(-counts // CHUNK)  # chunks per piece
        piece = np.repeat(np.arange(len(counts)), per)
        first = np.arange(len(piece)) - np.repeat(np.cumsum(per) - per, per)
        offset = first * CHUNK
        self.chunk_shard = shard[piece]
        self.chunk_lo = lo[piece] + offset
        sizes = np.minimum(CHUNK, counts[piece] - offset)
        seed = (seed ^ (node + 1) * _GOLDEN) & _MASK
        order = None
        if shuffle:
            live = max(1, window // CHUNK)
            order = staggered(piece, first, per, live, rng_for(seed, epoch, STAGGER_TAG))
        self.inner = EpochOrder(sizes.tolist(), seed=seed, epoch=epoch, shuffle=shuffle,
                                block_shuffle=False, window=window, order=order,
                                stratified=shuffle)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, shard-local ordinals) of the samples at ``positions``."""
        chunk, local = self.inner.locate(positions)
        return self.chunk_shard[chunk], self.chunk_lo[chunk] + local

    def shards_at(self, positions: np.ndarray) -> np.ndarray:
        """Shard ids of the samples at ``positions``."""
        return self.chunk_shard[self.inner.shards_at(positions)]

    def first_use(self, positions: Iterable[np.ndarray]) -> Iterator[int]:
        """Shard ids in the order the batches of ``positions`` first touch them."""
        return first_use(self.shards_at, positions)


class ListOrder:
    """A sequence given as explicit (shard, sample) arrays: the rest of a resumed epoch."""

    def __init__(self, shards: np.ndarray, local: np.ndarray) -> None:
        self.shards, self.local = shards, local
        self.num_samples = len(shards)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.asarray(positions, dtype=np.int64) % max(self.num_samples, 1)
        return self.shards[i], self.local[i]

    def shards_at(self, positions: np.ndarray) -> np.ndarray:
        return self.locate(positions)[0]

    def first_use(self, positions: Iterable[np.ndarray]) -> Iterator[int]:
        return first_use(self.shards_at, positions)


def remaining(orders: Sequence[NodeOrder | ListOrder], consumed: int, nodes: int
              ) -> list[ListOrder]:
    """The rest of an epoch whose node sequences ``orders`` were each read up to
    ``consumed``, cut anew for ``nodes`` nodes (see the module docstring).

    The unread samples, grouped by old node and then by shard, are cut into ``nodes``
    contiguous runs of near-equal size, so a new node gets whole shards (but for the
    two at its cuts); inside a run the samples keep the order they had."""
    shard_parts, local_parts, node_parts = [], [], []
    for k, order in enumerate(orders):
        rest = np.arange(min(consumed, order.num_samples), order.num_samples, dtype=np.int64)
        s, i = order.locate(rest)
        shard_parts.append(s)
        local_parts.append(i)
        node_parts.append(np.full(len(s), k, dtype=np.int64))
    if not shard_parts or not sum(len(p) for p in shard_parts):
        empty = np.zeros(0, np.int64)
        return [ListOrder(empty, empty) for _ in range(nodes)]
    shards, local = np.concatenate(shard_parts), np.concatenate(local_parts)
    key = np.concatenate(node_parts) * (int(shards.max()) + 1) + shards
    grouped = np.argsort(key, kind="stable")  # by (old node, shard), in order inside
    cuts = cut_points(len(shards), nodes)
    out = []
    for n in range(nodes):
        idx = np.sort(grouped[cuts[n]:cuts[n + 1]])  # back in the order they had
        out.append(ListOrder(shards[idx], local[idx]))
    return out


def cut_points(total: int, nodes: int) -> np.ndarray:
    """Where ``total`` samples are cut into ``nodes`` contiguous runs (every cut here)."""
    return np.arange(nodes + 1, dtype=np.int64) * total // nodes


def left_after(num_samples: int, chain: Sequence[tuple[int, int]]) -> int:
    """Samples of an epoch not read yet after each (nodes, consumed) part of ``chain``:
    what :func:`remaining` cuts anew (from sizes alone; no order is built)."""
    total = num_samples
    for nodes, consumed in chain:
        total = int(np.maximum(np.diff(cut_points(total, nodes)) - consumed, 0).sum())
    return total


def cache_needed(order: EpochOrder | NodeOrder | ListOrder, shard_bytes: np.ndarray,
                 window: int, read_ahead: int) -> int:
    """Bytes of node cache ``order``'s schedule needs at once: the shards any two
    consecutive windows of ``window`` positions touch (readers are in one window, or
    crossing into the next), plus ``read_ahead`` of the largest shards. At most 4,096
    steps per epoch: a longer step (an unshuffled epoch) only counts a few more shards."""
    n = order.num_samples
    win = max(window, 2, -(-n // 4096))
    need, prev = 0, np.zeros(0, np.int64)
    for a in range(0, n, win):
        cur = np.unique(order.shards_at(np.arange(a, min(a + win, n), dtype=np.int64)))
        need = max(need, int(shard_bytes[np.union1d(prev, cur)].sum()))
        prev = cur
    ahead = np.sort(shard_bytes)[::-1][:read_ahead]
    return need + int(ahead.sum())


class NextUse:
    """When a node's schedule next needs each cached shard: the cache evicts the entry
    needed last (or never again this epoch) first, Belady's rule on a known schedule.

    ``shards_at`` maps positions of the node's sequence to shard ids; the schedule is
    positions ``start .. end``; ``position()`` is where this process reads now (the
    node's processes read within a few batches of each other); ``entries()`` maps cache
    entry names to shard ids. Built on first use, at a resolution of ``step`` positions
    (the shuffle window, at least 64, at most 4,096 steps per epoch).
    """

    def __init__(self, shards_at: Callable[[np.ndarray], np.ndarray], start: int, end: int,
                 position: Callable[[], int], entries: Callable[[], dict[str, int]], *,
                 window: int = 1) -> None:
        self._shards_at, self._start, self._end = shards_at, start, end
        self.step = max(window, 64, -(-(end - start) // 4096))
        self._position, self._entries_of = position, entries
        self._built: tuple[dict[str, int], np.ndarray, np.ndarray] | None = None

    def _build(self) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
        shards, steps = [], []
        for k, a in enumerate(range(self._start, self._end, self.step)):
            u = np.unique(self._shards_at(np.arange(a, min(a + self.step, self._end),
                                                    dtype=np.int64)))
            shards.append(u)
            steps.append(np.full(len(u), k, dtype=np.int64))
        s = np.concatenate(shards) if shards else np.zeros(0, np.int64)
        k = np.concatenate(steps) if steps else np.zeros(0, np.int64)
        by = np.lexsort((k, s))  # by shard, then step
        return self._entries_of(), s[by], k[by]

    def __call__(self, entry: str) -> float:
        """Steps until ``entry`` (a cache entry's path or name) is needed again; inf for
        an entry this schedule does not need again (another dataset's, or passed)."""
        if self._built is None:
            self._built = self._build()
        s = self._built[0].get(os.path.basename(entry))
        return float("inf") if s is None else self.steps(s)

    def steps(self, s: int) -> float:
        """Steps until shard ``s`` is needed again (0: in this step); inf: not again."""
        if self._built is None:
            self._built = self._build()
        _, shards, steps = self._built
        now = max(self._position() - self._start, 0) // self.step
        lo, hi = np.searchsorted(shards, [s, s + 1])
        i = lo + int(np.searchsorted(steps[lo:hi], now))
        return float(steps[i] - now) if i < hi else float("inf")
