"""Properties of the epoch ordering math (:mod:`shardstream.read.order`), held directly
on :class:`EpochOrder` and :class:`Layout`, without datasets or readers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstream.read.order import EpochOrder, Layout

# ---------------------------------------------------------------- strategies
#: samples per shard: uneven, often 1, now and then 0
COUNTS = st.lists(st.one_of(st.just(1), st.integers(0, 40)), min_size=1,
                  max_size=10).filter(lambda c: sum(c) > 0)


@st.composite
def orders(draw, shuffle=st.booleans(), window=None):
    """(counts, block firsts per shard, EpochOrder keyword arguments)."""
    counts = draw(COUNTS)
    n = sum(counts)
    firsts = []
    for c in counts:  # block starts: 0, then any cut points inside the shard
        cut = draw(st.lists(st.booleans(), min_size=max(c - 1, 0), max_size=max(c - 1, 0)))
        firsts.append(np.array([0] * (c > 0) + [i + 1 for i, b in enumerate(cut) if b],
                               dtype=np.int64))
    if window is None:
        window = st.one_of(st.just(1), st.integers(1, 8), st.integers(1, n + 2),
                           st.integers(n, 10**9))
    kw = dict(seed=draw(st.integers(0, 2**64 - 1)), epoch=draw(st.integers(0, 10**6)),
              shuffle=draw(shuffle), block_shuffle=draw(st.booleans()), window=draw(window))
    return counts, firsts, kw


def make(counts, firsts, **kw) -> EpochOrder:
    return EpochOrder(counts, block_firsts=firsts.__getitem__, **kw)


def pairs(order: EpochOrder, positions) -> np.ndarray:
    """(2, len) array of (shard, local) for ``positions``."""
    shards, local = order.locate(np.asarray(positions, dtype=np.int64))
    assert shards.dtype == np.int64 and local.dtype == np.int64
    assert len(shards) == len(local) == len(positions)
    return np.stack([shards, local])


def everything(order: EpochOrder) -> np.ndarray:
    return pairs(order, np.arange(order.num_samples))


# ---------------------------------------------------------------- EpochOrder
@settings(max_examples=150, deadline=None)
@given(orders())
def test_positions_are_a_permutation_of_all_samples(case):
    counts, firsts, kw = case
    full = everything(make(counts, firsts, **kw))
    shards, local = full
    assert ((shards >= 0) & (shards < len(counts))).all()
    assert ((local >= 0) & (local < np.asarray(counts)[shards])).all()
    # N distinct (shard, sample) pairs, each a real sample: all samples, once each
    assert len({(int(s), int(i)) for s, i in full.T}) == sum(counts)


@settings(max_examples=150, deadline=None)
@given(orders(), st.data())
def test_locate_answers_any_positions_as_one_whole_epoch_call(case, data):
    """Batches of any size and place, pad positions past N (modulo N), positions in any
    order, repeats, int32: each gets what the epoch's own sequence has there.
    (Regression: a batch whose first and last positions share a window but whose others
    do not, a wrapped pad batch or an unsorted one, used to raise IndexError or read
    the wrong samples.)"""
    counts, firsts, kw = case
    n = sum(counts)
    order = make(counts, firsts, **kw)
    full = everything(make(counts, firsts, **kw))
    a = data.draw(st.integers(0, 2 * n), label="batch start")
    size = data.draw(st.integers(1, n + 8), label="batch size")
    batch = np.arange(a, a + size)
    assert (pairs(order, batch) == full[:, batch % n]).all()
    anywhere = np.array(data.draw(st.lists(st.integers(0, 3 * n), min_size=1, max_size=40),
                                  label="positions"))
    assert (pairs(order, anywhere) == full[:, anywhere % n]).all()
    shards, local = order.locate(anywhere.astype(np.int32))
    assert (np.stack([shards, local]) == full[:, anywhere % n]).all()
    assert (order.shards_at(anywhere) == full[0, anywhere % n]).all()
    assert pairs(order, []).shape == (2, 0) and order.shards_at(np.array([], np.int64)).size == 0


@settings(max_examples=150, deadline=None)
@given(orders())
def test_windows_only_permute_inside_themselves(case):
    counts, firsts, kw = case
    full = everything(make(counts, firsts, **kw))
    flat = everything(make(counts, firsts, **{**kw, "window": 1}))
    w, n = kw["window"], sum(counts)
    for a in range(0, n, w):
        got = sorted(map(tuple, full[:, a:a + w].T.tolist()))
        assert got == sorted(map(tuple, flat[:, a:a + w].T.tolist()))
    if w == 1:
        assert (full == flat).all()


@settings(max_examples=150, deadline=None)
@given(orders(window=st.just(1)))
def test_shards_in_runs_and_blocks_whole(case):
    """Without a window: shards one after another (in manifest order unless shuffled),
    each read in whole blocks, in block order unless block-shuffled."""
    counts, firsts, kw = case
    order = make(counts, firsts, **kw)
    shards, local = everything(order)
    ran = [int(s) for s, _ in itertools.groupby(shards.tolist())]
    assert ran == [s for s in order.order.tolist() if counts[s] > 0]
    assert sorted(order.order.tolist()) == list(range(len(counts)))
    if not kw["shuffle"]:
        assert ran == [s for s, c in enumerate(counts) if c > 0]
    for s in ran:
        seq = local[shards == s].tolist()
        bounds = list(firsts[s]) + [counts[s]]
        blocks, i = [], 0
        while i < len(seq):  # every block starts at its first sample and runs whole
            b = bounds.index(seq[i])
            assert seq[i:i + bounds[b + 1] - bounds[b]] == list(range(bounds[b], bounds[b + 1]))
            blocks.append(b)
            i += bounds[b + 1] - bounds[b]
        assert sorted(blocks) == list(range(len(firsts[s])))
        if not (kw["shuffle"] and kw["block_shuffle"]):
            assert seq == list(range(counts[s]))


@settings(max_examples=80, deadline=None)
@given(orders(), st.data())
def test_deterministic_in_seed_and_epoch(case, data):
    """Two orders of the same (seed, epoch) agree, whatever each was asked before (and
    whatever their caches hold)."""
    counts, firsts, kw = case
    n = sum(counts)
    one, two = make(counts, firsts, **kw), make(counts, firsts, **kw)
    for _ in range(data.draw(st.integers(0, 3))):  # warm ``two``'s caches elsewhere
        two.locate(np.array(data.draw(st.lists(st.integers(0, 2 * n), min_size=1))))
    assert (everything(one) == everything(two)).all()
    assert (one.order == two.order).all()


def test_caches_overflow_without_changing_results():
    """More windows and block-shuffled shards than the caches hold, visited twice."""
    counts = [1, 2, 3] * 40
    firsts = [np.arange(c, dtype=np.int64) for c in counts]  # one block per sample
    kw = dict(seed=3, epoch=1, shuffle=True, block_shuffle=True, window=2)
    order = make(counts, firsts, **kw)
    rev = np.arange(sum(counts))[::-1].copy()
    first = pairs(order, rev)
    assert (pairs(order, rev) == first).all()
    assert (pairs(make(counts, firsts, **kw), rev) == first).all()


@pytest.mark.parametrize("counts,window,block_shuffle", [
    ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], 1, False),  # shard order alone
    ([60], 16, False),  # windows alone
    ([60], 1, True),  # blocks alone
    ([7, 1, 30, 2, 11], 9, True)])
def test_epochs_and_seeds_differ_when_shuffled(counts, window, block_shuffle):
    firsts = [np.arange(0, c, 3, dtype=np.int64) for c in counts]

    def seq(seed, epoch, shuffle=True):
        order = make(counts, firsts, seed=seed, epoch=epoch, shuffle=shuffle,
                     block_shuffle=block_shuffle, window=window)
        return tuple(map(tuple, everything(order).tolist()))

    seqs = {(s, e): seq(s, e) for s in range(4) for e in range(6)}
    assert len(set(seqs.values())) == len(seqs)
    # unshuffled and without a window: the manifest order, in every epoch and seed
    plain = [(i, k) for i, c in enumerate(counts) for k in range(c)]
    flat = tuple(map(tuple, np.array(plain).T.tolist()))
    if window == 1:
        assert {seq(s, e, shuffle=False) for s in range(3) for e in range(3)} == {flat}


@settings(max_examples=150, deadline=None)
@given(orders(), st.data())
def test_first_use_lists_each_shard_once_in_order_of_first_touch(case, data):
    counts, firsts, kw = case
    n = sum(counts)
    order = make(counts, firsts, **kw)
    start = data.draw(st.integers(0, n))
    sizes = data.draw(st.lists(st.integers(1, n + 3), min_size=1, max_size=8))
    ends = np.cumsum([start] + sizes)
    batches = [np.arange(a, b) for a, b in zip(ends[:-1], ends[1:])]
    batches.append(np.array(data.draw(st.lists(st.integers(0, 2 * n), min_size=1))))
    touched = pairs(make(counts, firsts, **kw), np.concatenate(batches))[0].tolist()
    want = list(dict.fromkeys(touched))  # first appearances, in order
    assert list(order.first_use(iter(batches))) == want
    # a whole epoch touches every shard that has samples
    assert sorted(order.first_use([np.arange(n)])) == [s for s, c in enumerate(counts) if c]


# ---------------------------------------------------------------- Layout
LAYOUTS = st.builds(
    Layout, num_samples=st.integers(0, 300), start=st.integers(0, 310),
    world_size=st.integers(1, 9), unit=st.one_of(st.just(1), st.integers(1, 17)),
    drop_last=st.booleans(), remainder=st.sampled_from(["pad", "drop"]))


def rank_spans(lay: Layout) -> list[list[tuple[int, int]]]:
    return [[lay.span(r, j) for j in range(lay.num_units)] for r in range(lay.world_size)]


@settings(max_examples=300, deadline=None)
@given(LAYOUTS)
def test_layout_equal_units_per_rank_tiling_the_epoch(lay):
    n, ws, unit = lay.num_samples, lay.world_size, lay.unit
    rest = max(n - lay.start, 0)
    per_rank = -(-rest // ws) if lay.remainder == "pad" else rest // ws
    assert lay.per_rank == per_rank
    assert lay.num_units == (per_rank // unit if lay.drop_last else -(-per_rank // unit))
    spans = rank_spans(lay)
    sizes = [[size for _, size in s] for s in spans]
    # every rank: num_units units, the same sizes, all full but maybe a short last one
    assert all(len(s) == lay.num_units for s in sizes) and all(s == sizes[0] for s in sizes)
    mine = sizes[0]
    assert all(size == unit for size in mine[:-1])
    if mine:
        assert 1 <= mine[-1] <= unit and mine[-1] == lay.last_size
        assert mine[-1] == unit or not lay.drop_last
    assert sum(mine) == (lay.num_units * unit if lay.drop_last else per_rank)
    # units dealt round-robin: unit j of rank r follows unit j of rank r - 1, and
    # together they run, without gap or overlap, through G from ``start``
    at = lay.start
    for j in range(lay.num_units):
        for r in range(ws):
            a, size = spans[r][j]
            assert a == at
            at += size
    covered = at - lay.start  # positions [start, at) read once each, p >= N as p mod N
    assert covered == ws * sum(mine)
    if lay.remainder == "pad" and not lay.drop_last:  # all of [start, N), < ws repeats
        assert 0 <= covered - rest < ws
    elif lay.remainder == "drop" and not lay.drop_last:  # < ws dropped at the end
        assert 0 <= rest - covered < ws
    elif lay.remainder == "drop":  # drop_last: fewer than ws * unit dropped at the end
        assert 0 <= rest - covered < ws * unit
    else:  # pad with drop_last: a short tail dropped, or fewer than ws repeats
        assert -ws < rest - covered < ws * unit
    if covered > rest:  # repeats only by padding: positions N.. (< N + ws), which read
        assert lay.remainder == "pad" and n <= at < n + ws  # G from its start again
    if unit == 1:  # sample mode: the stream reads rank r's sample j at start + j * ws + r
        assert spans == [[(lay.start + j * ws + r, 1) for j in range(lay.num_units)]
                         for r in range(ws)]


@settings(max_examples=300, deadline=None)
@given(LAYOUTS, st.data())
def test_layout_resumes_exactly_where_it_stopped(lay, data):
    """From ``consumed_after(k)`` the layout reads exactly the units not yet read:
    unit j of each rank is unit j + k of the interrupted layout."""
    for _ in range(2):  # resume, then resume the resumed layout
        k = data.draw(st.integers(0, lay.num_units + 2), label="units consumed")
        c = lay.consumed_after(k)
        if k >= lay.num_units:
            assert c is None
            return
        assert c == lay.span(0, k)[0] == lay.start + k * lay.world_size * lay.unit
        resumed = Layout(lay.num_samples, c, lay.world_size, lay.unit, lay.drop_last,
                         lay.remainder)
        assert resumed.num_units == lay.num_units - k
        old, new = rank_spans(lay), rank_spans(resumed)
        assert new == [units[k:] for units in old]
        read = sorted(p for units in old for a, size in units[:k] for p in range(a, a + size))
        rest = sorted(p for units in new for a, size in units for p in range(a, a + size))
        assert read + rest == sorted(p for units in old for a, size in units
                                     for p in range(a, a + size))
        assert not set(read) & set(rest)
        lay = resumed


@settings(max_examples=200, deadline=None)
@given(LAYOUTS, st.integers(1, 9))
def test_layout_workers_partition_a_rank_units(lay, num_workers):
    for r in range(lay.world_size):
        got = [list(lay.units_of(r, w, num_workers)) for w in range(num_workers)]
        assert sorted(j for units in got for j in units) == list(range(lay.num_units))
        for w, units in enumerate(got):  # round-robin, each in order
            assert units == sorted(units) and all(j % num_workers == w for j in units)
        assert max(map(len, got)) - min(map(len, got)) <= 1


def test_layout_past_the_end_is_empty():
    lay = Layout(10, 12, 3, 4, False, "pad")
    assert lay.num_units == 0 and lay.consumed_after(0) is None
