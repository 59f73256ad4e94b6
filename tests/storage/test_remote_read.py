"""Streaming reads from object storage: SeaweedFS (S3) and HTTP servers on 127.0.0.1."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest

from shardstream.cli.commands import write_main
from shardstream.errors import StorageError
from shardstream.format.manifest import MANIFEST_NAME
from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream
from shardstream.storage import io as storage_io
from shardstream.storage import urls
from shardstream.storage.io import load_manifest
from shardstream.storage.retry import RetryPolicy
from shardstream.write.writer import ShardWriter

from conftest import sample
from servers import HTTPTestServer

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.storage

FAST = RetryPolicy(attempts=8, base_delay=0.005, max_delay=0.05, timeout=5)
N = 600


def _write(url: str, n: int = N, opts: dict | None = None) -> str:
    with ShardWriter(url, max_samples=97, block_bytes=1024, fsync=False,
                     storage_options=opts) as w:
        for i in range(n):
            w.write(sample(i))
    return url


def _ids(ds) -> list[int]:
    return [i for b in ds for i in (b["id"].tolist() if ds.batch_size else [b["id"]])]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k])
        else:
            assert a[k] == b[k]


def test_s3_manifest_equals_local_read(s3_server, s3_bucket, tmp_path):
    opts = s3_server.storage_options
    local, url = _write(str(tmp_path / "ds")), _write(f"{s3_bucket}/ds", opts=opts)
    kw = dict(shuffle=True, seed=3, shuffle_buffer=128)
    cache = str(tmp_path / "cache")
    remote = ShardStream(url, storage_options=opts, cache_dir=cache, **kw)
    assert remote.exact and remote.num_samples == N
    got, want = list(remote), list(ShardStream(local, **kw))
    assert [s["id"] for s in got] == [s["id"] for s in want] and len(got) == N
    for a, b in zip(got, want):
        _same(a, b)
    m = load_manifest(url, opts)
    cached = os.listdir(cache)
    assert sum(n.endswith(".tar") for n in cached) == len(m.shards)  # each shard once
    remote.set_epoch(1)  # epoch 2 from the cache: same as local epoch 2
    b = ShardStream(local, batch_size=32, **kw)
    b.set_epoch(1)
    r = ShardStream(url, storage_options=opts, cache_dir=cache, batch_size=32, **kw)
    r.set_epoch(1)
    assert _ids(r) == _ids(b)


def test_http_manifest_and_brace_pattern(tmp_path):
    local = _write(str(tmp_path / "ds"))
    names = sorted(n for n in os.listdir(local) if n.endswith(".tar"))
    with HTTPTestServer(str(tmp_path)) as srv:
        ds = ShardStream(srv.url("ds"), batch_size=50, shuffle=True, seed=1,
                         cache_dir=str(tmp_path / "c1"), retry=FAST)
        assert _ids(ds) == _ids(ShardStream(local, batch_size=50, shuffle=True, seed=1))
        assert any(r.start is not None for r in srv.requests())  # range requests
        pattern = srv.url(f"ds/shard-{{000000..{len(names) - 1:06d}}}.tar")
        ds = ShardStream(pattern, cache_dir=str(tmp_path / "c2"), retry=FAST)
        assert not ds.exact and sorted(_ids(ds)) == list(range(N))


def _wds_tar(path: str, first: int, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            for ext, data in (("json", json.dumps({"id": i}).encode()),
                              ("txt", f"text {i}".encode() * 50)):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_foreign_tars_stream_through_faults_without_gopen(tmp_path, monkeypatch):
    import webdataset.tariterators as ti

    def no_gopen(*a, **k):
        raise AssertionError("webdataset gopen must not be used")
    monkeypatch.setattr(ti.gopen, "gopen", no_gopen)
    d = tmp_path / "wds"
    d.mkdir()
    for k in range(4):
        _wds_tar(str(d / f"w-{k}.tar"), k * 50, 50)
    with HTTPTestServer(str(tmp_path), seed=5, drop_rate=0.4, fail_rate=0.2) as srv:
        ds = ShardStream(srv.url("wds/w-{0..3}.tar"), retry=FAST, shuffle=True,
                         shuffle_buffer=16)
        ids = [json.loads(s["json"])["id"] if isinstance(s["json"], (bytes, str))
               else s["json"]["id"] for s in ds]
        assert sorted(ids) == list(range(200))  # every sample exactly once
        assert any(r.fault == "drop" for r in srv.log)


def test_prefix_listing_without_manifest(s3_server, s3_bucket, tmp_path):
    opts = s3_server.storage_options
    url = _write(f"{s3_bucket}/loose", opts=opts)
    storage_io.remove(urls.join(url, MANIFEST_NAME), storage_options=opts)
    ds = ShardStream(url + "/", storage_options=opts, cache_dir=str(tmp_path / "c"))
    assert not ds.exact and len(ds.urls) == 7 and ds.urls == sorted(ds.urls)
    assert sorted(_ids(ds)) == list(range(N))
    with pytest.raises(Exception, match="no manifest.json and no .tar"):
        ShardStream(f"{s3_bucket}/nothing-here", storage_options=opts)


def test_faults_resume_every_sample_exactly_once(tmp_path):
    local = _write(str(tmp_path / "ds"))
    with HTTPTestServer(str(tmp_path), seed=11, drop_rate=0.3, fail_rate=0.2) as srv:
        ds = ShardStream(srv.url("ds"), batch_size=40, shuffle=True, seed=2, retry=FAST,
                         cache_dir=str(tmp_path / "c"))
        got = _ids(ds)
        assert got == _ids(ShardStream(local, batch_size=40, shuffle=True, seed=2))
        assert sorted(got) == list(range(N))
        faults = [r.fault for r in srv.log]
        assert "drop" in faults and ("503" in faults or "429" in faults)
        # every dropped request is retried from its own range start, no earlier
        for k, d in enumerate(srv.log):
            if d.fault == "drop":
                later = [r for r in srv.log[k + 1:] if r.path == d.path and r.fault is None]
                assert later and all((r.start or 0) >= (d.start or 0) for r in later)


def test_forbidden_fails_fast(tmp_path):
    _write(str(tmp_path / "ds"))
    with HTTPTestServer(str(tmp_path), forbidden={"ds/shard-000000.tar"}) as srv:
        for on_error in ("raise", "warn"):
            ds = ShardStream(srv.url("ds"), on_error=on_error, cache_dir=str(tmp_path / "c"))
            with pytest.raises(StorageError, match="access denied") as err:
                list(ds)
            assert "shard-000000.tar" in str(err.value) and "credentials" in str(err.value)
        assert len(srv.requests("GET", "ds/shard-000000.tar")) == 2  # one per run: no retries


def test_warn_skips_a_failing_shard_and_counts_it(tmp_path, caplog):
    _write(str(tmp_path / "ds"))
    m = load_manifest(str(tmp_path / "ds"))
    bad = m.shards[2]
    with HTTPTestServer(str(tmp_path)) as srv:
        srv.next_fault = lambda path, body: "503" if path == f"ds/{bad.name}" else None
        retry = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, timeout=5)
        kw = dict(batch_size=25, world_size=2, on_error="warn", retry=retry,
                  cache_dir=str(tmp_path / "c"))
        with caplog.at_level(logging.WARNING, logger="shardstream"):
            r0 = ShardStream(srv.url("ds"), rank=0, **kw)
            r1 = ShardStream(srv.url("ds"), rank=1, **kw)
            b0, b1 = _ids(r0), _ids(r1)
        assert len(b0) == len(b1) == N // 2  # ranks stay equal
        assert r0.skipped + r1.skipped == bad.num_samples
        assert set(range(N)) - set(b0 + b1) == set(range(194, 194 + bad.num_samples))
        text = caplog.text
        assert f"ds/{bad.name}" in text and "503" in text and "3 tries" in text


def test_cli_write_to_s3_then_two_workers(s3_server, s3_bucket, tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "v": [i] * (i % 4 + 1)}) + "\n"
                           for i in range(1000)))
    url = f"{s3_bucket}/cli"
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    assert write_main([str(src), "-o", url, "--max-samples", "150", "-q"]) == 0
    ds = ShardStream(url, batch_size=32, shuffle=True, cache_dir=str(tmp_path / "c"))
    ids = [i for b in loader(ds, num_workers=2) for i in b["id"].tolist()]
    assert sorted(ids) == list(range(1000))
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith(".part-")]


@pytest.mark.slow
def test_torchrun_two_ranks_over_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    from test_distributed import torchrun

    url = _write(f"{s3_bucket}/ddp", n=1003, opts=s3_server.storage_options)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    out.mkdir()
    script = os.path.join(TESTS, "scripts", "ddp_remote.py")
    torchrun(script, url, str(out), str(tmp_path / "cache"))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == ranks[0]["len"]
    flat = [i for r in ranks for b in r["batches"] for i in b]
    assert sorted(set(flat)) == list(range(1003)) and len(flat) == 1004  # pad repeats 1


@pytest.mark.slow
def test_two_torchrun_nodes_over_s3_each_download_their_share(s3_server, s3_bucket, tmp_path,
                                                              monkeypatch):
    """Two torchrun nodes x 2 ranks x 2 workers on this machine, one cache dir per node,
    reading from SeaweedFS: one exact epoch, and each node downloads about half of
    the dataset's shards and bytes, each shard once (the stream's cache_stats)."""
    from test_distributed import torchrun_nodes

    n = 2000
    url = _write(f"{s3_bucket}/nodes", n=n, opts=s3_server.storage_options)
    m = load_manifest(url, s3_server.storage_options)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    out.mkdir()
    script = os.path.join(TESTS, "scripts", "ddp_remote.py")
    torchrun_nodes(script, url, str(out), str(tmp_path / "cache-{node}"))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert len({len(r["batches"]) for r in ranks}) == 1
    flat = [i for r in ranks for b in r["batches"] for i in b]
    assert set(flat) == set(range(n)) and len(flat) - n < 4
    total = sum(s.bytes for s in m.shards)
    for node in (0, 1):
        stats = [r["stats"] for r in ranks if r["node"] == node]
        shards = sum(s["shards_downloaded"] for s in stats)
        got = sum(s["bytes_downloaded"] for s in stats)
        assert shards <= len(m.shards) / 2 + 1  # its share (+ the shard at the cut), once
        assert got <= total / 2 + max(s.bytes for s in m.shards) + 64 * 1024 * len(m.shards)
        cached = [f for f in os.listdir(tmp_path / f"cache-{node}") if f.endswith(".tar")]
        assert len(cached) == shards  # each shard downloaded once per node


def _wait_start_fetch(ds) -> None:
    for fut in list(ds.remote._own_pending().values()):
        fut.exception(timeout=30)


def test_start_fetch_downloads_the_first_shard_once_for_the_reader(tmp_path):
    local = _write(str(tmp_path / "ds"))
    m = load_manifest(local)
    with HTTPTestServer(str(tmp_path)) as srv:
        cache = tmp_path / "c"
        ds = ShardStream(srv.url("ds"), batch_size=32, cache_dir=str(cache), retry=FAST)
        assert not srv.requests("GET", f"ds/{m.shards[0].name}")  # building downloads nothing
        ds.start_fetch()
        _wait_start_fetch(ds)  # the first shard and its index are being fetched
        assert len(srv.requests("GET", f"ds/{m.shards[0].name}")) == 1
        assert [n for n in os.listdir(cache) if n.endswith(m.shards[0].name)]
        assert _ids(ds) == _ids(ShardStream(local, batch_size=32))
        for s in m.shards:  # the reader took the fetched copy: each object once
            assert len(srv.requests("GET", f"ds/{s.name}")) == 1
            assert len(srv.requests("GET", f"ds/{s.index}")) == 1


def test_workers_start_while_the_first_shard_still_downloads(tmp_path):
    """The loader starts the first shard's download (``start_fetch``) and holds it when
    the DataLoader workers fork: they wait for it (no second download), read every sample
    exactly once, and fetch each other index and shard once between them."""
    import threading
    import time

    local = _write(str(tmp_path / "ds"))
    m = load_manifest(local)
    first = f"ds/{m.shards[0].name}"
    slow = threading.Event()

    def delay_first_shard(path: str, body: bool) -> None:
        if path == first and body and not slow.is_set():
            slow.set()
            time.sleep(1.0)
        return None
    with HTTPTestServer(str(tmp_path)) as srv:
        srv.next_fault = delay_first_shard
        cache = tmp_path / "c"
        ds = ShardStream(srv.url("ds"), batch_size=32, cache_dir=str(cache), retry=FAST)
        assert not slow.is_set()  # building the stream downloads nothing
        # the loader starts the first shard's download, then the workers while it is held
        ids = [i for b in loader(ds, num_workers=2) for i in b["id"].tolist()]
        assert slow.is_set()
        assert sorted(ids) == list(range(N))
        for s in m.shards:
            assert len(srv.requests("GET", f"ds/{s.name}")) == 1
            assert len(srv.requests("GET", f"ds/{s.index}")) == 1
    assert not [n for n in os.listdir(cache) if n.startswith(".part-")]


def test_start_fetch_failure_reaches_the_reader_with_the_url(tmp_path):
    _write(str(tmp_path / "ds"))
    with HTTPTestServer(str(tmp_path), forbidden={"ds/shard-000000.tar"}) as srv:
        ds = ShardStream(srv.url("ds"), cache_dir=str(tmp_path / "c"), retry=FAST)
        ds.start_fetch()
        _wait_start_fetch(ds)
        with pytest.raises(StorageError, match="shard-000000.tar.*access denied"):
            list(ds)
        assert len(srv.requests("GET", "ds/shard-000000.tar")) == 1  # not asked again


def test_read_ahead_skips_shards_another_process_fetches():
    """A shard another process is downloading (fetch returns None) takes no place in
    the read-ahead: the thread goes on to the next ones instead of waiting for the
    reader to get there."""
    import threading

    from shardstream.storage.readahead import Prefetcher
    fetched, release = [], threading.Event()

    def fetch(key):
        if key in ("a", "b", "c"):
            return None  # another process has them
        fetched.append(key)
        if len(fetched) == 2:
            release.set()
        return f"path-{key}"

    p = Prefetcher(fetch, ["a", "b", "c", "d", "e", "f"], depth=2)
    try:
        assert release.wait(5), fetched
        assert fetched == ["d", "e"]  # nothing taken yet: d and e fill the two places
        assert p.take("a") is None  # the reader fetches (waits for) these itself
        assert p.take("d") == "path-d"
        for _ in range(100):
            if len(fetched) == 3:
                break
            threading.Event().wait(0.01)
        assert fetched == ["d", "e", "f"]
    finally:
        p.close()
