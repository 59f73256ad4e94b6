"""Streaming webdataset tars indexed in place (issue #15): exact, equal, resumable epochs."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from shardstream.errors import CorruptShardError
from shardstream.format.index import INDEX_SUFFIX
from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream
from shardstream.write.reindex import build_index

N, MAXCOUNT, WORLD, BATCH = 1003, 97, 2, 16


def written(i: int) -> dict:
    return {"__key__": f"k{i:05d}", "cls": i, "npy": np.full(3, i, np.int32),
            "json": {"i": i, "sq": i * i}, "txt": f"text {i}"}


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory) -> str:
    """11 uneven tars (10 x 97 + 33 samples) written by webdataset, indexed in place."""
    d = str(tmp_path_factory.mktemp("wds") / "data")
    os.makedirs(d)
    with wds.ShardWriter(os.path.join(d, "train-%06d.tar"), maxcount=MAXCOUNT, verbose=0) as w:
        for i in range(N):
            w.write(written(i))
    build_index([d])
    return d


def tars(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".tar"))


def check_batch(b: dict) -> list[str]:
    """The decoded values are the written ones; returns the batch's keys."""
    keys = list(b["__key__"])
    ids = [int(k[1:]) for k in keys]
    assert np.asarray(b["cls"]).tolist() == ids
    assert np.asarray(b["npy"]).tolist() == [[i] * 3 for i in ids]
    assert np.asarray(b["json"]["sq"]).tolist() == [i * i for i in ids]
    assert list(b["txt"]) == [f"text {i}" for i in ids]
    return keys


def epoch_keys(make) -> list[list[str]]:
    """Per rank: the keys of one epoch; asserts equal batch counts equal to len()."""
    per_rank = []
    for rank in range(WORLD):
        stream, batches = make(rank)
        keys = [check_batch(b) for b in batches]
        assert len(keys) == len(stream)
        per_rank.append([k for ks in keys for k in ks])
    return per_rank


def assert_exact(per_rank: list[list[str]]) -> None:
    every = Counter(k for ks in per_rank for k in ks)
    assert set(every) == {f"k{i:05d}" for i in range(N)}
    assert sum(every.values()) - N < WORLD  # padding only
    assert len({len(ks) for ks in per_rank}) == 1


def test_indexed_dir_streams_exact_epochs_in_process(wds_dir):
    def make(rank):
        s = ShardStream(wds_dir, batch_size=BATCH, shuffle=True, seed=7, rank=rank,
                        world_size=WORLD)
        return s, list(s)
    per_rank = epoch_keys(make)
    assert_exact(per_rank)
    assert len(ShardStream(wds_dir, batch_size=BATCH, rank=0, world_size=WORLD)) == \
        -(-(-(-N // WORLD)) // BATCH)
    order = [int(k[1:]) for k in per_rank[0]]
    assert order != sorted(order)  # shuffled across shards and blocks


def test_indexed_dir_through_loader_with_two_workers(wds_dir):
    def make(rank):
        s = ShardStream(wds_dir, batch_size=BATCH, shuffle=True, seed=7, rank=rank,
                        world_size=WORLD)
        return s, list(loader(s, num_workers=2))
    per_rank = epoch_keys(make)
    assert_exact(per_rank)
    in_process = ShardStream(wds_dir, batch_size=BATCH, shuffle=True, seed=7, rank=0,
                             world_size=WORLD)
    assert per_rank[0] == [k for b in in_process for k in b["__key__"]]  # same order


def test_list_of_indexed_tars_is_exact_and_matches_the_dir(wds_dir):
    kw = dict(batch_size=BATCH, shuffle=True, seed=3, rank=1, world_size=WORLD)
    listed = ShardStream(tars(wds_dir), **kw)
    assert listed.exact and len(listed) == len(ShardStream(wds_dir, **kw))
    assert [check_batch(b) for b in listed] == [list(b["__key__"])
                                               for b in ShardStream(wds_dir, **kw)]


def test_shuffle_is_deterministic_and_resumes(wds_dir):
    kw = dict(batch_size=BATCH, shuffle=True, seed=11, rank=0, world_size=WORLD)
    full = [list(b["__key__"]) for b in ShardStream(wds_dir, **kw)]
    assert full == [list(b["__key__"]) for b in ShardStream(wds_dir, **kw)]
    other = ShardStream(wds_dir, **kw)
    other.set_epoch(1)
    assert [list(b["__key__"]) for b in other] != full
    s = ShardStream(wds_dir, **kw)
    it = iter(s)
    head = [list(next(it)["__key__"]) for _ in range(5)]
    state = s.state_dict()
    resumed = ShardStream(wds_dir, **kw)
    resumed.load_state_dict(state)
    assert head + [check_batch(b) for b in resumed] == full


def test_unindexed_list_streams_as_before(wds_dir, tmp_path):
    plain = []
    for t in tars(wds_dir)[:3]:
        shutil.copy(t, tmp_path)
        plain.append(str(tmp_path / os.path.basename(t)))
    s = ShardStream(plain, batch_size=BATCH)
    assert not s.exact
    keys = [k for b in s for k in check_batch(b)]
    assert keys == [f"k{i:05d}" for i in range(3 * MAXCOUNT)]


def test_damaged_indexed_tar_names_shard_and_sample(wds_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(wds_dir, d)
    victim = tars(str(d))[4]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(CorruptShardError, match=f"{victim} is truncated.*sample 0000004"):
        list(ShardStream(str(d), batch_size=BATCH))
    s = ShardStream(str(d), batch_size=BATCH, on_error="warn")
    got = [k for b in s for k in b["__key__"]]
    assert len(got) == N  # skipped samples are padded with good ones: counts stay equal
    assert 0 < s.skipped < MAXCOUNT and f"k{5 * MAXCOUNT - 1:05d}" not in got


def test_corrupt_member_of_indexed_tar(tmp_path):
    d = str(tmp_path)
    with wds.TarWriter(os.path.join(d, "bad.tar")) as w:
        w.write({"__key__": "good", "json": b'{"a": 1}'})
        w.write({"__key__": "broken", "json": b'{"a": '})
    build_index([d])
    assert os.path.exists(os.path.join(d, "bad.tar" + INDEX_SUFFIX))
    with pytest.raises(CorruptShardError, match="bad.tar.*'broken'.*json"):
        list(ShardStream(d))
