"""Remote reads against hostile servers, and a node cache that never evicts what is in use.

Real servers on 127.0.0.1: the HTTP test server from ``servers.py`` and a small
hostile one here that answers with whatever status, headers (a lying
Content-Length included) and body a test gives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from shardstream.errors import ManifestError, ShardstreamError, StorageError
from shardstream.format.manifest import MANIFEST_NAME, Manifest, ShardInfo
from shardstream.storage import download, io, locks
from shardstream.storage.cache import RemoteCache
from shardstream.storage.retry import RetryPolicy

from servers import HTTPTestServer

pytestmark = pytest.mark.storage

FAST = RetryPolicy(attempts=3, base_delay=0.005, max_delay=0.02, timeout=5)
GiB = 1 << 30


# ---------------------------------------------------------------- a hostile server
class Hostile:
    """HTTP on 127.0.0.1: ``routes[path] = (status, headers, body)`` sent as given (no
    Content-Length is added), then the connection is closed. ``default`` answers any
    other path. ``log`` holds ``(method, path, Range header)`` per request."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]],
                 default: tuple[int, dict[str, str], bytes] | None = None) -> None:
        self.routes, self.default = routes, default
        self.log: list[tuple[str, str, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(False)

            def do_GET(self) -> None:
                self._answer(True)

            def _answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                owner.log.append((self.command, path, self.headers.get("Range")))
                status, headers, data = owner.routes.get(path, owner.default or
                                                         (404, {"Content-Length": "0"}, b""))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    if body:
                        self.wfile.write(data)
                        self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True,
                         kwargs={"poll_interval": 0.05}).start()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{path.lstrip('/')}"

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if r[0] == "GET"]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def hostile():
    made: list[Hostile] = []

    def make(routes, default=None) -> Hostile:
        made.append(Hostile(routes, default))
        return made[-1]
    yield make
    for h in made:
        h.close()


def _ok(body: bytes, status: int = 200, **extra: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Length": str(len(body)), **extra}, body


def _s3(srv: Hostile) -> dict[str, str]:
    return {"endpoint_url": srv.url(""), "key": "k", "secret": "s"}


def _peak(fn) -> tuple[BaseException | None, int]:
    """(the exception ``fn`` raised, peak bytes Python allocated meanwhile)."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except BaseException as exc:  # noqa: BLE001 - returned to the test
        raised = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return raised, peak


# ---------------------------------------------------------------- names from a manifest
def _hostile_manifest(make_dataset, names: list[str], **override: Any) -> bytes:
    src = make_dataset(20, "src", max_samples=10)
    with open(os.path.join(src, MANIFEST_NAME)) as f:
        doc = json.load(f)
    for shard, name in zip(doc["shards"], names):
        shard["name"] = name
        shard.update(override)
    return json.dumps(doc).encode()


def _files_under(root: str) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def _permissive_from_json(text: str, *, where: str = MANIFEST_NAME) -> Manifest:
    """Manifest.from_json without any name or type checks: the storage layer alone."""
    doc = json.loads(text)
    return Manifest(shards=[ShardInfo(**s) for s in doc["shards"]], version=doc["version"])


@pytest.mark.parametrize("manifest_checks", [True, False], ids=["as-is", "storage-alone"])
def test_hostile_manifest_names_write_nothing_outside_the_cache(
        make_dataset, tmp_path, hostile, monkeypatch, manifest_checks):
    outside = tmp_path / "abs-target"
    text = _hostile_manifest(make_dataset, ["../../evil", str(outside)])
    srv = hostile({"/ds/" + MANIFEST_NAME: _ok(text)}, default=_ok(b"PWNED" * 100))
    if not manifest_checks:
        monkeypatch.setattr(Manifest, "from_json", staticmethod(_permissive_from_json))
    cache = tmp_path / "a" / "cache"
    before = _files_under(str(tmp_path))
    with pytest.raises(ManifestError) as err:
        download.fetch_to_cache(srv.url("ds"), str(cache), retry=FAST)
    assert srv.url("ds") in str(err.value) or "ds/manifest.json" in str(err.value)
    assert not (tmp_path / "a" / "evil").exists() and not outside.exists()
    written = _files_under(str(tmp_path)) - before
    assert all(p.startswith(str(cache) + os.sep) for p in written), written
    assert not any("PWNED" in open(p, errors="replace").read() for p in written)
    assert not [r for r in srv.gets() if "evil" in r[1] or "abs-target" in r[1]]


@pytest.mark.parametrize("bad", ["..", ".", "", "a\x00b", "x/../../y", "..\\evil"])
def test_every_unplain_name_is_refused_by_the_storage_layer(make_dataset, tmp_path, hostile,
                                                           monkeypatch, bad):
    text = _hostile_manifest(make_dataset, [bad])
    srv = hostile({"/ds/" + MANIFEST_NAME: _ok(text)}, default=_ok(b"x" * 10))
    monkeypatch.setattr(Manifest, "from_json", staticmethod(_permissive_from_json))
    with pytest.raises(ManifestError, match="plain file name"):
        download.fetch_to_cache(srv.url("ds"), str(tmp_path / "cache"), retry=FAST)


@pytest.mark.parametrize("field, value", [("bytes", -5), ("bytes", "12"),
                                          ("index_bytes", True), ("bytes", 1 << 80)])
def test_declared_sizes_from_a_manifest_are_checked(make_dataset, tmp_path, hostile,
                                                    monkeypatch, field, value):
    text = _hostile_manifest(make_dataset, ["shard-000000.tar"], **{field: value})
    srv = hostile({"/ds/" + MANIFEST_NAME: _ok(text)}, default=_ok(b"x" * 10))
    monkeypatch.setattr(Manifest, "from_json", staticmethod(_permissive_from_json))
    with pytest.raises(ManifestError) as err:
        download.fetch_to_cache(srv.url("ds"), str(tmp_path / "cache"), retry=FAST)
    assert "ds/manifest.json" in str(err.value) and repr(value) in str(err.value)
    assert len(srv.gets()) == 1  # refused before any download


def test_node_cache_entry_names_stay_inside_the_cache(tmp_path):
    cache = tmp_path / "a" / "cache"
    rc = RemoteCache(cache_dir=str(cache), retry=FAST)
    for sha in ("/../../../evil-sha", "../../evil", "zz\x00"):
        with pytest.raises(ManifestError, match="sha256"):
            rc.shard_path("http://127.0.0.1:9/ds/x.tar", size=10, sha256=sha)
    name = os.path.basename(rc._dest("http://127.0.0.1:9/ds/..", 10, None))
    assert "/" not in name and name not in (".", "..")
    name = os.path.basename(rc._dest("http://127.0.0.1:9/ds/a\x00b", 10, None))
    assert "\x00" not in name
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil-sha").exists()


# ---------------------------------------------------------------- eviction vs readers
def test_a_stream_sharing_the_cache_never_evicts_a_dataset_in_use(make_dataset, tmp_path):
    from shardstream.pytorch.random_access import ShardDataset
    from shardstream.pytorch.stream import ShardStream

    make_dataset(300, "a")
    make_dataset(300, "b")
    cache = str(tmp_path / "cache")
    with HTTPTestServer(str(tmp_path)) as srv:
        ds = ShardDataset(srv.url("a"), cache_dir=cache)
        with pytest.raises(ValueError, match=r"cache_limit=1 bytes is below .* at least \d+"
                           ) as refused:  # the schedule needs more at once: refused up front
            ShardStream(srv.url("b"), cache_dir=cache, cache_limit=1, retry=FAST)
        need = int(re.search(r"at least (\d+)", str(refused.value)).group(1))
        # the least it accepts: dataset a, held, is over the limit and must stay
        stream = ShardStream(srv.url("b"), cache_dir=cache, cache_limit=need, retry=FAST)
        assert sorted(s["id"] for s in stream) == list(range(300))
        assert [ds[i]["id"] for i in range(len(ds))] == list(range(300))


def test_eviction_in_another_process_skips_a_held_entry(make_dataset, tmp_path):
    make_dataset(50, "a")
    cache = str(tmp_path / "cache")
    with HTTPTestServer(str(tmp_path)) as srv:
        held = download.fetch_and_hold(srv.url("a"), cache, retry=FAST)
    entry = held.path

    def evict_in_child() -> None:
        pid = os.fork()
        if pid == 0:
            try:
                locks.evict(cache, 0, keep="")
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0

    evict_in_child()
    assert os.path.isfile(os.path.join(entry, MANIFEST_NAME))  # in use: kept
    held.close()
    evict_in_child()
    assert not os.path.exists(entry)  # no reader left: evicted


def test_an_open_stream_shard_holds_its_cache_entry(tmp_path):
    data = os.urandom(5000)
    with HTTPTestServer({"blob.bin": data}) as srv:
        rc = RemoteCache(cache_dir=str(tmp_path / "c"), max_bytes=None, retry=FAST)
        fd = rc.open_shard(srv.url("blob.bin"), size=len(data))
        path = rc._dest(srv.url("blob.bin"), len(data), None)
        locks.evict(rc.cache_dir, 0, keep="")
        assert os.path.isfile(path)  # open by a reader: kept
        os.close(fd)
        locks.evict(rc.cache_dir, 0, keep="")
        assert not os.path.exists(path)


def test_a_cached_copy_deleted_by_hand_says_so_not_rebuild(make_dataset, tmp_path):
    from shardstream.pytorch.random_access import ShardDataset

    make_dataset(300, "a")
    with HTTPTestServer(str(tmp_path)) as srv:
        ds = ShardDataset(srv.url("a"), cache_dir=str(tmp_path / "cache"))
    shutil.rmtree(ds.dataset.root)
    with pytest.raises(ShardstreamError) as err:
        ds[len(ds) - 1]
    msg = str(err.value)
    assert "removed" in msg and ds.dataset.root in msg and "rebuild" not in msg
    assert "download" in msg


def test_hold_of_a_missing_entry_names_it(tmp_path):
    gone = str(tmp_path / "cache" / "abc-ds")
    with pytest.raises(StorageError, match="removed") as err:
        locks.hold(gone)
    assert gone in str(err.value)


# ---------------------------------------------------------------- sizes claimed by servers
def test_s3_ranged_read_refuses_a_lying_content_length(hostile):
    srv = hostile({}, default=(206, {"Content-Length": str(GiB),
                                     "Content-Range": f"bytes 0-{GiB - 1}/{GiB}"}, b"z" * 100))
    url = "s3://bkt/blob.bin"
    exc, peak = _peak(lambda: io.read_bytes(url, 0, 100, storage_options=_s3(srv),
                                                 retry=FAST))
    assert isinstance(exc, StorageError), exc
    assert url in str(exc) and "100" in str(exc) and str(GiB) in str(exc)
    assert peak < 8 << 20
    assert len(srv.gets()) == 1  # not retried


def test_s3_whole_read_grows_only_as_bytes_arrive(hostile):
    """No range and no size known: a 1 GiB claim with 100 bytes costs ~nothing."""
    srv = hostile({}, default=(200, {"Content-Length": str(GiB)}, b"z" * 100))
    exc, peak = _peak(lambda: io.read_bytes("s3://bkt/blob.bin", storage_options=_s3(srv),
                                                 retry=FAST))
    assert isinstance(exc, StorageError), exc
    assert peak < 8 << 20


def test_s3_whole_read_bounded_by_the_known_size(hostile):
    srv = hostile({}, default=(200, {"Content-Length": str(GiB)}, b"z" * 100))
    with pytest.raises(StorageError) as err:
        io.read_bytes("s3://bkt/m.json", storage_options=_s3(srv), retry=FAST,
                           max_bytes=1000)
    assert "1000" in str(err.value) and str(GiB) in str(err.value)
    assert len(srv.gets()) == 1


def test_s3_chunked_body_longer_than_the_range_is_refused(hostile):
    body = b"z" * (8 << 20)
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    srv = hostile({}, default=(206, {"Transfer-Encoding": "chunked"}, chunked))
    exc, peak = _peak(lambda: io.read_bytes("s3://bkt/blob.bin", 0, 100,
                                                 storage_options=_s3(srv), retry=FAST))
    assert isinstance(exc, StorageError) and "s3://bkt/blob.bin" in str(exc), exc
    assert peak < 4 << 20  # refused (no size announced) or stopped past the range


@pytest.mark.parametrize("via", ["s3", "http"])
def test_content_range_for_other_bytes_is_refused(hostile, via):
    srv = hostile({}, default=_ok(b"y" * 100, 206, **{"Content-Range": "bytes 500-599/1000"}))
    url, opts = ("s3://bkt/blob.bin", _s3(srv)) if via == "s3" else (srv.url("blob.bin"), None)
    with pytest.raises(StorageError, match="did not answer the byte range.*500"):
        io.read_bytes(url, 0, 100, storage_options=opts, retry=FAST)


def test_s3_open_ended_range_answered_whole_is_refused(hostile):
    srv = hostile({}, default=(200, {"Transfer-Encoding": "chunked"},
                               b"64\r\n" + b"w" * 100 + b"\r\n0\r\n\r\n"))
    with pytest.raises(StorageError, match="malformed|Range"):
        io.read_bytes("s3://bkt/blob.bin", 10, None, storage_options=_s3(srv), retry=FAST)


@pytest.mark.parametrize("claim", ["abc", "-5", None])
def test_s3_head_size_must_be_a_size(hostile, claim):
    headers = {} if claim is None else {"Content-Length": claim}
    srv = hostile({}, default=(200, headers, b""))
    with pytest.raises(StorageError, match="(?i)content.length"):
        io.size("s3://bkt/blob.bin", storage_options=_s3(srv), retry=FAST)


def test_http_ranged_read_refuses_a_lying_content_length(hostile):
    srv = hostile({}, default=(206, {"Content-Length": str(GiB)}, b"z" * 100))
    url = srv.url("blob.bin")
    exc, peak = _peak(lambda: io.read_bytes(url, 0, 100, retry=FAST))
    assert isinstance(exc, StorageError), exc
    assert url in str(exc) and "malformed" in str(exc)  # a 206 without Content-Range
    assert len(srv.gets()) == 1 and peak < 8 << 20


def test_http_body_past_the_range_stops_early(hostile):
    """A server ignoring Range with no Content-Length: reading stops past the range."""
    big = b"q" * (4 << 20)
    srv = hostile({}, default=(200, {}, big))
    exc, peak = _peak(lambda: io.read_bytes(srv.url("blob.bin"), 0, 100, retry=FAST))
    assert isinstance(exc, StorageError) and "Range" in str(exc), exc
    assert peak < 3 << 20


def test_manifest_read_for_the_cache_is_capped(hostile, tmp_path):
    claim = io.MANIFEST_LIMIT + 1
    srv = hostile({"/ds/" + MANIFEST_NAME: (200, {"Content-Length": str(claim)}, b"{}")})
    with pytest.raises(StorageError) as err:
        download.fetch_to_cache(srv.url("ds"), str(tmp_path / "c"), retry=FAST)
    assert MANIFEST_NAME in str(err.value) and str(claim) in str(err.value)
    assert len(srv.gets()) == 1


def test_http_head_without_a_size_is_a_storage_error(hostile):
    srv = hostile({}, default=(200, {"Transfer-Encoding": "chunked"}, b"0\r\n\r\n"))
    with pytest.raises(StorageError, match="(?i)size|content.length"):
        io.size(srv.url("blob.bin"), retry=FAST)


def test_download_refused_when_the_disk_cannot_hold_the_declared_size(tmp_path, hostile):
    srv = hostile({}, default=_ok(b"x"))
    with pytest.raises(StorageError, match="free") as err:
        download.download(srv.url("big.bin"), str(tmp_path / "big.bin"), None, FAST,
                          1 << 60)
    assert "big.bin" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_an_unusable_cache_dir_is_a_storage_error_message_first(tmp_path, hostile):
    import errno

    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    srv = hostile({}, default=_ok(b"x" * 10))
    with pytest.raises(StorageError) as err:
        download.fetch_to_cache(srv.url("ds"), str(not_a_dir / "cache"), retry=FAST)
    assert str(err.value).startswith("cannot create the cache directory " + str(not_a_dir))
    assert err.value.errno == errno.ENOTDIR and "[Errno" not in str(err.value)
