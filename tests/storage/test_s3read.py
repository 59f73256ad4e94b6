"""shardstream.storage.s3: SigV4 signing, reads without s3fs, fallback to s3fs, faults."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from shardstream.errors import ShardNotFoundError, StorageError
from shardstream.storage import backends, download, io, s3, s3config, streams
from shardstream.storage.retry import RetryPolicy

from servers import HTTPTestServer

pytestmark = pytest.mark.storage

FAST = RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05, timeout=5)
DATA = random.Random(11).randbytes(600_000)
ODD_KEY = "dir/a b+c=d&e/ü ñ~(1)*'!$,;@.bin"
AWS_ENV = [k for k in s3config.ENV_VARS if k.startswith("AWS_")] + ["SHARDSTREAM_S3_LITE"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No AWS settings from the machine: empty env, ~/.aws under tmp_path."""
    for k in AWS_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".aws").mkdir()
    return tmp_path / ".aws"


# ---------------------------------------------------------------- signing
def test_sigv4_matches_the_aws_documentation_example():
    """GET /test.txt with Range, from AWS's "Signature Calculations ... (AWS Signature
    Version 4)" example (empty payload hash, as the example signs it)."""
    headers = s3.sign_v4(
        "GET", "examplebucket.s3.amazonaws.com", "/test.txt", {"range": "bytes=0-9"},
        s3config.Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        "us-east-1", "20130524T000000Z",
        payload_hash="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


def test_odd_keys_are_encoded_once_and_signed_like_botocore():
    assert s3.canonical_uri("/b/" + ODD_KEY) == \
        "/b/dir/a%20b%2Bc%3Dd%26e/%C3%BC%20%C3%B1~%281%29%2A%27%21%24%2C%3B%40.bin"
    assert s3.canonical_uri("/b/100%.bin") == "/b/100%25.bin"  # no double encoding
    botocore = pytest.importorskip("botocore")
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    uri = s3.canonical_uri("/bucket/" + ODD_KEY)
    req = AWSRequest(method="GET", url=f"http://127.0.0.1:9000{uri}",
                     headers={"Range": "bytes=5-99"})
    S3SigV4Auth(Credentials("AKID", "secret/+key", "tok"), "s3", "eu-west-1").add_auth(req)
    ours = s3.sign_v4("GET", "127.0.0.1:9000", uri, {"range": "bytes=5-99"},
                          s3config.Credentials("AKID", "secret/+key", "tok"), "eu-west-1",
                          req.headers["X-Amz-Date"],
                          payload_hash=req.headers["X-Amz-Content-SHA256"])
    assert botocore is not None
    sig = req.headers["Authorization"].rsplit("Signature=", 1)[1]
    assert ours["Authorization"].rsplit("Signature=", 1)[1] == sig


# ---------------------------------------------------------------- configuration
def _lite(url: str = "s3://b/k", options: dict | None = None):
    got = s3.reader(url, options)
    return None if got is None else got[0].config


def test_credentials_resolve_from_options_env_and_files(clean_env, monkeypatch):
    assert _lite() is None  # nothing anywhere: instance metadata etc. are s3fs's job
    c = _lite(options={"key": "K", "secret": "S", "endpoint_url": "http://h:9000"})
    assert c.creds == s3config.Credentials("K", "S") and c.endpoint == ("h", 9000)
    assert c.scheme == "http" and c.region == "us-east-1"
    c = _lite(options={"anon": True, "client_kwargs": {"endpoint_url": "https://h",
                                                       "region_name": "eu-west-3"}})
    assert c.creds is None and c.endpoint == ("h", 443) and c.region == "eu-west-3"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "EK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ES")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "ET")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://e:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    c = _lite()
    assert c.creds == s3config.Credentials("EK", "ES", "ET") and c.endpoint == ("e", 1)
    assert c.region == "ap-south-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3e:2")
    assert _lite().endpoint == ("s3e", 2)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k)
    (clean_env / "credentials").write_text(
        "[default]\naws_access_key_id = FK\naws_secret_access_key = FS\n"
        "[other]\naws_access_key_id = OK\naws_secret_access_key = OS\n")
    (clean_env / "config").write_text("[default]\nregion = eu-north-1\n"
                                      "[profile other]\nregion = us-west-2\n")
    c = _lite()
    assert c.creds == s3config.Credentials("FK", "FS") and c.region == "eu-north-1"
    assert c.endpoint is None and c.scheme == "https"
    monkeypatch.setenv("AWS_PROFILE", "other")
    c = _lite()
    assert c.creds == s3config.Credentials("OK", "OS") and c.region == "us-west-2"
    assert _lite(options={"profile": "nope"}) is None  # unknown profile: s3fs says so


@pytest.mark.parametrize("case", ["unknown option", "config_kwargs", "client verify",
                                  "role profile", "sso profile", "process", "web identity",
                                  "fips", "endpoint path", "half a key", "opt-out", "arn"])
def test_anything_not_simple_falls_back_to_s3fs(clean_env, monkeypatch, case):
    opts: dict = {"key": "K", "secret": "S"}
    url = "s3://b/k"
    if case == "unknown option":
        opts["requester_pays"] = True
    elif case == "config_kwargs":
        opts["config_kwargs"] = {"s3": {"addressing_style": "virtual"}}
    elif case == "client verify":
        opts["client_kwargs"] = {"verify": False}
    elif case in ("role profile", "sso profile", "process"):
        line = {"role profile": "role_arn = arn:aws:iam::1:role/r\nsource_profile = x",
                "sso profile": "sso_session = s", "process": "credential_process = /bin/x"}
        (clean_env / "config").write_text(f"[default]\n{line[case]}\n")
        opts = {}
    elif case == "web identity":
        monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/tmp/tok")
        opts = {}
    elif case == "fips":
        monkeypatch.setenv("AWS_USE_FIPS_ENDPOINT", "true")
    elif case == "endpoint path":
        opts["endpoint_url"] = "http://h:1/prefix"
    elif case == "half a key":
        opts = {"key": "K"}
    elif case == "opt-out":
        monkeypatch.setenv("SHARDSTREAM_S3_LITE", "0")
    elif case == "arn":
        url = "s3://arn:aws:s3:us-east-1:1:accesspoint/ap/k"
    assert s3.reader(url, opts) is None
    fs, _ = backends.read_fs(url, opts, timeout=5)  # s3fs, as before
    assert type(fs).__name__ == "S3FileSystem"


def test_aws_addressing():
    cfg = s3config.S3Config("https", None, "eu-west-1", None, None)
    r = s3.S3Reader(cfg, 5)
    assert r._where("bucket", "a b.bin") == ("bucket.s3.eu-west-1.amazonaws.com", 443,
                                             "bucket.s3.eu-west-1.amazonaws.com", "/a%20b.bin")
    assert r._where("my.bucket", "k")[::3] == ("s3.eu-west-1.amazonaws.com", "/my.bucket/k")
    r2 = s3.S3Reader(s3config.S3Config("http", ("127.0.0.1", 8333), "us-east-1", None,
                                        None), 5)
    assert r2._where("b", "k") == ("127.0.0.1", 8333, "127.0.0.1:8333", "/b/k")


# ---------------------------------------------------------------- against SeaweedFS
def test_reads_equal_s3fs_and_signatures_are_checked(s3_server, s3_bucket, tmp_path):
    opts = s3_server.storage_options
    bucket = s3_bucket[len("s3://"):]
    client = s3_server.client()
    objects = {"plain.bin": DATA, ODD_KEY: DATA[:70_001], "empty.bin": b""}
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    s3fs_fs, _ = backends.get_fs(s3_bucket, opts)
    for key, body in objects.items():
        url = f"{s3_bucket}/{key}"
        lite, path = backends.read_fs(url, opts, timeout=5)
        assert isinstance(lite, s3.S3Reader) and path == f"{bucket}/{key}"
        assert io.read_bytes(url, storage_options=opts) == body == \
            s3fs_fs.cat_file(path)
        assert io.size(url, storage_options=opts) == len(body) == s3fs_fs.size(path)
        if body:
            assert io.read_bytes(url, 3, len(body) - 1, storage_options=opts) == \
                s3fs_fs.cat_file(path, start=3, end=len(body) - 1) == body[3:-1]
    url = f"{s3_bucket}/plain.bin"
    with streams.open_stream(url, start=1000, storage_options=opts, chunk_size=100_000) as f:
        assert f.read() == DATA[1000:]
    dest = str(tmp_path / "copy")
    download.download(url, dest, opts, FAST, None, chunk_size=64_000)
    assert open(dest, "rb").read() == DATA
    assert list(s3._idle.values()) and all(len(p) <= 16 for p in s3._idle.values())

    with pytest.raises(ShardNotFoundError, match="nope.bin"):
        io.read_bytes(f"{s3_bucket}/nope.bin", storage_options=opts, retry=FAST)
    with pytest.raises(ShardNotFoundError, match="nope.bin"):
        io.size(f"{s3_bucket}/nope.bin", storage_options=opts, retry=FAST)
    slow = RetryPolicy(attempts=5, base_delay=2, timeout=5)
    for bad in ({**opts, "secret": "wrong-secret"}, {**opts, "key": "no-such-key"}):
        for call in (lambda: io.read_bytes(url, 0, 10, storage_options=bad, retry=slow),
                     lambda: io.size(url, storage_options=bad, retry=slow)):
            t0 = time.perf_counter()
            with pytest.raises(StorageError) as err:
                call()
            assert time.perf_counter() - t0 < 1.5  # no retry
            assert err.value.kind == "auth" and err.value.tries == 1
            assert url in str(err.value) and "credentials" in str(err.value)
    with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
        io.read_bytes(url, storage_options={**opts, "secret": "x"}, retry=slow)
    with pytest.raises(StorageError) as err:  # unsigned requests are refused too
        io.read_bytes(url, storage_options={"endpoint_url": opts["endpoint_url"],
                                                 "anon": True}, retry=slow)
    assert err.value.kind == "auth"


def _write_ds(url: str, opts: dict, n: int = 700) -> None:
    from shardstream.write.writer import ShardWriter

    with ShardWriter(url, max_samples=150, block_bytes=2048, storage_options=opts) as w:
        for i in range(n):
            w.write({"id": i, "x": list(range(i % 7))})


def test_shardstream_through_the_lite_path_equals_s3fs(s3_server, s3_bucket, tmp_path,
                                                      monkeypatch):
    import shardstream

    opts = s3_server.storage_options
    url = f"{s3_bucket}/ds"
    _write_ds(url, opts)

    def ids(cache: str) -> list[int]:
        ds = shardstream.ShardStream(url, shuffle=True, seed=3, storage_options=opts,
                                     cache_dir=str(tmp_path / cache))
        return [int(s["id"]) for s in ds]
    lite = ids("lite")
    monkeypatch.setenv("SHARDSTREAM_S3_LITE", "0")
    assert s3.reader(url, opts) is None
    assert ids("s3fs") == lite and sorted(lite) == list(range(700))


CHECK_IMPORTS = r"""
import json, sys
import shardstream
ds = shardstream.ShardStream({url!r}, batch_size=64, storage_options={opts!r},
                             cache_dir={cache!r})
n = sum(len(b["id"]) for b in ds)
print(json.dumps({{"n": n, "loaded": [m for m in ("s3fs", "botocore", "aiobotocore",
                  "aiohttp", "fsspec") if m in sys.modules]}}))
"""


def test_construct_and_read_without_importing_s3fs(s3_server, s3_bucket, tmp_path):
    opts = s3_server.storage_options
    url = f"{s3_bucket}/ds"
    _write_ds(url, opts)
    code = CHECK_IMPORTS.format(url=url, opts=opts, cache=str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if k not in AWS_ENV}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root
    for lite, expect in (("1", []), ("0", ["s3fs", "botocore"])):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, "SHARDSTREAM_S3_LITE": lite}, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["n"] == 700
        assert set(expect) <= set(got["loaded"]) and \
            (expect or not {"s3fs", "botocore", "aiobotocore", "aiohttp"} & set(got["loaded"]))


# ---------------------------------------------------------------- faults (HTTP test server)
def _fake_s3(srv: HTTPTestServer) -> tuple[str, dict]:
    return "s3://bkt/blob.bin", {"endpoint_url": srv.url(""), "key": "k", "secret": "s"}


def test_drop_mid_body_resumes_at_the_exact_byte():
    chunk = 150_000
    plan = [None, "drop", None, "drop", "drop", None, None, "drop"]
    with HTTPTestServer({"bkt/blob.bin": DATA}, plan=plan, seed=1) as srv:
        url, opts = _fake_s3(srv)
        with streams.open_stream(url, size=len(DATA), chunk_size=chunk, retry=FAST,
                                 readahead=False, storage_options=opts) as f:
            assert f.read() == DATA
            retries = f.retries
        gets = srv.requests("GET")
    assert retries == 3 == sum(r.fault == "drop" for r in gets)
    assert [r.start for r in gets].count(0) == 1
    for bad, nxt in zip(gets, gets[1:]):
        if bad.fault == "drop":
            assert nxt.start == bad.start + bad.sent  # what arrived is kept: nothing twice
    assert sum(r.sent for r in gets) == len(DATA)  # not a byte fetched twice


def test_throttling_5xx_stall_forbidden_missing():
    with HTTPTestServer({"bkt/blob.bin": DATA}, plan=["503", "429", "500", None]) as srv:
        url, opts = _fake_s3(srv)
        retry = RetryPolicy(attempts=5, base_delay=0.05, jitter=False, timeout=5)
        t0 = time.perf_counter()
        assert io.read_bytes(url, 0, 100, storage_options=opts, retry=retry) == DATA[:100]
        assert time.perf_counter() - t0 >= 0.05 + 0.1 + 0.2 - 0.01
        assert [r.status for r in srv.requests("GET")] == [503, 429, 500, 206]
    with HTTPTestServer({"bkt/blob.bin": DATA}, plan=["stall"], stall_seconds=30) as srv:
        url, opts = _fake_s3(srv)
        retry = RetryPolicy(attempts=3, base_delay=0.01, timeout=0.5)
        assert io.read_bytes(url, 0, len(DATA), storage_options=opts,
                                  retry=retry) == DATA
        assert [r.fault for r in srv.requests("GET")] == ["stall", None]
    with HTTPTestServer({"bkt/blob.bin": DATA}, forbidden={"bkt/blob.bin"}) as srv:
        url, opts = _fake_s3(srv)
        with pytest.raises(StorageError) as err:
            io.read_bytes(url, 0, 10, storage_options=opts,
                               retry=RetryPolicy(attempts=10, base_delay=1))
        assert len(srv.requests("GET")) == 1 and err.value.kind == "auth"
        assert url in str(err.value) and "access denied" in str(err.value)
        with pytest.raises(ShardNotFoundError, match="nope"):
            io.read_bytes("s3://bkt/nope", storage_options=opts, retry=FAST)
        assert len(srv.requests("GET", "bkt/nope")) == 1
    with HTTPTestServer({"bkt/blob.bin": DATA}, plan=["503"] * 10) as srv:
        url, opts = _fake_s3(srv)
        with pytest.raises(StorageError) as err:
            io.read_bytes(url, 0, 10, storage_options=opts,
                               retry=RetryPolicy(attempts=3, base_delay=0.01))
        assert "after 3 tries" in str(err.value) and "503" in str(err.value)


def test_connections_are_reused_and_not_shared_with_a_forked_child():
    with HTTPTestServer({"bkt/blob.bin": DATA}) as srv:
        url, opts = _fake_s3(srv)
        where = ("http", "127.0.0.1", srv.port)
        s3._idle.pop(where, None)
        assert io.read_bytes(url, 0, 10, storage_options=opts) == DATA[:10]
        conn = s3._idle[where][-1]
        assert io.read_bytes(url, 10, 20, storage_options=opts) == DATA[10:20]
        assert s3._idle[where] == [conn]  # the same keep-alive connection
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: none of the parent's connections, and its own work
            ok = where not in s3._idle and \
                io.read_bytes(url, 0, 5, storage_options=opts) == DATA[:5] and \
                s3._idle[where][-1] is not conn
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
        assert io.read_bytes(url, 20, 30, storage_options=opts) == DATA[20:30]
        assert s3._idle[where] == [conn]


@pytest.mark.parametrize("start, end", [(0, 100), (100, 200)])
def test_a_server_ignoring_range_is_an_error_not_wrong_bytes(start, end):
    with HTTPTestServer({"bkt/blob.bin": DATA}, plan=["norange"] * 5) as srv:
        url, opts = _fake_s3(srv)
        with pytest.raises(StorageError, match="ignored the Range header"):
            io.read_bytes(url, start, end, storage_options=opts,
                               retry=RetryPolicy(attempts=2, base_delay=0.01))
