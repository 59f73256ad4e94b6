"""Node-local epochs: each node reads its share of the shards, every global batch
mixes all shares.

With ``nodes > 1`` an exact epoch is laid out per node instead of as one global
sequence:

1. **Shares.** The shards, permuted by ``seed`` (``shares="fixed"``: the same for
   every epoch, so a node's cache serves all epochs) or by ``(seed, epoch)``
   (``shares="epoch"``), are laid end to end and cut into ``nodes`` runs of
   ``N // nodes`` or ``N // nodes + 1`` samples; a shard at a cut is split between
   two nodes by samples (each reads its part through the index).
2. **The node's sequence.** :class:`NodeOrder` orders one share like an epoch of its
   own (:class:`~shardstream.read.order.EpochOrder` over the share's pieces: pieces
   permuted, blocks shuffled, samples permuted in windows of ``shuffle_buffer``), so
   a window, and the rank batches cut from it, spans many of the node's shards.
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

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from shardstream.read.order import EpochOrder, rng_for

__all__ = ["SHARE_TAG", "SHARES", "Pieces", "node_shares", "node_length", "NodeOrder",
           "ListOrder", "remaining", "left_after"]

SHARE_TAG = 6
SHARES = ("fixed", "epoch")
_GOLDEN = 0x9E3779B97F4A7C15  # spreads node ids over the seed space
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
    cuts = np.arange(nodes + 1, dtype=np.int64) * total // nodes
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


class NodeOrder:
    """One node's share as a sequence, in its epoch order: positions -> (shard, sample).

    Positions are taken modulo the share's size (a pad position wraps round)."""

    def __init__(self, pieces: Pieces, *, seed: int, epoch: int, node: int, shuffle: bool,
                 block_shuffle: bool, window: int,
                 block_firsts: Callable[[int], np.ndarray] | None = None) -> None:
        self.shard, self.lo, hi = pieces
        self.num_samples = int((hi - self.lo).sum())
        self._block_firsts = block_firsts
        self._hi = hi
        self.inner = EpochOrder((hi - self.lo).tolist(), seed=(seed ^ (node + 1) * _GOLDEN) & _MASK,
                                epoch=epoch, shuffle=shuffle, block_shuffle=block_shuffle,
                                window=window,
                                block_firsts=self._piece_firsts if block_firsts else None)

    def _piece_firsts(self, p: int) -> np.ndarray:
        """The blocks of piece ``p``: its shard's blocks, cut to the piece."""
        firsts = np.asarray(self._block_firsts(int(self.shard[p])), dtype=np.int64)  # type: ignore[misc]
        lo, hi = int(self.lo[p]), int(self._hi[p])
        return np.concatenate([[0], firsts[(firsts > lo) & (firsts < hi)] - lo])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, shard-local ordinals) of the samples at ``positions``."""
        piece, local = self.inner.locate(positions)
        return self.shard[piece], self.lo[piece] + local

    def first_use(self, positions: Iterable[np.ndarray]) -> Iterator[int]:
        """Shard ids in the order the batches of ``positions`` first touch them."""
        seen: set[int] = set()
        for p in self.inner.first_use(positions):
            s = int(self.shard[p])
            if s not in seen:
                seen.add(s)
                yield s


class ListOrder:
    """A sequence given as explicit (shard, sample) arrays: the rest of a resumed epoch."""

    def __init__(self, shards: np.ndarray, local: np.ndarray) -> None:
        self.shards, self.local = shards, local
        self.num_samples = len(shards)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.asarray(positions, dtype=np.int64) % max(self.num_samples, 1)
        return self.shards[i], self.local[i]

    def first_use(self, positions: Iterable[np.ndarray]) -> Iterator[int]:
        seen: set[int] = set()
        for pos in positions:
            shards = self.locate(pos)[0]
            u, first = np.unique(shards, return_index=True)
            for s in u[np.argsort(first)].tolist():
                if s not in seen:
                    seen.add(s)
                    yield s


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
    cuts = np.arange(nodes + 1, dtype=np.int64) * len(shards) // nodes
    out = []
    for n in range(nodes):
        idx = np.sort(grouped[cuts[n]:cuts[n + 1]])  # back in the order they had
        out.append(ListOrder(shards[idx], local[idx]))
    return out


def _cut(total: int, nodes: int) -> np.ndarray:
    """Sizes of ``total`` cut into ``nodes`` contiguous runs (as every cut here is)."""
    return np.diff(np.arange(nodes + 1, dtype=np.int64) * total // nodes)


def left_after(num_samples: int, chain: Sequence[tuple[int, int]]) -> int:
    """Samples of an epoch not read yet after each (nodes, consumed) part of ``chain``:
    what :func:`remaining` cuts anew (from sizes alone; no order is built)."""
    total = num_samples
    for nodes, consumed in chain:
        total = int(np.maximum(_cut(total, nodes) - consumed, 0).sum())
    return total
