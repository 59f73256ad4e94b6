"""The order of a mixture's epoch: sources interleaved (:class:`MixOrder`), each in its
own endless sequence (:class:`SourceOrder`), as one sequence (:class:`MixSequence`) of
the whole epoch or, on several nodes, of one node's share of every source.

On ``nodes > 1`` node ``n`` reads the slots ``[cut_n, cut_n+1)`` of the epoch's
``T`` (the cuts of :mod:`shardstream.read.nodes`): ``c_i,n`` of them from source ``i``,
given by the interleave's exact prefix counts, so each node's sequence has the size a
single dataset's would and the node layout, resume and resize work unchanged. Source
``i`` on node ``n`` reads only node ``n``'s share of source ``i``'s shards
(:func:`~shardstream.read.nodes.node_shares`, in the node's chunk order), up- or
downsampled by ``c_i,n`` against that share exactly as a whole source is against ``N_i``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from shardstream.read.nodes import GOLDEN_MIX, NodeOrder, cut_points, node_shares
from shardstream.read.order import EpochOrder, first_use, rng_for

__all__ = ["MixOrder", "SourceOrder", "MixSequence"]

_MIX_TAG, _PHASE_TAG = 11, 12


class MixOrder:
    """Maps positions of one epoch's mixed ``G`` to (source, ordinal in its epoch sequence)."""

    def __init__(self, counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool,
                 window: int) -> None:
        self.counts = [int(c) for c in counts]
        self.total = sum(self.counts)
        self.seed, self.epoch, self.shuffle, self.window = seed, epoch, shuffle, window
        rest, self.phases = self.total, []
        rng = rng_for(seed, epoch, _PHASE_TAG)
        for c in self.counts[:-1]:  # a phase in [0, rest) per nested split
            self.phases.append(int(rng.integers(0, rest)) if shuffle and rest else rest // 2)
            rest -= c
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def prefix(self, b: int) -> list[int]:
        """Slots of each source among the first ``b`` of G (exact Python ints)."""
        out, rest_b, rest_t = [], b, self.total
        for c, h in zip(self.counts[:-1], self.phases):
            p = (c * rest_b + h) // rest_t if rest_t else 0
            out.append(p)
            rest_b, rest_t = rest_b - p, rest_t - c
        out.append(rest_b)
        return out

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, ordinal in that source's sequence) of window ``w``."""
        got = self._cache.get(w)
        if got is not None:
            return got
        a = w * self.window
        lo, hi = self.prefix(a), self.prefix(min(a + self.window, self.total))
        n = np.asarray([h - l for l, h in zip(lo, hi)], dtype=np.int64)
        k = len(n)
        if self.shuffle:
            labels = rng_for(self.seed, self.epoch, _MIX_TAG, w).permutation(
                np.repeat(np.arange(k, dtype=np.int64), n))
        else:  # spread evenly: slot j of source i sits at (j + 0.5) / n_i
            keys = np.concatenate([(np.arange(m) + 0.5) / m for m in n.tolist() if m])
            labels = np.repeat(np.arange(k, dtype=np.int64), n)[np.argsort(keys, kind="stable")]
        idx = np.argsort(labels, kind="stable")
        firsts = np.concatenate([[0], np.cumsum(n)[:-1]])
        ordinal = np.empty(len(labels), dtype=np.int64)
        ordinal[idx] = np.arange(len(labels)) - firsts[labels[idx]]
        ordinal += np.asarray(lo, dtype=np.int64)[labels]
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[w] = (labels, ordinal)
        return labels, ordinal

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, ordinals within each source's epoch sequence) at ``positions``."""
        y = np.asarray(positions, dtype=np.int64) % self.total
        w = y // self.window
        if w[0] == w[-1] and (len(w) < 3 or not np.any(w != w[0])):  # one window: fast path
            labels, ordinal = self._window(int(w[0]))
            off = y - int(w[0]) * self.window
            return labels[off], ordinal[off]
        src = np.empty(len(y), dtype=np.int64)
        ordn = np.empty(len(y), dtype=np.int64)
        for wi in np.unique(w).tolist():
            sel = w == wi
            labels, ordinal = self._window(wi)
            off = y[sel] - wi * self.window
            src[sel], ordn[sel] = labels[off], ordinal[off]
        return src, ordn


class SourceOrder:
    """One source's endless sequence (its single-source epochs end to end)."""

    def __init__(self, counts: Sequence[int], block_firsts: Callable[[int], np.ndarray] | None,
                 *, count: int, seed: int, shuffle: bool, block_shuffle: bool, window: int,
                 nodes: int = 1, node: int = 0, shares: str = "fixed") -> None:
        self.counts = [int(c) for c in counts]
        self.count = count
        self.nodes, self.node, self.shares = nodes, node, shares
        total = sum(self.counts)
        cuts = cut_points(total, nodes)
        self.size = int(cuts[node + 1] - cuts[node])  # node's share (all on one node)
        self.block_firsts = block_firsts
        self.kw = dict(seed=seed, shuffle=shuffle, window=window)
        self.block_shuffle = block_shuffle and block_firsts is not None
        self._orders: dict[int, Any] = {}

    def _order(self, q: int) -> Any:
        order = self._orders.get(q)
        if order is None:
            if len(self._orders) > 4:
                self._orders.clear()
            if self.nodes == 1:
                order = EpochOrder(self.counts, epoch=q, **self.kw,  # type: ignore[arg-type]
                                   block_shuffle=self.block_shuffle,
                                   block_firsts=self.block_firsts)
            else:
                pieces = node_shares(self.counts, self.nodes, seed=self.kw["seed"], epoch=q,
                                     shuffle=self.kw["shuffle"], shares=self.shares)[self.node]
                order = NodeOrder(pieces, epoch=q, node=self.node, **self.kw)  # type: ignore
            self._orders[q] = order
        return order

    def locate(self, epoch: int, ordinals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, shard-local ordinals) of mixture epoch ``epoch``'s ``ordinals``."""
        n, c = self.size, self.count
        if c >= n:  # upsampled: a fresh pass starts every mixture epoch
            q, within = epoch * -(-c // n) + ordinals // n, ordinals % n
        else:  # downsampled: continue the endless sequence
            g = epoch * c + ordinals
            q, within = g // n, g % n
        if q[0] == q[-1]:
            return self._order(int(q[0])).locate(within)
        shards = np.empty(len(q), dtype=np.int64)
        local = np.empty(len(q), dtype=np.int64)
        for qi in np.unique(q).tolist():
            sel = q == qi
            shards[sel], local[sel] = self._order(qi).locate(within[sel])
        return shards, local


class MixSequence:
    """One node's (or the whole epoch's) mixed sequence: positions -> (shard id among
    all sources' shards end to end, shard-local ordinal); see the module docstring."""

    def __init__(self, mixture: Any, *, epoch: int, seed: int, shuffle: bool,
                 block_shuffle: bool, shuffle_buffer: int,
                 block_firsts: Callable[[int], np.ndarray] | None = None, nodes: int = 1,
                 node: int = 0, shares: str = "fixed") -> None:
        self.epoch = epoch
        counts = [int(c) for c in mixture.counts]
        sizes = [[s.num_samples for s in d.manifest.shards] for d in mixture.datasets]
        self.offsets = np.cumsum([0] + [len(c) for c in sizes[:-1]]).tolist()
        if nodes > 1:  # this node's slots of every source, by the interleave's prefix
            whole = MixOrder(counts, seed=seed, epoch=epoch, shuffle=shuffle,
                             window=mixture.window)
            cuts = cut_points(sum(counts), nodes)
            lo, hi = whole.prefix(int(cuts[node])), whole.prefix(int(cuts[node + 1]))
            counts = [h - l for l, h in zip(lo, hi)]
        mix_seed = (seed ^ (node + 1) * GOLDEN_MIX) & ((1 << 64) - 1) if nodes > 1 else seed
        self.mix = MixOrder(counts, seed=mix_seed, epoch=epoch, shuffle=shuffle,
                            window=mixture.window)
        self.num_samples = self.mix.total
        self.orders = [SourceOrder(c, _shifted(block_firsts, off), count=k, seed=seed,
                                   shuffle=shuffle, block_shuffle=block_shuffle,
                                   window=shuffle_buffer if shuffle else 1, nodes=nodes,
                                   node=node, shares=shares)
                       for c, off, k in zip(sizes, self.offsets, counts)]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids over all sources, shard-local ordinals) at ``positions``."""
        src, ordinal = self.mix.locate(positions)
        shards = np.empty(len(src), dtype=np.int64)
        local = np.empty(len(src), dtype=np.int64)
        for i in np.flatnonzero(np.bincount(src, minlength=len(self.orders))).tolist():
            sel = src == i
            sh, local[sel] = self.orders[i].locate(self.epoch, ordinal[sel])
            shards[sel] = sh + self.offsets[i]
        return shards, local

    def shards_at(self, positions: np.ndarray) -> np.ndarray:
        return self.locate(positions)[0]

    def first_use(self, positions: Any) -> Any:
        return first_use(self.shards_at, positions)


def _shifted(block_firsts: Callable[[int], np.ndarray] | None, offset: int
             ) -> Callable[[int], np.ndarray] | None:
    """A source's ``block_firsts`` by its own shard ids, from the reader's global ones."""
    if block_firsts is None:
        return None
    return lambda s: block_firsts(offset + s)

