"""Weighted mixtures: exact counts, proportions, determinism, resume, schemas, errors."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstream.pytorch.collation import Collate
from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream
from shardstream.read.mixture import MixOrder, Mixture, Source, epoch_counts
from shardstream.write.writer import ShardWriter

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {"small": 50, "mid": 2000, "big": 10000}
WEIGHTS = [0.7, 0.2, 0.1]


def _small(i: int) -> dict:
    return {"id": i, "x": np.arange(i % 3 + 1, dtype=np.int32), "text": f"small {i}"}


def _mid(i: int) -> dict:
    return {"id": i, "y": i / 2}


def _big(i: int) -> dict:
    return {"id": i, "x": np.arange(i % 4 + 1, dtype=np.int32), "label": i % 7}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    """Three datasets, 50 (one shard) / 2000 / 10000 samples, three schemas."""
    root = tmp_path_factory.mktemp("mix")
    out = []
    for (name, n), make, max_samples in zip(SIZES.items(), (_small, _mid, _big),
                                            (None, 300, 997)):
        path = os.path.join(root, name)
        with ShardWriter(path, max_samples=max_samples, block_bytes=2048, fsync=False) as w:
            for i in range(n):
                w.write(make(i))
        out.append(path)
    return out


def pairs(batches) -> list[tuple[int, int]]:
    """(source index, id) of every sample, in order."""
    out: list[tuple[int, int]] = []
    for b in batches:
        out += zip(b["__source__"].tolist(), b["id"].tolist())
    return out


def stream(sources, **kw) -> ShardStream:
    kw = {"weights": WEIGHTS, "batch_size": 32, "shuffle": True, "source_field": "__source__",
          "epoch_size": 6400, **kw}
    return ShardStream(sources, **kw)


# ---------------------------------------------------------------- counts
def test_epoch_counts_rules():
    sizes = list(SIZES.values())
    # exhaust_all: the big source (10000 at 0.1) sets the length; the others upsampled
    assert epoch_counts(sizes, WEIGHTS, stop="exhaust_all") == [70000, 20000, 10000]
    # first_exhausted: the small one (50 at 0.7) runs out first; the others downsampled
    assert epoch_counts(sizes, WEIGHTS, stop="first_exhausted") == [50, 14, 7]
    assert epoch_counts(sizes, WEIGHTS, epoch_size=1001) == [701, 200, 100]
    assert sum(epoch_counts([7, 11, 13], [1, 1, 1], epoch_size=10)) == 10
    for stop in ("exhaust_all", "first_exhausted"):
        counts = epoch_counts([3, 1000, 17], [0.5, 0.3, 0.2], stop=stop)
        ok = [c >= n for c, n in zip(counts, [3, 1000, 17])]
        assert all(ok) if stop == "exhaust_all" else not all(ok)


def test_repeat_and_samples(sources):
    m = Mixture([Source(sources[0], repeat=4), Source(sources[1], samples=100),
                 Source(sources[2], repeat=0.05)])
    assert m.counts == [200, 100, 500] and m.num_samples == 800
    assert m.names == ["small", "mid", "big"]
    assert Mixture(sources[:2]).counts == [50, 2000]  # plain paths count once


def test_prefix_is_exact_and_smooth():
    counts = [70000, 20000, 10000]
    mo = MixOrder(counts, seed=3, epoch=1, shuffle=True, window=256)
    assert mo.prefix(0) == [0, 0, 0] and mo.prefix(100000) == counts
    p = np.asarray(counts) / sum(counts)
    prev = np.zeros(3)
    for b in range(0, 100001, 997):
        got = np.asarray(mo.prefix(b))
        assert got.sum() == b and np.all(got >= prev)
        assert np.all(np.abs(got - p * b) <= 3)  # every prefix within 3 samples
        prev = got


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=6).filter(lambda c: sum(c) > 0),
       st.integers(0, 2**32), st.booleans(), st.lists(st.floats(0, 1), min_size=8, max_size=8))
def test_prefix_properties(counts, seed, shuffle, cuts):
    mo = MixOrder(counts, seed=seed, epoch=0, shuffle=shuffle, window=64)
    total = sum(counts)
    bs = sorted({0, total, *(int(c * total) for c in cuts)})
    prev = [0] * len(counts)
    for b in bs:
        got = mo.prefix(b)
        assert sum(got) == b and all(g >= p for g, p in zip(got, prev))
        assert all(abs(g - c * b / total) < len(counts) for g, c in zip(got, counts))
        prev = got
    assert prev == counts


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("window", [1, 7, 1024])
def test_locate_is_a_bijection(shuffle, window):
    counts = [5, 0, 1234, 77]
    src, ordinal = MixOrder(counts, seed=1, epoch=4, shuffle=shuffle,
                            window=window).locate(np.arange(sum(counts)))
    for i, c in enumerate(counts):
        assert sorted(ordinal[src == i].tolist()) == list(range(c))


def test_proportions_exact_in_every_window(sources):
    ds = stream(sources, epoch_size=20000, batch_size=250)
    got = pairs(ds)
    src = np.array([s for s, _ in got])
    counts = np.bincount(src, minlength=3)
    assert counts.tolist() == [14000, 4000, 2000]
    p = np.array(WEIGHTS)
    # each interleave window (1024 slots) holds its share within 3 samples, by construction
    for a in range(0, 20000, 1024):
        got = np.bincount(src[a:a + 1024], minlength=3)
        assert np.all(np.abs(got - p * len(src[a:a + 1024])) <= 3), got
    # any other span of 1000: within sampling noise (4 sigma of a hypergeometric draw)
    for a in range(500, 19000, 1000):
        got = np.bincount(src[a:a + 1000], minlength=3)
        assert np.all(np.abs(got - p * 1000) <= 4 * np.sqrt(1000 * p * (1 - p) / 2) + 3), got


def test_upsampled_covers_all_downsampled_disjoint(sources):
    ds = ShardStream(sources, weights=WEIGHTS, stop="first_exhausted", shuffle=True,
                     source_field="__source__", batch_size=8)
    assert ds.mixture.counts == [50, 14, 7]
    seen = {0: [], 1: []}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = pairs(ds)
        assert sorted(i for s, i in got if s == 0) == list(range(50))  # the limiting source
        seen[epoch] = [i for s, i in got if s == 2]
    assert not set(seen[0]) & set(seen[1])  # a downsampled source continues, no repeats
    up = Counter(pairs(stream(sources, epoch_size=3000, batch_size=100)))
    small = [up[(0, i)] for i in range(50)]
    assert min(small) == 2100 // 50 and sum(small) == 2100  # every sample 42 times exactly


# ---------------------------------------------------------------- determinism
def test_same_epoch_same_order_other_epoch_differs(sources):
    first = pairs(stream(sources))
    assert first == pairs(stream(sources))
    other = stream(sources)
    other.set_epoch(1)
    assert pairs(other) != first
    assert pairs(stream(sources, seed=5)) != first


def test_order_independent_of_world_size(sources):
    whole = pairs(stream(sources, remainder="drop"))
    ranks = [list(stream(sources, rank=r, world_size=2, remainder="drop")) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    dealt = [b for pair in zip(*ranks) for b in pair]  # unit g -> rank g % 2
    assert pairs(dealt) == whole


def test_unshuffled_mixture_spreads_sources(sources):
    got = pairs(stream(sources, shuffle=False, epoch_size=100, batch_size=10))
    assert [s for s, _ in got[:10]].count(0) == 7
    assert [i for s, i in got if s == 2] == list(range(10))  # manifest order


# ---------------------------------------------------------------- resume
def test_resume_mid_epoch_two_workers(sources):
    dl = loader(stream(sources), num_workers=2)
    dl.set_epoch(2)
    seen = []
    for i, b in enumerate(dl):
        seen += pairs([b])
        if i == 60:
            break
    state = json.loads(json.dumps(dl.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == 2 and state["consumed"] == 61 * 32
    dl2 = loader(stream(sources), num_workers=2)
    dl2.load_state_dict(state)
    rest = pairs(dl2)
    full = stream(sources)
    full.set_epoch(2)
    assert seen + rest == pairs(full)  # no loss, no repeat, same order
    assert dl2.epoch == 3
    with pytest.raises(ValueError, match="does not fit"):
        stream(sources, weights=[0.6, 0.3, 0.1]).load_state_dict(state)


# ---------------------------------------------------------------- schemas, source field
def test_schemas_and_source_field(sources):
    ds = stream(sources, epoch_size=640, batch_size=64)
    assert ds.mixture.names == ["small", "mid", "big"]
    for b in ds:
        src = b["__source__"]
        assert src.dtype == torch.int64
        assert torch.equal(b["y_present"], src == 1)
        assert torch.equal(b["x_present"], src != 1)
        assert torch.equal(b["label_present"], src == 2)
        assert torch.all(b["x_lengths"][src == 1] == 0)  # blank rows: empty
        assert torch.all(b["y"][src != 1] == 0)
        assert [t is None for t in b["text"]] == (src != 0).tolist()


def test_collate_mask_unit():
    col = Collate(missing="mask")
    out = col([{"a": 1, "v": np.ones(2, np.float32)}, {"b": "s"}, {"a": 3, "v": None}])
    assert out["a"].tolist() == [1, 0, 3] and out["a_present"].tolist() == [True, False, True]
    assert out["v"].shape == (3, 2) and out["v_present"].tolist() == [True, False, False]
    assert out["b"] == [None, "s", None] and out["b_present"].tolist() == [False, True, False]
    # the default keeps the documented list-with-None rule
    assert Collate()([{"a": 1}, {}])["a"] == [1, None]
    with pytest.raises(ValueError, match="missing"):
        Collate(missing="zero")


# ---------------------------------------------------------------- errors
def test_bad_arguments(sources, tmp_path):
    with pytest.raises(ValueError, match="3 sources"):
        Mixture(sources, [1, 2])
    with pytest.raises(ValueError, match="weight must be"):
        Mixture(sources, [1, 0, 1])
    with pytest.raises(ValueError, match="stop must be"):
        Mixture(sources, WEIGHTS, stop="longest")
    with pytest.raises(ValueError, match="not both"):
        Mixture(sources, WEIGHTS, stop="exhaust_all", epoch_size=10)
    with pytest.raises(ValueError, match="one of weight, repeat or samples"):
        Mixture([Source(sources[0], weight=1, repeat=2)])
    with pytest.raises(ValueError, match="every source a weight"):
        Mixture([Source(sources[0], weight=1), Source(sources[1], repeat=2)])
    with pytest.raises(ValueError, match="apply to weighted"):
        Mixture(sources, stop="first_exhausted")
    with pytest.raises(ValueError, match="unique"):
        Mixture(sources, WEIGHTS, names=["a", "a", "b"])
    (tmp_path / "loose.tar").write_bytes(b"")  # exists, but has no manifest
    with pytest.raises(ValueError, match="no manifest"):
        Mixture([sources[0], str(tmp_path / "loose.tar")], [1, 1])
    with pytest.raises(ValueError, match="apply to mixtures"):
        ShardStream(sources[0], source_field="__source__")
    with pytest.raises(ValueError, match="on the Mixture"):
        ShardStream(Mixture(sources, WEIGHTS), weights=WEIGHTS)


# ---------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_two_ranks_two_workers(sources, tmp_path):
    from test_distributed import torchrun

    script = os.path.join(TESTS, "scripts", "ddp_mixture.py")
    torchrun(script, str(tmp_path), *sources)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    kw = dict(weights=WEIGHTS, epoch_size=4003, batch_size=16, shuffle=True, seed=3,
              shuffle_buffer=512, source_field="__source__")
    for epoch in range(3):
        ref = ShardStream(sources, **kw)
        ref.set_epoch(epoch)
        whole = [tuple(p) for p in pairs(ref)]
        expected = Counter(whole) + Counter(whole[:2 * 2002 - 4003])  # one padded sample
        key = "resumed" if epoch == 2 else "epochs"
        got = [r[key][epoch] if epoch < 2 else r[key] for r in ranks]
        assert len(got[0]) == len(got[1]) == ranks[0]["len"] == -(-2002 // 16)
        flat = [tuple(p) for r in got for b in r for p in b]
        assert Counter(flat) == expected
        assert Counter(s for s, _ in whole) == Counter(dict(enumerate([2802, 801, 400])))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]


def test_sample_mode_three_ranks_pad(sources):
    kw = dict(batch_size=None, epoch_size=1000, remainder="pad")
    whole = [(s["__source__"], s["id"]) for s in stream(sources, **kw)]
    ranks = [list(stream(sources, rank=r, world_size=3, **kw)) for r in range(3)]
    assert [len(r) for r in ranks] == [334] * 3
    assert len(stream(sources, rank=0, world_size=3, **kw)) == 334
    got = Counter((s["__source__"], s["id"]) for r in ranks for s in r)
    assert got == Counter(whole) + Counter(whole[:2])  # two samples padded
