"""Mixtures on several nodes: each node reads its share of every source's shards, the
epoch keeps each source's exact count, and resumes across node counts lose nothing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from shardstream import ShardStream
from shardstream.read.mixorder import MixSequence
from shardstream.read.mixture import Mixture, Source


def _mixture(make_dataset, window=64):
    a = make_dataset(300, name="a", max_samples=25)
    b = make_dataset(120, name="b", max_samples=20)
    return Mixture([Source(a), Source(b, repeat=2.0)], window=window)


def _streams(mix, nodes, local, **kw):
    world = nodes * local
    return [ShardStream(mix, rank=r, world_size=world, local_world_size=local,
                        source_field="src", **kw) for r in range(world)]


def _read(stream, steps=None):
    out = []
    for b in stream:
        out.append(list(zip(b["src"].tolist(), b["id"].tolist())))
        if steps is not None and len(out) == steps:
            break
    return out


def test_node_sequences_split_every_source_count_and_shares(make_dataset):
    mix = _mixture(make_dataset)
    seqs = [MixSequence(mix, epoch=1, seed=4, shuffle=True, block_shuffle=False,
                        shuffle_buffer=50, nodes=3, node=n) for n in range(3)]
    assert [s.num_samples for s in seqs] == [180, 180, 180]  # the cuts of T = 540
    offsets = seqs[0].offsets
    got = Counter()
    shards_of = []
    for s in seqs:
        sh, loc = s.locate(np.arange(s.num_samples))
        src = (sh >= offsets[1]).astype(int)
        got.update(zip(src.tolist(), sh.tolist(), loc.tolist()))
        shards_of.append(set(sh.tolist()))
    # source a once, source b twice per epoch
    assert sum(v for (src, _, _), v in got.items() if src == 0) == 300
    assert {v for (src, _, _), v in got.items() if src == 0} == {1}
    assert {v for (src, _, _), v in got.items() if src == 1} == {2}
    assert len([k for k in got if k[0] == 1]) == 120
    # each node reads about a third of each source's shards (a cut shard in two)
    for src, (lo, hi) in enumerate([(0, offsets[1]), (offsets[1], offsets[1] + 6)]):
        for mine in shards_of:
            share = {s for s in mine if lo <= s < hi}
            assert len(share) <= -(-(hi - lo) // 3) + 2


def test_mixture_on_two_nodes_is_exact_equal_and_node_local(make_dataset):
    mix = _mixture(make_dataset)
    streams = _streams(mix, 2, 2, batch_size=8, shuffle=True, seed=3, shuffle_buffer=60)
    per_rank = [_read(s) for s in streams]
    assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) == len(streams[0])
    got = Counter(x for r in per_rank for batch in r for x in batch)
    assert {v for (src, _), v in got.items() if src == 0} <= {1, 2}
    assert set(i for (src, i) in got if src == 0) == set(range(300))
    assert set(i for (src, i) in got if src == 1) == set(range(120))
    assert sum(got.values()) - 540 < 4  # pad repeats only
    # node 0 (ranks 0, 1) and node 1 (ranks 2, 3) read disjoint shards, but the cut ones
    shard = {0: 25, 1: 20}
    node_shards = [{(src, i // shard[src]) for r in per_rank[2 * n:2 * n + 2]
                    for batch in r for src, i in batch} for n in range(2)]
    assert len(node_shards[0] & node_shards[1]) <= 2


@pytest.mark.parametrize("before,after", [((2, 2), (3, 2)), ((2, 2), (1, 2)), ((2, 1), (2, 3))])
def test_mixture_resumes_across_node_counts(make_dataset, before, after):
    mix = _mixture(make_dataset)
    kw = dict(batch_size=6, shuffle=True, seed=9, shuffle_buffer=40)
    first = _streams(mix, *before, **kw)
    steps = 7
    read = [x for s in first for batch in _read(s, steps) for x in batch]
    state = first[0].state_for(0, 0, steps)
    second = _streams(mix, *after, **kw)
    for s in second:
        s.load_state_dict(state)
    rest = [_read(s) for s in second]
    assert len({len(r) for r in rest}) == 1
    got = Counter(read + [x for r in rest for batch in r for x in batch])
    assert set(i for (src, i) in got if src == 0) == set(range(300))
    assert set(i for (src, i) in got if src == 1) == set(range(120))
    world = before[0] * before[1] + after[0] * after[1]
    assert sum(got.values()) - 540 < world
    assert sum(v for (src, _), v in got.items() if src == 1) >= 240
