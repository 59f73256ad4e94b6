"""Node-local epochs (:mod:`shardstream.read.nodes`): each node reads its share, every
global batch draws from all shares, epochs stay exact, equal and resumable -- into
other node counts too."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shardstream import ShardStream
from shardstream.read.nodes import NodeOrder, node_length, node_shares, remaining
from shardstream.read.order import Layout


def _orders(counts, nodes, *, seed=0, epoch=0, shuffle=True, window=64):
    return [NodeOrder(p, seed=seed, epoch=epoch, node=n, shuffle=shuffle, window=window)
            for n, p in enumerate(node_shares(counts, nodes, seed=seed, epoch=epoch,
                                              shuffle=shuffle))]


def _read_epoch(orders, counts, local, unit, remainder="pad"):
    """Per rank of every node: the global ids of each of its units, in order."""
    base = np.concatenate([[0], np.cumsum(counts)])
    m = node_length(sum(o.num_samples for o in orders), len(orders), remainder)
    layout = Layout(m, 0, local, unit, False, remainder)
    out = []
    for order in orders:
        for r in range(local):
            units = []
            for j in range(layout.num_units):
                a, n = layout.span(r, j)
                s, i = order.locate(np.arange(a, a + n, dtype=np.int64))
                units.append(base[s] + i)
            out.append(units)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=25), st.integers(1, 6),
       st.integers(0, 2**32))
def test_shares_are_disjoint_cover_everything_and_differ_by_at_most_one(counts, nodes, seed):
    shares = node_shares(counts, nodes, seed=seed, epoch=0, shuffle=True)
    seen = Counter()
    for shard, lo, hi in shares:
        for s, a, b in zip(shard.tolist(), lo.tolist(), hi.tolist()):
            seen.update((s, i) for i in range(a, b))
    assert set(seen.values()) <= {1}
    assert len(seen) == sum(counts)
    sizes = [int((hi - lo).sum()) for _, lo, hi in shares]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=20), st.integers(1, 4),
       st.integers(1, 4), st.integers(1, 7), st.sampled_from(["pad", "drop"]))
def test_epoch_is_exact_and_equal_on_every_geometry(counts, nodes, local, unit, remainder):
    assume(sum(counts) >= nodes)  # fewer samples than nodes: the stream uses one node
    ranks = _read_epoch(_orders(counts, nodes), counts, local, unit, remainder)
    assert len({len(units) for units in ranks}) == 1  # every rank as many units
    ids = np.concatenate([u for units in ranks for u in units]) if ranks[0] else np.zeros(0)
    got = Counter(ids.tolist())
    n, world = sum(counts), nodes * local
    if remainder == "pad":
        assert set(got) == set(range(n))
        assert sum(got.values()) - n < world  # fewer than world_size repeats
    else:
        assert max(got.values(), default=1) == 1
        assert n - len(got) < world  # fewer than world_size dropped


def test_each_node_reads_its_share_and_global_batches_mix_all_nodes():
    counts = [250] * 160
    nodes, local, batch = 8, 4, 16
    ranks = _read_epoch(_orders(counts, nodes, window=8192), counts, local, batch)
    per_node = [np.unique(np.concatenate([u for units in ranks[n * local:(n + 1) * local]
                                           for u in units]) // 250) for n in range(nodes)]
    assert max(len(p) for p in per_node) <= 160 / nodes + 2  # its share plus boundary shards
    steps = len(ranks[0])
    glob = [len(np.unique(np.concatenate([units[j] for units in ranks]) // 250))
            for j in range(steps)]
    assert np.median(glob) >= 154  # MosaicML py1e's figure on this geometry (8x4)
    rank = [len(np.unique(u // 250)) for units in ranks for u in units]
    assert np.median(rank) >= 11  # py1e: 11 (a rank batch of 16 from its node's 20 shards)


def test_resume_into_other_node_counts_loses_and_repeats_nothing():
    counts = [37] * 40 + [5, 90, 1]
    n = sum(counts)
    base = np.concatenate([[0], np.cumsum(counts)])
    for old, new in ((4, 2), (2, 3), (8, 6), (3, 1), (1, 4)):
        orders = _orders(counts, old)
        consumed = 3 * 2 * 4  # 3 units of 4 samples on 2 local ranks
        read = [base[o.locate(np.arange(min(consumed, o.num_samples)))[0]]
                + o.locate(np.arange(min(consumed, o.num_samples)))[1] for o in orders]
        rest = remaining(orders, consumed, new)
        sizes = [o.num_samples for o in rest]
        assert max(sizes) - min(sizes) <= 1
        later = [base[o.shards] + o.local for o in rest]
        ids = np.concatenate(read + later)
        assert sorted(ids.tolist()) == list(range(n)), (old, new)


def test_layout_simulation_1024_ranks_8_workers_and_a_resume_into_96_nodes():
    """128 nodes x 8 ranks x 8 workers, positions only: exact, equal, each node about
    its share; then the rest of the epoch after 10 steps laid out on 96 nodes."""
    t0 = time.perf_counter()
    counts = [500] * 2048  # 1,024,000 samples
    nodes, local, workers, batch = 128, 8, 8, 16
    shares = node_shares(counts, nodes, seed=7, epoch=2, shuffle=True)
    orders = [NodeOrder(p, seed=7, epoch=2, node=k, shuffle=True, window=8192)
              for k, p in enumerate(shares)]
    base = np.concatenate([[0], np.cumsum(counts)])
    m = node_length(sum(counts), nodes, "pad")
    layout = Layout(m, 0, local, batch, False, "pad")
    seen = np.zeros(sum(counts), dtype=np.int32)
    units_per_rank = set()
    node_fraction = 0.0
    for k, order in enumerate(orders):
        shards_of_node = set()
        for r in range(local):
            mine = [list(layout.units_of(r, w, workers)) for w in range(workers)]
            units = sorted(j for part in mine for j in part)
            assert units == list(range(layout.num_units))  # workers partition the rank
            units_per_rank.add(len(units))
            pos = np.concatenate([np.arange(*_span(layout, r, j)) for j in units])
            s, i = order.locate(pos)
            np.add.at(seen, base[s] + i, 1)
            shards_of_node.update(np.unique(s).tolist())
        node_fraction = max(node_fraction, len(shards_of_node) / len(counts))
    assert len(units_per_rank) == 1
    assert seen.min() == 1 and int(seen.sum()) - len(seen) < nodes * local
    assert node_fraction <= 1.1 / nodes + 2 / len(counts)
    # resume after 10 steps of every rank, on 96 nodes of 8
    consumed = 10 * local * batch
    rest = remaining(orders, consumed, 96)
    done = np.zeros(sum(counts), dtype=np.int32)
    for order in orders:
        s, i = order.locate(np.arange(consumed))
        np.add.at(done, base[s] + i, 1)
    for order in rest:
        np.add.at(done, base[order.shards] + order.local, 1)
    assert done.min() == 1 and done.max() == 1
    assert max(len(np.unique(o.shards)) for o in rest) / len(counts) <= 1.1 / 96 + 3 / 2048
    assert time.perf_counter() - t0 < 30


def _span(layout: Layout, r: int, j: int) -> tuple[int, int]:
    a, n = layout.span(r, j)
    return a, a + n


# ---------------------------------------------------------------- through ShardStream
def _ids(stream: ShardStream, steps: int | None = None) -> list[list[int]]:
    out = []
    for b in stream:
        out.append(b["id"].tolist())
        if steps is not None and len(out) == steps:
            break
    return out


def _streams(path, nodes, local, **kw):
    world = nodes * local
    return [ShardStream(path, rank=r, world_size=world, local_world_size=local, **kw)
            for r in range(world)]


@pytest.mark.parametrize("before,after", [((4, 2, 8), (2, 2, 8)), ((2, 2, 8), (3, 2, 8)),
                                          ((8, 1, 4), (6, 1, 4)), ((2, 2, 8), (2, 4, 8)),
                                          ((2, 2, 8), (2, 2, 5)), ((1, 2, 8), (3, 2, 8))])
def test_stream_resumes_across_topologies(make_dataset, before, after):
    path = make_dataset(997, max_samples=61, block_bytes=512)
    kw = dict(shuffle=True, seed=5, shuffle_buffer=100)
    (p0, l0, b0), (p1, l1, b1) = before, after
    first = _streams(path, p0, l0, batch_size=b0, **kw)
    steps = 5
    read = [i for s in first for batch in _ids(s, steps) for i in batch]
    state = first[0].state_for(0, 0, steps)
    assert state["version"] == (2 if p0 > 1 else 1)
    second = _streams(path, p1, l1, batch_size=b1, **kw)
    for s in second:
        s.load_state_dict(state)
    rest = [_ids(s) for s in second]
    assert len({len(r) for r in rest}) == 1  # equal on the new topology
    got = Counter(read + [i for r in rest for batch in r for i in batch])
    assert set(got) == set(range(997))
    assert sum(got.values()) - 997 < p0 * l0 + p1 * l1  # pad repeats only
    # the epoch after is a whole one on the new topology
    for s in second:
        s.set_epoch(1)
    nxt = [_ids(s) for s in second]
    assert len({len(r) for r in nxt}) == 1 and len(nxt[0]) == len(second[0])
    assert set(i for r in nxt for batch in r for i in batch) == set(range(997))


def test_one_node_is_the_global_layout(make_dataset):
    """local_world_size == world_size (one node): the global sequence, as before."""
    path = make_dataset(300)
    a = [_ids(s) for s in _streams(path, 1, 3, batch_size=7, shuffle=True)]
    b = [_ids(ShardStream(path, rank=r, world_size=3, batch_size=7, shuffle=True))
         for r in range(3)]
    assert a == b


def test_node_shares_fixed_or_per_epoch(make_dataset):
    path = make_dataset(600, max_samples=50)

    def shards_read(shares: str, epoch: int) -> set[int]:
        s = ShardStream(path, rank=0, world_size=4, local_world_size=2, batch_size=10,
                        shuffle=True, node_shares=shares)
        s.set_epoch(epoch)
        return {i // 50 for b in _ids(s) for i in b}
    assert shards_read("fixed", 0) == shards_read("fixed", 1)
    assert shards_read("epoch", 0) != shards_read("epoch", 1)
    with pytest.raises(ValueError, match="node_shares"):
        ShardStream(path, node_shares="random")


def test_world_size_must_be_a_multiple_of_local_world_size(make_dataset):
    path = make_dataset(50)
    with pytest.raises(ValueError, match="not a multiple of local_world_size=2"):
        len(ShardStream(path, rank=0, world_size=3, local_world_size=2))


def test_the_cache_a_node_needs_follows_its_schedule():
    """The bytes of node cache a schedule needs at once: two windows' shards plus the
    read-ahead; a node-local schedule needs its share's, not the whole dataset's."""
    from shardstream.read.nodes import cache_needed
    from shardstream.read.order import EpochOrder

    counts, sizes = [250] * 160, np.full(160, 1000, dtype=np.int64)
    node = _orders(counts, 8, window=8192)[0]  # a share of 20 shards
    need = cache_needed(node, sizes, 8192, read_ahead=2)
    assert 20 * 1000 <= need <= (20 + 1 + 2) * 1000
    whole = EpochOrder(counts, seed=0, epoch=0, shuffle=True, block_shuffle=False, window=8192)
    assert cache_needed(whole, sizes, 8192, read_ahead=2) >= 60 * 1000  # ~33-shard windows
    in_order = EpochOrder(counts, seed=0, epoch=0, shuffle=False, block_shuffle=False, window=1)
    assert cache_needed(in_order, sizes, 1, read_ahead=2) == 2 * 1000 + 2 * 1000


def test_fewer_samples_than_nodes_read_as_one_node(make_dataset):
    path = make_dataset(3)
    got = [_ids(s) for s in _streams(path, 4, 2, batch_size=1)]
    assert len({len(r) for r in got}) == 1
    assert set(i for r in got for b in r for i in b) == {0, 1, 2}
