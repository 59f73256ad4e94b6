"""The node cache follows the schedule: read-ahead along the node's sequence, eviction
by next use, never an entry a reader holds; an epoch at the minimum cache is exact."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream
from shardstream.read.nodes import NextUse
from shardstream.storage import locks
from shardstream.storage.readahead import Prefetcher
from shardstream.storage.retry import RetryPolicy
from shardstream.write.writer import ShardWriter

from conftest import sample
from servers import HTTPTestServer

FAST = RetryPolicy(attempts=8, base_delay=0.005, max_delay=0.05, timeout=5)


def _wait(cond, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if cond():
            return True
        threading.Event().wait(0.01)
    return cond()


def test_positioned_read_ahead_stays_depth_shards_ahead_of_the_reader():
    """Every process of a node walks the same schedule: a shard another process has
    (fetch returns None) still counts as ahead, and a shard frees its place once the
    reader passes its first use, not when this process takes it."""
    fetched = []

    def fetch(key):
        if key == "b":
            return None  # another process of the node downloads it
        fetched.append(key)
        return f"path-{key}"

    order = [("a", 10), ("b", 20), ("c", 30), ("d", 40), ("e", 50), ("f", 60)]
    p = Prefetcher(fetch, order, depth=2, positioned=True)
    try:
        assert _wait(lambda: fetched == ["a"])
        threading.Event().wait(0.05)
        assert fetched == ["a"]  # a and b are the two ahead
        p.advance(15)  # past a's first use (this process never reads a itself)
        assert _wait(lambda: fetched == ["a", "c"])
        p.advance(45)  # past b, c, d: d's first use is passed, so d is skipped
        assert _wait(lambda: fetched == ["a", "c", "e", "f"])
        assert p.take("c") == "path-c"
    finally:
        p.close()


def _entries(tmp_path, names, nbytes=10):
    d = tmp_path / "cache"
    d.mkdir()
    for n in names:
        (d / n).write_bytes(b"x" * nbytes)
    return str(d)


def _names(d):
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def test_eviction_drops_the_entry_needed_last_first(tmp_path):
    d = _entries(tmp_path, ["e1", "e2", "e3", "e4"])
    when = {"e1": 1.0, "e2": float("inf"), "e3": 5.0, "e4": 2.0}
    locks.evict(d, 25, keep=os.path.join(d, "e1"),
                next_use=lambda p: when[os.path.basename(p)])
    assert _names(d) == ["e1", "e4"]  # never again, then the farthest


def test_eviction_by_next_use_never_drops_an_entry_a_reader_holds(tmp_path):
    d = _entries(tmp_path, ["e1", "e2", "e3", "e4"])
    when = {"e1": 1.0, "e2": float("inf"), "e3": 5.0, "e4": 2.0}
    fd = locks.open_shared(os.path.join(d, "e2"))
    try:
        locks.evict(d, 25, keep=os.path.join(d, "e1"),
                    next_use=lambda p: when[os.path.basename(p)])
        assert _names(d) == ["e1", "e2"]  # e3 then e4 went instead
    finally:
        os.close(fd)


def test_next_use_counts_steps_to_the_shards_next_window():
    shard_of = np.array([0] * 10 + [1] * 10 + [2] * 10 + [0] * 10 + [1] * 10)
    pos = [0]

    nu = NextUse(lambda p: shard_of[p], 0, 50, position=lambda: pos[0],
                 entries=lambda: {"s0": 0, "s1": 1, "s2": 2})
    nu.step = 10
    assert [nu(f"/c/s{s}") for s in range(3)] == [0.0, 1.0, 2.0]
    pos[0] = 25  # in step 2: shard 2 now, 0 in 1 step, 1 in 2
    assert [nu(f"s{s}") for s in range(3)] == [1.0, 2.0, 0.0]
    pos[0] = 45
    assert nu("s2") == float("inf") and nu("s0") == float("inf") and nu("s1") == 0.0
    assert nu("another-dataset") == float("inf")


@pytest.mark.storage
@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_at_the_minimum_cache_is_exact_and_stays_within_it(tmp_path, workers):
    """A cache limit just at what the schedule needs: the epoch is exact, eviction keeps
    the cache within the limit, and shards come down about once each."""
    local = str(tmp_path / "ds")
    with ShardWriter(local, max_samples=60, block_bytes=1024, fsync=False) as w:
        for i in range(1200):
            w.write(sample(i))
    with HTTPTestServer(str(tmp_path)) as srv:
        cache = tmp_path / "c"
        probe = ShardStream(srv.url("ds"), batch_size=16, shuffle=True, shuffle_buffer=120,
                            cache_dir=str(cache), retry=FAST, seed=3)
        need = probe.mode.cache_needed(0, probe.options, probe_place(probe))
        ds = ShardStream(srv.url("ds"), batch_size=16, shuffle=True, shuffle_buffer=120,
                         cache_dir=str(cache), retry=FAST, seed=3, cache_limit=need)
        ids = []
        for b in loader(ds, num_workers=workers):
            ids += b["id"].tolist()
            on_disk = sum(_size(cache / n) for n in os.listdir(cache)
                          if not n.startswith(".") and n.endswith(".tar"))
            assert on_disk <= need + max(s.bytes for s in ds.mode.dataset.manifest.shards)
        assert sorted(ids) == list(range(1200))
        shards = ds.mode.dataset.manifest.shards
        gets = sum(len(srv.requests("GET", f"ds/{s.name}")) > 0 for s in shards)
        assert gets == len(shards)
        total = sum(len(srv.requests("GET", f"ds/{s.name}")) for s in shards)
        assert total <= 2 * len(shards)  # a window coming back to an evicted shard: rare


def _size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # evicted meanwhile
        return 0


def probe_place(stream):
    from shardstream.pytorch.resume import plan
    return plan(stream, stream.world(), 0)[2]
