"""End to end on every store, against real servers on 127.0.0.1: SeaweedFS (S3), Azurite
(Azure Blob), fake-gcs-server (GCS) and HTTP (read only: a local dataset served by
:class:`servers.HTTPTestServer`).

Per store: ``shardstream-write -o URL`` then a 2-worker ``ShardStream`` read (every
sample once, values intact, each shard downloaded once); ``ShardDataset`` random access;
a shard object overwritten with garbage of its size is an error naming the shard.
Object stores: a ``ShardWriter`` shard above the multipart threshold read back exactly.
HTTP with injected faults: every sample once with 2 workers.

Each emulator starts only when a test of its store runs (``request.getfixturevalue``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest

from shardstream import ShardDataset
from shardstream.cli.commands import write_main
from shardstream.errors import CorruptShardError
from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream
from shardstream.storage import io as storage_io
from shardstream.storage import objstore
from shardstream.storage.io import load_manifest
from shardstream.storage.retry import RetryPolicy
from shardstream.write.writer import ShardWriter

from conftest import sample
from servers import HTTPTestServer

pytestmark = pytest.mark.storage

FAST = RetryPolicy(attempts=10, base_delay=0.005, max_delay=0.05, timeout=10)
MB = 1 << 20
N_CLI = 400  # JSONL rows written by the CLI
N_API = 300  # samples written with ShardWriter
#: the fixture giving each store's root URL (the emulator starts on first use)
STORES = ["s3_bucket", "azure_container", "gcs_bucket", "http_root"]
OBJECT_STORES = STORES[:3]

# ---------------------------------------------------------------- stores
@dataclass
class Store:
    """One store's view for the tests: where to write, what to read, which options."""

    kind: str  # s3, azure, gcs, http
    root: str  # URL of the (empty) bucket / container / served directory
    options: dict[str, Any] | None
    server: Any = None
    local_root: str | None = None  # http: the directory the server serves
    http: HTTPTestServer | None = field(default=None, repr=False)

    def url(self, name: str) -> str:
        """Where readers find dataset ``name``."""
        return f"{self.root.rstrip('/')}/{name}"

    def target(self, name: str) -> str:
        """Where writers put dataset ``name`` (http is read-only: the served directory)."""
        return os.path.join(self.local_root, name) if self.kind == "http" else self.url(name)

    def cli_options(self) -> list[str]:
        """``--storage-option`` arguments for these options (dotted keys nest)."""
        out: list[str] = []

        def flat(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and not (self.kind == "gcs" and prefix == "token"):
                for k, v in value.items():
                    flat(f"{prefix}.{k}" if prefix else k, v)
            else:
                text = value if isinstance(value, str) else json.dumps(value)
                out.extend(["--storage-option", f"{prefix}={text}"])
        opts = dict(self.options or {})
        if self.kind == "gcs":  # the service-account JSON as a user types it: token={...}
            opts["token"] = json.loads(opts.pop("service_account_key"))
        flat("", opts)
        return out

    def overwrite(self, name: str, data: bytes) -> None:
        """Replace object ``name`` (a path under the root) with ``data``."""
        if self.kind == "http":
            with open(os.path.join(self.local_root, name), "wb") as f:
                f.write(data)
        else:
            storage_io.put_bytes(data, self.url(name), storage_options=self.options)


@pytest.fixture
def http_root(tmp_path):
    """A plain HTTP server over an empty directory, as its root URL."""
    root = tmp_path / "served"
    root.mkdir()
    with HTTPTestServer(str(root)) as srv:
        yield srv


def _store_for(request, name: str) -> Store:
    """The :class:`Store` behind fixture ``name`` (starting its server on first use)."""
    value = request.getfixturevalue(name)
    if name == "http_root":
        return Store("http", value.url(""), None, local_root=value.source, http=value)
    if name == "s3_bucket":
        server = request.getfixturevalue("s3_server")
        return Store("s3", value, dict(server.storage_options), server)
    azure = name == "azure_container"
    server = request.getfixturevalue("azure_server" if azure else "gcs_server")
    return Store("azure" if azure else "gcs", value, server.storage_options(), server)


@pytest.fixture(params=STORES)
def store(request) -> Store:
    return _store_for(request, request.param)


@pytest.fixture(params=OBJECT_STORES)
def object_store(request) -> Store:
    return _store_for(request, request.param)


# ---------------------------------------------------------------- helpers
def _row(i: int) -> dict:
    """One JSONL row: int, float, str, ragged int list, nested dict."""
    return {"id": i, "f": i / 4, "s": f"row-{i}", "v": [i] * (i % 4 + 1),
            "meta": {"even": i % 2 == 0}}


def _write_api(url: str, opts: dict | None, n: int = N_API) -> str:
    with ShardWriter(url, max_samples=70, block_bytes=1024, fsync=False,
                     storage_options=opts) as w:
        for i in range(n):
            w.write(sample(i))
    return url


def _unbatch(batch: dict) -> list[dict]:
    """A collated batch back to its samples (ragged arrays cut to their lengths)."""
    n = len(batch["id"])
    out: list[dict] = [{} for _ in range(n)]
    for k, col in batch.items():
        if k.endswith("_lengths") and k[:-len("_lengths")] in batch:
            continue
        lengths = batch.get(f"{k}_lengths")
        for j in range(n):
            if isinstance(col, dict):
                out[j][k] = {kk: _plain(vv[j]) for kk, vv in col.items()}
            elif lengths is not None:
                out[j][k] = _plain(col[j][:int(lengths[j])])
            else:
                out[j][k] = _plain(col[j])
    return out


def _plain(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _cached_tars(cache: str) -> list[str]:
    return [n for n in os.listdir(cache) if n.endswith(".tar")]


# ---------------------------------------------------------------- 1. CLI write, 2-worker read
def test_cli_write_then_two_workers_read_every_sample_once(store, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(N_CLI)))
    argv = [str(src), "-o", store.target("cli"), "--max-samples", "60", "--block-size", "2k",
            "-q", "--no-fsync"]
    assert write_main(argv + ([] if store.kind == "http" else store.cli_options())) == 0
    url = store.url("cli")
    m = load_manifest(url, store.options)
    assert m.num_samples == N_CLI and len(m.shards) == 7
    cache = str(tmp_path / "cache")
    ds = ShardStream(url, batch_size=32, shuffle=True, seed=4, storage_options=store.options,
                     cache_dir=cache, retry=FAST)
    got = [s for b in loader(ds, num_workers=2, persistent_workers=False) for s in _unbatch(b)]
    assert sorted(s["id"] for s in got) == list(range(N_CLI))  # every sample exactly once
    for s in got:
        assert s == _row(s["id"]), s
    stats = ds.cache_stats
    assert stats["shards_downloaded"] == len(m.shards), stats  # each shard once
    assert stats["indexes_downloaded"] == len(m.shards), stats
    index_bytes = sum(storage_io.size(store.url(f"cli/{s.index}"), storage_options=store.options)
                      for s in m.shards)
    assert stats["bytes_downloaded"] == sum(s.bytes for s in m.shards) + index_bytes, stats
    assert len(_cached_tars(cache)) == len(m.shards)
    assert not [n for n in os.listdir(cache) if n.startswith(".part-")]
    if store.http is not None:  # server side: each shard's bytes asked for once
        for s in m.shards:
            gets = store.http.requests("GET", f"cli/{s.name}")
            assert sum(r.sent for r in gets) == s.bytes, (s.name, gets)


# ---------------------------------------------------------------- 2. random access
@pytest.mark.parametrize("name", STORES)
def test_random_access(name, request, tmp_path):
    store = _store_for(request, name)
    _write_api(store.target("ra"), store.options)
    kw = {} if store.options is None else {"storage_options": store.options}
    ds = ShardDataset(store.url("ra"), cache_dir=str(tmp_path / "cache"), **kw)
    try:
        assert len(ds) == N_API
        for i in (0, 1, 69, 70, 151, N_API - 1, -1):
            want = sample(i % N_API)
            got = ds[i]
            assert got["id"] == want["id"] and got["s"] == want["s"] and got["f"] == want["f"]
            assert np.array_equal(got["x"], want["x"]) and got["meta"] == want["meta"]
    finally:
        ds.close()


@pytest.mark.parametrize("name", ["azure_container", "gcs_bucket", "s3_bucket"])
def test_random_access_with_credentials_from_the_environment(name, request, tmp_path,
                                                             monkeypatch):
    """What works today without storage_options: the provider environment."""
    store = _store_for(request, name)
    _write_api(store.target("ra"), store.options)
    for k in list(os.environ):
        if k.startswith(("AWS_", "AZURE_", "AZURITE_", "GOOGLE_")):
            monkeypatch.delenv(k)
    server = store.server
    env = {"s3": lambda: server.env,
           "azure": lambda: {"AZURE_STORAGE_ACCOUNT_NAME": server.ACCOUNT,
                             "AZURE_STORAGE_ACCOUNT_KEY": server.KEY,
                             "AZURE_STORAGE_ENDPOINT": server.endpoint,
                             "AZURE_ALLOW_HTTP": "true"},
           "gcs": lambda: {"GOOGLE_SERVICE_ACCOUNT_KEY": server.service_account_key,
                           "GOOGLE_BASE_URL": server.url}}[store.kind]()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ds = ShardDataset(store.url("ra"), cache_dir=str(tmp_path / "cache"))
    try:
        assert len(ds) == N_API
        for i in (0, 70, N_API - 1):
            assert ds[i]["id"] == i and ds[i]["s"] == f"s{i}"
    finally:
        ds.close()


# ---------------------------------------------------------------- 3. a corrupt object
def test_shard_overwritten_with_garbage_names_the_shard(store, tmp_path):
    _write_api(store.target("bad"), store.options)
    url = store.url("bad")
    m = load_manifest(url, store.options)
    bad = m.shards[2]
    garbage = random.Random(7).randbytes(bad.bytes)
    store.overwrite(f"bad/{bad.name}", garbage)
    assert storage_io.size(store.url(f"bad/{bad.name}"),
                           storage_options=store.options) == bad.bytes  # same size
    ds = ShardStream(url, batch_size=16, storage_options=store.options, on_error="raise",
                     cache_dir=str(tmp_path / "cache"), retry=FAST)
    with pytest.raises(CorruptShardError) as err:
        for _ in ds:
            pass
    assert store.url(f"bad/{bad.name}") in str(err.value) and "checksum" in str(err.value)


# ---------------------------------------------------------------- 4. multipart via the API
def test_shard_writer_multipart_shard_reads_back_exactly(object_store, tmp_path):
    store = object_store
    url = store.url("big")
    blobs = [random.Random(i).randbytes(MB + 1000 * i) for i in range(18)]  # ~18 MiB, 1 shard
    with ShardWriter(url, fsync=False, storage_options=store.options) as w:
        for i, b in enumerate(blobs):
            w.write({"id": i, "blob": b})
    m = load_manifest(url, store.options)
    assert len(m.shards) == 1 and m.shards[0].bytes > objstore.MULTIPART_THRESHOLD
    shard = m.shards[0].name
    _assert_multipart(store, f"big/{shard}")
    ds = ShardStream(url, storage_options=store.options, cache_dir=str(tmp_path / "c"),
                     retry=FAST)
    got = {s["id"]: hashlib.sha256(s["blob"]).hexdigest() for s in ds}
    assert got == {i: hashlib.sha256(b).hexdigest() for i, b in enumerate(blobs)}


def _assert_multipart(store: Store, name: str) -> None:
    """The object went up in parts (each server says so its own way)."""
    if store.kind == "s3":
        import obstore

        ob, path = objstore.store_for(store.url(name), store.options)
        etag = obstore.head(ob, path)["e_tag"].strip('"')
        assert etag.rpartition("-")[2].isdigit() and int(etag.rpartition("-")[2]) >= 2, etag
    elif store.kind == "gcs":
        bucket = store.root.partition("://")[2]
        kinds = [kind for _, path, kind in store.server.log
                 if unquote(path) == f"/{bucket}/{name}"]
        assert "multipart-initiate" in kinds and kinds.count("multipart-part") >= 2, kinds
    else:  # azure: a block blob of several committed blocks
        container = store.root.partition("://")[2]
        blob = store.server.service_client().get_blob_client(container, name)
        committed, _ = blob.get_block_list("committed")
        assert len(committed) >= 2, committed


# ---------------------------------------------------------------- 5. HTTP faults, 2 workers
def test_http_faults_two_workers_every_sample_once(tmp_path):
    """test_remote_read.py::test_faults_resume_every_sample_exactly_once reads in one
    process; here two DataLoader workers (their requests go through the engine)."""
    local = _write_api(str(tmp_path / "served" / "ds"), None, n=500)
    m = load_manifest(local)
    with HTTPTestServer(str(tmp_path / "served"), seed=13, drop_rate=0.3,
                        fail_rate=0.2) as srv:
        cache = str(tmp_path / "cache")
        ds = ShardStream(srv.url("ds"), batch_size=25, shuffle=True, seed=5, retry=FAST,
                         cache_dir=cache)
        got = [s for b in loader(ds, num_workers=2, persistent_workers=False) for s in _unbatch(b)]
        faults = [r.fault for r in srv.log]
    assert sorted(s["id"] for s in got) == list(range(500))
    for s in got:
        want = sample(s["id"])
        assert s["s"] == want["s"] and s["f"] == want["f"] and s["x"] == want["x"].tolist()
        assert s["meta"] == want["meta"]
    assert "drop" in faults and ("503" in faults or "429" in faults), faults
    assert ds.cache_stats["shards_downloaded"] == len(m.shards)
    assert len(_cached_tars(cache)) == len(m.shards)
