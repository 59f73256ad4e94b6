"""shardstream.storage + retry: URLs, error triage, retries and resume against real HTTP servers."""

from __future__ import annotations

import os
import random
import sys
import time

import pytest

from shardstream.errors import ShardNotFoundError, StorageError
from shardstream.storage import backends, download, io, locks, streams, urls
from shardstream.storage.retry import RetryPolicy, classify

from servers import HTTPTestServer

pytestmark = pytest.mark.storage

FAST = RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05, timeout=5)
DATA = random.Random(7).randbytes(600_000)


@pytest.fixture
def data_server():
    with HTTPTestServer({"blob.bin": DATA}) as srv:
        yield srv


# ---------------------------------------------------------------- URLs and policy
def test_url_helpers():
    assert urls.is_remote("s3://b/x") and urls.is_remote("gs://b") and \
        urls.is_remote("https://h/x") and urls.is_remote("pipe:cat x")
    assert not urls.is_remote("/tmp/x") and not urls.is_remote("file:///tmp/x") and \
        not urls.is_remote("rel/dir")
    assert urls.join("s3://b/ds/", "shard-000000.tar") == "s3://b/ds/shard-000000.tar"
    assert urls.join("/tmp/ds", "m.json") == "/tmp/ds/m.json"
    assert urls.join("file:///tmp/ds", "m.json") == "/tmp/ds/m.json"
    assert urls.local_path("file:///tmp/ds") == "/tmp/ds"


def test_retry_policy_backoff_and_validation():
    p = RetryPolicy(base_delay=0.5, max_delay=3, jitter=False)
    assert [p.delay(k) for k in range(5)] == [0.5, 1, 2, 3, 3]
    j = RetryPolicy(base_delay=0.5, max_delay=3)
    rng = random.Random(0)
    waits = [j.delay(3, rng) for _ in range(200)]
    assert all(0 <= w <= 3 for w in waits) and len(set(waits)) > 100  # jittered
    for bad in (dict(attempts=0), dict(base_delay=-1), dict(timeout=0)):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_classify_third_party_errors():
    import aiohttp
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    assert classify(_client_error("AccessDenied", 403)) == "auth"
    assert classify(_client_error("InvalidAccessKeyId", 403)) == "auth"
    assert classify(NoCredentialsError()) == "auth"
    assert classify(PermissionError("denied")) == "auth"
    assert classify(_client_error("SlowDown", 503)) == "transient"
    assert classify(_client_error("InternalError", 500)) == "transient"
    assert classify(_client_error("NoSuchKey", 404)) == "missing"
    assert classify(_client_error("InvalidArgument", 400)) == "fatal"
    assert classify(EndpointConnectionError(endpoint_url="http://x")) == "transient"
    assert classify(ConnectionResetError()) == "transient"
    assert classify(TimeoutError()) == "transient"
    assert classify(ValueError("bad")) == "fatal"
    info = aiohttp.RequestInfo(aiohttp.client.URL("http://x"), "GET", {}, None)
    assert classify(aiohttp.ClientResponseError(info, (), status=429)) == "transient"
    assert classify(aiohttp.ClientResponseError(info, (), status=401)) == "auth"
    # s3fs wraps: OSError raised from the ClientError
    try:
        try:
            raise _client_error("SlowDown", 503)
        except Exception as exc:
            raise OSError(5, "wrapped") from exc
    except OSError as wrapped:
        assert classify(wrapped) == "transient"


# ---------------------------------------------------------------- reads over HTTP
def test_read_bytes_ranges(data_server):
    url = data_server.url("blob.bin")
    assert io.read_bytes(url, retry=FAST) == DATA
    assert io.read_bytes(url, 1000, 5000, retry=FAST) == DATA[1000:5000]
    assert io.read_bytes(url, 5, 5, retry=FAST) == b""
    assert io.size(url, retry=FAST) == len(DATA)


def test_open_stream_whole_and_offset(data_server):
    url = data_server.url("blob.bin")
    with streams.open_stream(url, chunk_size=100_000, retry=FAST) as f:
        assert f.read(10) == DATA[:10]
        assert f.read() == DATA[10:]
        assert f.read(5) == b""
    with streams.open_stream(url, start=123_457, end=400_000, size=len(DATA),
                             chunk_size=50_000, retry=FAST) as f:
        assert f.read() == DATA[123_457:400_000]


def test_drop_mid_body_resumes_by_range_never_from_zero():
    chunk = 64 * 1024
    plan = [None, "drop", None, "drop", "drop", None, None, "drop"]
    with HTTPTestServer({"blob.bin": DATA}, plan=plan, seed=1) as srv:
        with streams.open_stream(srv.url("blob.bin"), size=len(DATA), chunk_size=chunk,
                                 retry=FAST, readahead=False) as f:
            out = bytearray()
            while b := f.read(10_000):
                out += b
            assert f.retries == 4
        gets = srv.requests("GET")
    assert bytes(out) == DATA  # identical, no byte twice, none missing
    starts = [r.start for r in gets]
    assert starts.count(0) == 1  # the first request only: never re-read from zero
    for bad, nxt in zip(gets, gets[1:]):
        if bad.fault == "drop":
            assert 0 < bad.sent < chunk
            assert nxt.start == bad.start  # resumed at the first byte not yet handed out
    resent = sum(r.sent for r in gets) - len(DATA)
    assert resent == sum(r.sent for r in gets if r.fault == "drop") < 4 * chunk


@pytest.mark.parametrize("readahead", [True, False])
def test_random_faults_seeded_bytes_identical(readahead):
    with HTTPTestServer({"blob.bin": DATA}, seed=42, fail_rate=0.15, drop_rate=0.2) as srv:
        retry = RetryPolicy(attempts=30, base_delay=0.001, max_delay=0.01, timeout=5)
        with streams.open_stream(srv.url("blob.bin"), size=len(DATA), chunk_size=32 * 1024,
                                 retry=retry, readahead=readahead) as f:
            assert f.read() == DATA
            assert f.retries > 3
        faults = [r.fault for r in srv.requests("GET") if r.fault]
    assert {"503", "429", "drop"} <= set(faults)


def test_throttling_and_5xx_are_retried_with_backoff():
    plan = ["503", "429", "500", None]
    with HTTPTestServer({"blob.bin": DATA}, plan=plan) as srv:
        t0 = time.perf_counter()
        retry = RetryPolicy(attempts=5, base_delay=0.05, jitter=False, timeout=5)
        assert io.read_bytes(srv.url("blob.bin"), 0, 100, retry=retry) == DATA[:100]
        elapsed = time.perf_counter() - t0
        assert [r.status for r in srv.requests("GET")] == [503, 429, 500, 206]
    assert elapsed >= 0.05 + 0.1 + 0.2 - 0.01  # exponential waits between the tries


def test_stall_times_out_and_is_retried():
    with HTTPTestServer({"blob.bin": DATA}, plan=["stall"], stall_seconds=30) as srv:
        retry = RetryPolicy(attempts=3, base_delay=0.01, timeout=0.5)
        t0 = time.perf_counter()
        with streams.open_stream(srv.url("blob.bin"), size=len(DATA), retry=retry) as f:
            assert f.read() == DATA
        assert time.perf_counter() - t0 < 10
        gets = srv.requests("GET")
    assert [r.fault for r in gets] == ["stall", None] and gets[1].start == 0


def test_forbidden_fails_fast_without_retry_storm():
    with HTTPTestServer({"blob.bin": DATA}, forbidden={"blob.bin"}) as srv:
        url = srv.url("blob.bin")
        t0 = time.perf_counter()
        with pytest.raises(StorageError) as err:
            io.read_bytes(url, 0, 10, retry=RetryPolicy(attempts=10, base_delay=1))
        assert time.perf_counter() - t0 < 1
        assert len(srv.requests("GET")) == 1  # no retry
    msg = str(err.value)
    assert url in msg and "access denied" in msg and "credentials" in msg
    assert err.value.kind == "auth" and err.value.tries == 1


def test_budget_exhausted_names_url_and_last_error():
    with HTTPTestServer({"blob.bin": DATA}, plan=["503"] * 10) as srv:
        url = srv.url("blob.bin")
        with pytest.raises(StorageError) as err:
            io.read_bytes(url, 0, 10, retry=RetryPolicy(attempts=3, base_delay=0.01))
        assert len(srv.requests("GET")) == 3
    msg = str(err.value)
    assert url in msg and "after 3 tries" in msg and "503" in msg
    assert err.value.kind == "transient"


def test_missing_object_is_not_retried(data_server):
    url = data_server.url("nope.bin")
    with pytest.raises(ShardNotFoundError, match="nope.bin"):
        io.read_bytes(url, retry=FAST)
    assert len(data_server.requests("GET")) == 1
    assert not io.exists(url, retry=FAST) and io.exists(data_server.url("blob.bin"))


def test_pipe_urls_need_opt_in(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"hello pipe")
    url = f"pipe:cat {p}"
    with pytest.raises(StorageError, match="allow_pipe=True"):
        streams.open_stream(url)
    with pytest.raises(StorageError, match="pipe"):
        io.read_bytes(url)
    with streams.open_stream(url, allow_pipe=True) as f:
        assert f.read() == b"hello pipe"
    with pytest.raises(StorageError, match="status"):
        with streams.open_stream(f"pipe:{sys.executable} -c 'import sys; sys.exit(3)'",
                                 allow_pipe=True) as f:
            f.read()


def test_local_paths_and_file_urls(tmp_path):
    url = f"file://{tmp_path}/sub/a.bin"
    io.put_bytes(b"abcdef", url)
    assert io.read_bytes(url, 1, 3) == b"bc"
    assert io.list_prefix(f"file://{tmp_path}/sub") == ["a.bin"]
    with streams.open_stream(str(tmp_path / "sub" / "a.bin"), start=2) as f:
        assert f.read() == b"cdef"
    io.put_file(tmp_path / "sub" / "a.bin", str(tmp_path / "other" / "b.bin"))
    assert io.exists(str(tmp_path / "other" / "b.bin"))
    io.remove(str(tmp_path / "other" / "b.bin"))
    io.remove(str(tmp_path / "other" / "b.bin"))  # missing_ok
    assert io.list_prefix(str(tmp_path / "nowhere")) == []
    with pytest.raises(ShardNotFoundError):
        streams.open_stream(str(tmp_path / "nowhere.bin"))


def test_missing_package_names_the_extra(monkeypatch):
    import fsspec.core

    def boom(*a, **k):
        raise ImportError("Install gcsfs to access Google Storage")
    monkeypatch.setattr(fsspec.core, "url_to_fs", boom)
    with pytest.raises(StorageError, match=r"shardstream\[gcs\]"):
        backends.get_fs("gs://bucket/x")


# ---------------------------------------------------------------- cache
def test_fetch_to_cache_dataset_reuse_and_lru(make_dataset, tmp_path):
    from shardstream.read.dataset import open_dataset
    from shardstream.read.verify import verify

    a = make_dataset(300, "a")
    b = make_dataset(200, "b")
    cache = str(tmp_path / "cache")
    with HTTPTestServer(str(tmp_path)) as srv:
        local = download.fetch_to_cache(srv.url("a"), cache, retry=FAST)
        assert verify(local).ok and open_dataset(local).manifest.num_samples == 300
        n = len(srv.requests("GET"))
        assert download.fetch_to_cache(srv.url("a"), cache, retry=FAST) == local
        assert len(srv.requests("GET")) == n + 1  # only the manifest again
        size_a = sum(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local))
        time.sleep(0.01)
        local_b = download.fetch_to_cache(srv.url("b"), cache, max_bytes=size_a + 10,
                                         retry=FAST)
        assert os.path.isdir(local_b) and not os.path.exists(local)  # LRU evicted a
        one = download.fetch_to_cache(srv.url("a/shard-000000.tar"), cache, retry=FAST)
        with open(one, "rb") as f, open(os.path.join(a, "shard-000000.tar"), "rb") as g:
            assert f.read() == g.read()
    assert download.fetch_to_cache(b, cache) == b  # local: unchanged


def test_shard_dataset_over_http_uses_the_cache(make_dataset, tmp_path):
    from shardstream.pytorch.random_access import ShardDataset

    make_dataset(120, "ds")
    with HTTPTestServer(str(tmp_path)) as srv:
        ds = ShardDataset(srv.url("ds"), cache_dir=str(tmp_path / "cache"))
        assert len(ds) == 120 and ds[57]["id"] == 57


def test_forked_child_gets_a_private_selector_for_the_inherited_fsspec_loop():
    """A child closing inherited connections must not touch the parent's epoll instance
    (the parent's next request on a pooled connection would hang until its timeout)."""
    import multiprocessing as mp

    import fsspec.asyn

    import shardstream.storage.backends  # noqa: F401  (registers the fork handler)

    loop = fsspec.asyn.get_loop()
    parent_fd = loop._selector.fileno()

    def child(conn) -> None:
        conn.send(loop._selector.fileno() != parent_fd)

    here, there = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=child, args=(there,))
    proc.start()
    assert here.recv() is True
    proc.join(10)
    assert loop._selector.fileno() == parent_fd  # the parent's loop is untouched


# ---------------------------------------------------------------- downloads into the cache
def test_download_parallel_ranges_resume_and_land_whole(tmp_path):
    """Several range requests in flight, each resumed at its own first missing byte;
    the file appears complete (rename) and nothing is left behind."""
    chunk = 25_000
    with HTTPTestServer({"blob.bin": DATA}, seed=3, drop_rate=0.4, fail_rate=0.1) as srv:
        dest = str(tmp_path / "blob")
        retry = RetryPolicy(attempts=30, base_delay=0.001, max_delay=0.01, timeout=5)
        download.download(srv.url("blob.bin"), dest, None, retry, len(DATA),
                          chunk_size=chunk, streams=4)
        gets = srv.requests("GET")
    with open(dest, "rb") as f:
        assert f.read() == DATA
    assert os.listdir(tmp_path) == ["blob"]
    assert any(r.fault == "drop" for r in gets)
    for k, bad in enumerate(gets):  # a dropped request resumes where it broke, not earlier
        if bad.fault == "drop":
            chunk_start = bad.start - (bad.start % chunk) if bad.start % chunk else bad.start
            later = [r for r in gets[k + 1:] if r.start is not None and
                     chunk_start <= r.start < chunk_start + chunk]
            assert later and all(r.start >= bad.start for r in later)
    assert sorted(r.start for r in gets if r.fault is None and r.start % chunk == 0) == \
        list(range(0, len(DATA), chunk))  # every chunk asked for once from its start


def test_download_failing_midway_leaves_nothing_that_looks_complete(tmp_path):
    chunk = 100_000
    plan = [None, None] + ["503"] * 20  # two chunks land, then the server keeps failing
    with HTTPTestServer({"blob.bin": DATA}, plan=plan) as srv:
        dest = str(tmp_path / "blob")
        retry = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.01, timeout=5)
        with pytest.raises(StorageError, match="blob.bin") as err:
            download.download(srv.url("blob.bin"), dest, None, retry, len(DATA),
                              chunk_size=chunk, streams=1)
    assert "2 tries" in str(err.value)
    assert os.listdir(tmp_path) == []  # no dest, no .part- file


def test_lock_released_although_a_forked_child_holds_the_fd(tmp_path):
    """The start-up fetch downloads under a lock in the process that forks the workers:
    unlocking must not depend on the children closing their copies of the fd."""
    lock = str(tmp_path / ".x.lock")
    r, w = os.pipe()
    with locks.locked(lock) as got:
        assert got
        pid = os.fork()
        if pid == 0:  # keeps the inherited fd open until the parent says so
            os.close(w)
            os.read(r, 1)
            os._exit(0)
    try:
        with locks.locked(lock, blocking=False) as got:
            assert got  # released while the child still holds its copy
    finally:
        os.close(w)
        os.close(r)
        os.waitpid(pid, 0)


def test_stale_partial_downloads_are_evicted(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    old, fresh = cache / ".part-old", cache / ".part-fresh"
    old.write_bytes(b"x" * 10)
    fresh.write_bytes(b"x" * 10)
    then = time.time() - locks._STALE_PART_S - 60
    os.utime(old, (then, then))
    locks.evict(str(cache), 1 << 30, keep="")
    assert sorted(os.listdir(cache)) == [".part-fresh"]  # a live download stays


def test_s3_sessions_share_parsed_botocore_data_across_fork():
    """Each process gets its own botocore session (credentials, event loop state), but
    a forked worker reuses the parent's parsed service models instead of re-parsing."""
    pytest.importorskip("s3fs")
    opts = {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9"}
    fs, _ = backends.get_fs("s3://b/x", opts)
    fs2, _ = backends.get_fs("s3://b/y", opts)
    assert fs.session is fs2.session is not None
    loader = fs.session.get_component("data_loader")
    assert backends.get_fs("s3://b/x", {**opts, "profile_name_unknown": 1}, timeout=None
                          )[0].session is None  # unknown session arguments: s3fs's own
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child, _ = backends.get_fs("s3://b/x", opts)
            ok = child.session is not fs.session and \
                child.session.get_component("data_loader") is loader
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
