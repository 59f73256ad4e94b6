"""shardstream.storage.objstore: obstore stores for URLs, option mapping, error mapping,
reads, writes and resumable ranged downloads, against SeaweedFS (S3) and HTTP servers."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shardstream.errors import ShardNotFoundError, StorageError
from shardstream.storage import objstore, objstore_config
from shardstream.storage.objstore_config import store_spec
from shardstream.storage.retry import RetryPolicy, classify

from servers import HTTPTestServer, free_port

obstore = pytest.importorskip("obstore")

pytestmark = pytest.mark.storage

DATA = random.Random(7).randbytes(3 << 20)
ODD_KEY = "dir/a b+c=d&e/ü ñ~(1)*'!$,;@.bin"


@pytest.fixture
def clean_env(monkeypatch):
    """No AWS / Google / Azure settings from the machine."""
    for k in list(os.environ):
        if k.startswith(("AWS_", "GOOGLE_", "AZURE_", "AZURITE_")):
            monkeypatch.delenv(k)


@pytest.fixture
def s3(s3_server, s3_bucket):
    """(bucket URL, fsspec-style storage_options) on the session's SeaweedFS."""
    return s3_bucket, s3_server.storage_options


# ---------------------------------------------------------------- URLs and options
def test_handles_the_object_store_schemes_only():
    for scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure", "http", "https"):
        assert objstore.handles(f"{scheme}://bucket/key"), scheme
    assert objstore.SCHEMES == frozenset(objstore_config.KINDS)
    for url in ("/data/x.tar", "file:///x", "pipe:cat x", "ftp://h/x", "s3:/b/k"):
        assert not objstore.handles(url), url
    assert objstore.handles("S3://b/k")
    assert not objstore.handles("https://h/x?X-Amz-Signature=1")  # presigned: left to fsspec


def test_import_shardstream_does_not_import_obstore():
    code = ("import sys, shardstream, shardstream.storage.io, shardstream.storage.objstore as o, "
            "shardstream.storage.objstore_config as c\n"
            "assert o.handles('s3://b/k') and c.store_spec('s3://b/k', {'key': 'k'}, 5)\n"
            "assert 'obstore' not in sys.modules, 'obstore imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fsspec_style_s3_options_map_to_obstore_config(clean_env, tmp_path):
    spec, path = store_spec("s3://bkt/dir/k.tar", {
        "key": "AK", "secret": "SK", "token": "TOK", "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"}, "requester_pays": True,
        "use_listings_cache": False, "skip_instance_cache": True}, 30)
    assert (spec.kind, spec.root, path) == ("s3", "bkt", "dir/k.tar")
    assert spec.config == {"access_key_id": "AK", "secret_access_key": "SK",
                           "session_token": "TOK", "endpoint": "http://127.0.0.1:9000",
                           "region": "eu-west-1", "request_payer": True}
    co = spec.client_options
    assert co["allow_http"] is True  # the endpoint is http://
    assert co["connect_timeout"] == co["read_timeout"] == datetime.timedelta(seconds=30)
    assert co["timeout"] == datetime.timedelta(seconds=objstore_config.REQUEST_DEADLINE)
    assert spec.retry_config == {"max_retries": 0}  # RetryPolicy is the one retry layer
    assert store_spec("s3a://b/k", {"anon": True}, None)[0].config == {"skip_signature": True}
    spec = store_spec("s3://b/k", {"client_kwargs": {"verify": False}}, 5)[0]
    assert spec.client_options["allow_invalid_certificates"] is True
    assert "allow_http" not in spec.client_options
    with pytest.raises(ValueError, match="'signature_version'.*region_name"):
        store_spec("s3://b/k", {"client_kwargs": {"signature_version": "v2"}}, 5)


def test_obstore_keys_pass_as_they_are_and_env_endpoints_allow_http(clean_env, monkeypatch):
    opts = {"aws_endpoint": "https://minio.internal:9000", "aws_region": "us-west-2",
            "aws_skip_signature": "true", "client_options": {"user_agent": "x"},
            "retry_config": {"max_retries": 2}}
    spec, _ = store_spec("s3://b/k", opts, 10)
    assert spec.config == {"aws_endpoint": "https://minio.internal:9000",
                           "aws_region": "us-west-2", "aws_skip_signature": "true"}
    assert "allow_http" not in spec.client_options and spec.client_options["user_agent"] == "x"
    assert spec.retry_config == {"max_retries": 2}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert store_spec("s3://b/k", None, 10)[0].client_options["allow_http"] is True
    assert objstore.store_for("s3://b/k", opts)[1] == "k"  # obstore accepts the keys


def test_gcs_azure_http_options(tmp_path, clean_env):
    sa = tmp_path / "sa.json"  # the emulator form: no OAuth, no key
    sa.write_text(json.dumps({"gcs_base_url": "http://127.0.0.1:1", "disable_oauth": True,
                              "client_email": "", "private_key": "", "private_key_id": ""}))
    assert store_spec("gs://b/k", {"token": str(sa), "project": "p"}, 5)[0].config == \
        {"service_account": str(sa)}
    assert store_spec("gcs://b/k", {"token": "anon"}, 5)[0].config == {"skip_signature": True}
    key = {"type": "service_account", "client_email": "a@b"}
    spec = store_spec("gs://b/k", {"token": key, "endpoint_url": "http://127.0.0.1:4443"}, 5)[0]
    assert json.loads(spec.config["service_account_key"]) == key
    assert spec.config["base_url"] == "http://127.0.0.1:4443" and spec.client_options["allow_http"]
    assert store_spec("gs://b/k", {"token": "google_default"}, 5)[0].config == {}
    with pytest.raises(ValueError, match="service-account JSON"):
        store_spec("gs://b/k", {"token": "browser"}, 5)

    spec, path = store_spec("abfss://cont@acct.dfs.core.windows.net/d/k",
                            {"sas_token": "?sv=1&sig=2"}, 5)
    assert (spec.kind, spec.root, path) == ("azure", "cont", "d/k")
    assert spec.config == {"sas_key": "sv=1&sig=2", "account_name": "acct"}
    conn = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
            "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;")
    spec, path = store_spec("az://cont/k", {"connection_string": conn}, 5)
    assert spec.config == {"account_name": "devstoreaccount1", "account_key": "a2V5",
                           "endpoint": "http://127.0.0.1:10000/devstoreaccount1"}
    assert spec.client_options["allow_http"] is True and path == "k"
    spec = store_spec("azure://c/k", {"account_name": "a", "azure_storage_account_key": "a2V5",
                                      "anon": True}, 5)[0]
    assert spec.config == {"account_name": "a", "azure_storage_account_key": "a2V5",
                           "skip_signature": True}
    assert store_spec("az://c/k", {"azure_use_emulator": True}, 5)[0].client_options["allow_http"]
    objstore.store_for("gs://b/k", {"token": str(sa)})  # obstore builds them (no request)
    objstore.store_for("az://c/k", {"account_name": "a"})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(StorageError, match="gs://b/k.*credentials") as info:
        objstore.store_for("gs://b/k", {"token": str(tmp_path / "bad.json")})
    assert info.value.kind == "auth"

    spec, path = store_spec("http://127.0.0.1:8080/a%20b/c.tar", {"headers": {"X-A": "1"}}, 5)
    assert (spec.kind, spec.root, path) == ("http", "http://127.0.0.1:8080", "a b/c.tar")
    assert spec.client_options["default_headers"] == {"X-A": "1"}
    assert spec.client_options["allow_http"] is True and spec.config == {}
    with pytest.raises(ValueError, match="'client_kwargs'.*headers"):
        store_spec("https://h/x", {"client_kwargs": {}}, 5)


def test_unknown_option_is_a_value_error_naming_it_and_the_accepted_ones():
    with pytest.raises(ValueError) as info:
        objstore.store_for("s3://b/k", {"endpoint_url": "http://127.0.0.1:1", "bogus": 1})
    msg = str(info.value)
    assert "'bogus'" in msg and "s3://b/k" in msg
    assert "endpoint_url" in msg and "access_key_id" in msg and "client_options" in msg
    with pytest.raises(ValueError, match="'nope'.*account_key"):
        objstore.store_for("az://c/k", {"account_name": "a", "nope": 1})
    with pytest.raises(ValueError, match="bucket"):
        objstore.store_for("s3:///k")


def test_stores_are_cached_per_location_and_options():
    a = objstore.store_for("s3://b1/x", {"anon": True})[0]
    assert objstore.store_for("s3://b1/y/z", {"anon": True}) == (a, "y/z")
    assert objstore.store_for("s3://b2/x", {"anon": True})[0] is not a
    assert objstore.store_for("s3://b1/x", {"anon": True}, timeout=5)[0] is not a
    h = objstore.store_for("http://127.0.0.1:1/p/q")[0]
    assert objstore.store_for("http://127.0.0.1:1/r")[0] is h


def test_a_forked_child_drops_the_stores_and_refuses_obstore_after_use():
    with HTTPTestServer({"f.bin": b"x" * 10}) as srv:
        assert objstore.get(srv.url("f.bin")) == b"x" * 10  # this process used obstore
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                out = f"stores={len(objstore._stores)}"
                try:
                    objstore.get(srv.url("f.bin"))
                    out += " no-error"
                except StorageError as exc:
                    out += " refused" if "spawn" in str(exc) and "forked" in str(exc) else ""
                os.write(w, out.encode())
            finally:
                os._exit(0)
        os.close(w)
        deadline = time.monotonic() + 20
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:  # hung: what obstore itself does in the child
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        with os.fdopen(r, "rb") as f:
            assert f.read().decode() == "stores=0 refused"


# ---------------------------------------------------------------- S3 (SeaweedFS)
def test_s3_put_get_range_size_exists_list_delete(s3):
    bucket, opts = s3
    url = f"{bucket}/ds/shard-0.tar"
    objstore.put_bytes(DATA[:100_000], url, opts)
    objstore.put_bytes(b"idx", f"{bucket}/ds/shard-0.idx", opts)
    objstore.put_bytes(b"deep", f"{bucket}/ds/sub/x.bin", opts)
    assert objstore.get(url, opts) == DATA[:100_000]
    assert objstore.get(url, opts, start=10, end=20) == DATA[10:20]
    assert objstore.get(url, opts, start=99_990) == DATA[99_990:100_000]
    assert objstore.get(url, opts, end=5) == DATA[:5]
    assert objstore.get(url, opts, start=7, end=7) == b""
    assert objstore.get(url, opts, max_bytes=100_000) == DATA[:100_000]
    assert objstore.size(url, opts) == 100_000
    assert objstore.exists(url, opts) and objstore.exists(f"{bucket}/ds", opts)
    assert not objstore.exists(f"{bucket}/ds/nope", opts)
    assert not objstore.exists("s3://no-such-bucket-zz/x", opts)
    assert objstore.list_prefix(f"{bucket}/ds", opts) == [f"{bucket}/ds/shard-0.idx", url]
    assert objstore.list_prefix(f"{bucket}/ds/", opts) == [f"{bucket}/ds/shard-0.idx", url]
    assert objstore.list_prefix(f"{bucket}/empty", opts) == []
    objstore.delete(url, opts)
    assert not objstore.exists(url, opts)
    objstore.delete(url, opts)  # missing_ok
    with pytest.raises(ShardNotFoundError, match="shard-0.tar"):
        objstore.delete(url, opts, missing_ok=False)


def test_s3_obstore_native_keys_and_odd_key_names(s3_server, s3_bucket):
    opts = {"aws_endpoint": s3_server.endpoint, "aws_access_key_id": s3_server.KEY,
            "aws_secret_access_key": s3_server.SECRET, "aws_region": "us-east-1"}
    url = f"{s3_bucket}/{ODD_KEY}"
    objstore.put_bytes(b"odd", url, opts)
    assert objstore.get(url, opts) == b"odd"
    assert objstore.list_prefix(url.rsplit("/", 1)[0], opts) == [url]
    s3_server.client().head_object(Bucket=s3_bucket[5:], Key=ODD_KEY)  # the same key, for boto


def test_s3_profile_option_reads_credentials_through_botocore(s3_server, s3_bucket, clean_env,
                                                             monkeypatch, tmp_path):
    pytest.importorskip("botocore")
    creds = tmp_path / "credentials"
    creds.write_text(f"[bench]\naws_access_key_id = {s3_server.KEY}\n"
                     f"aws_secret_access_key = {s3_server.SECRET}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    opts = {"endpoint_url": s3_server.endpoint, "profile": "bench"}
    objstore.put_bytes(b"p", f"{s3_bucket}/p", opts)  # obstore alone does not read profiles
    assert objstore.get(f"{s3_bucket}/p", opts) == b"p"


def test_s3_put_file_multipart_round_trip(s3, tmp_path):
    bucket, opts = s3
    big = tmp_path / "big.bin"
    payload = random.Random(3).randbytes(20 << 20)
    big.write_bytes(payload)
    small = tmp_path / "small.bin"
    small.write_bytes(payload[:1000])
    objstore.put_file(big, f"{bucket}/big.bin", opts)
    objstore.put_file(str(small), f"{bucket}/small.bin", opts)
    store, _ = objstore.store_for(bucket, opts)
    assert obstore.head(store, "big.bin")["e_tag"].strip('"').endswith("-3")  # 3 parts of 8 MiB
    assert "-" not in obstore.head(store, "small.bin")["e_tag"]  # one PUT
    assert objstore.size(f"{bucket}/big.bin", opts) == len(payload)
    assert objstore.get(f"{bucket}/big.bin", opts, max_bytes=len(payload)) == payload
    assert objstore.get(f"{bucket}/small.bin", opts) == payload[:1000]
    with pytest.raises(StorageError, match="nope.bin"):
        objstore.put_file(tmp_path / "nope.bin", f"{bucket}/x", opts)


def test_s3_missing_objects_and_buckets_are_shard_not_found(s3, tmp_path):
    bucket, opts = s3
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    try:
        for call in (lambda: objstore.get(f"{bucket}/nope", opts),
                     lambda: objstore.size(f"{bucket}/nope", opts),
                     lambda: objstore.read_into(f"{bucket}/nope", opts, fd, 0, 10),
                     lambda: objstore.get("s3://no-such-bucket-zz/x", opts),
                     lambda: objstore.list_prefix("s3://no-such-bucket-zz/x", opts)):
            with pytest.raises(ShardNotFoundError) as info:
                call()
            assert "/x" in str(info.value) or "nope" in str(info.value)
            assert classify(info.value) == "missing"
            assert isinstance(info.value.__cause__, Exception)  # obstore's error, chained
    finally:
        os.close(fd)


def test_s3_wrong_credentials_fail_fast_naming_the_url(s3):
    bucket, opts = s3
    objstore.put_bytes(b"x", f"{bucket}/k", opts)
    bad = {**opts, "secret": "not-the-secret"}
    tries = []

    def attempt():
        tries.append(1)
        return objstore.get(f"{bucket}/k", bad)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        RetryPolicy(attempts=5, base_delay=1.0).call(attempt, describe=lambda e, n: e)
    exc = info.value
    assert len(tries) == 1 and time.monotonic() - t0 < 2  # never retried
    assert (exc.kind, exc.status, exc.code) == ("auth", 403, "SignatureDoesNotMatch")
    assert f"{bucket}/k" in str(exc) and "credentials" in str(exc)
    assert classify(exc) == "auth"
    for call in (lambda: objstore.put_bytes(b"y", f"{bucket}/k2", bad),
                 lambda: objstore.list_prefix(bucket, bad),
                 lambda: objstore.size(f"{bucket}/k", bad)):
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.kind == "auth" and classify(info.value) == "auth"


def test_s3_range_past_the_end_and_oversized_whole_reads_are_refused(s3):
    bucket, opts = s3
    url = f"{bucket}/k"
    objstore.put_bytes(DATA[:1000], url, opts)
    with pytest.raises(StorageError, match=r"only 1000 bytes"):
        objstore.get(url, opts, start=900, end=1100)
    with pytest.raises(StorageError, match=r"1000 bytes, more than the 999 .*not read"):
        objstore.get(url, opts, max_bytes=999)
    with pytest.raises(StorageError) as info:
        objstore.get(url, opts, start=2000, end=3000)  # 416
    assert info.value.status == 416 and classify(info.value) == "fatal"


# ---------------------------------------------------------------- HTTP
def test_http_reads_and_error_kinds():
    with HTTPTestServer({"f.bin": DATA, "d/g%20h.bin": b"gh"}, forbidden={"secret.bin"},
                        plan=["503", "500", "429"]) as srv:
        url = srv.url("f.bin")
        assert objstore.size(url) == len(DATA) and objstore.exists(url)
        for expect in (503, 500, 429):  # one GET each
            with pytest.raises(StorageError) as info:
                objstore.get(url, start=0, end=10)
            exc = info.value
            assert (exc.kind, exc.status) == ("transient", expect), exc
            assert classify(exc) == "transient" and url in str(exc)
        assert objstore.get(url, start=5, end=50_005) == DATA[5:50_005]
        assert objstore.get(url) == DATA
        assert objstore.get(srv.url("d/g%20h.bin")) == b"gh"  # sent as written, not %2520
        assert not objstore.exists(srv.url("nope"))
        with pytest.raises(ShardNotFoundError, match="nope"):
            objstore.get(srv.url("nope"))
        with pytest.raises(StorageError) as info:
            objstore.get(srv.url("secret.bin"))
        assert info.value.kind == "auth" and classify(info.value) == "auth"
    with pytest.raises(StorageError) as info:  # nothing listens there now
        objstore.get(f"http://127.0.0.1:{free_port()}/f.bin")
    assert info.value.kind == "transient" and classify(info.value) == "transient"


def test_http_oversized_whole_object_is_refused_before_its_body():
    big = bytes(48 << 20)
    with HTTPTestServer({"big.bin": big}) as srv:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=r"50331648 bytes, more than the 1000"):
            objstore.get(srv.url("big.bin"), max_bytes=1000)
        assert time.monotonic() - t0 < 5
        assert srv.requests("GET")[-1].sent < len(big)  # the body was not taken


def test_http_server_ignoring_the_range_is_refused():
    with HTTPTestServer({"f.bin": DATA}, plan=["norange", "norange"]) as srv:
        with pytest.raises(StorageError, match="Range") as info:
            objstore.get(srv.url("f.bin"), start=10, end=20)
        assert classify(info.value) == "fatal"


class _LongerBody(BaseHTTPRequestHandler):
    """Answers any Range with a right Content-Range but 50 body bytes."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(206)
        self.send_header("Content-Range", f"bytes 10-19/{len(DATA)}")
        self.send_header("Content-Length", "50")
        self.end_headers()
        self.wfile.write(DATA[10:60])


def test_a_range_answer_longer_than_asked_is_refused_and_not_written(tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _LongerBody)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/f.bin"
    path = tmp_path / "out"
    path.write_bytes(bytes(100))
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(StorageError, match="50 bytes where 10 were asked for"):
            objstore.get(url, start=10, end=20)
        with pytest.raises(StorageError, match="asked for") as info:
            objstore.read_into(url, None, fd, 10, 20)
        assert info.value.written == 0 and classify(info.value) == "fatal"
        assert path.read_bytes() == bytes(100)  # nothing written, past end or before
    finally:
        os.close(fd)
        httpd.shutdown()
        httpd.server_close()


def test_read_into_resumes_after_a_dropped_body(tmp_path):
    with HTTPTestServer({"f.bin": DATA}, plan=["drop"], seed=5) as srv:
        url = srv.url("f.bin")
        path = tmp_path / "out"
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        reported = []
        try:
            with pytest.raises(StorageError) as info:
                objstore.read_into(url, None, fd, 0, len(DATA), on_bytes=reported.append,
                                   chunk_size=64 << 10)
            exc = info.value
            assert exc.kind == "transient" and classify(exc) == "transient"
            assert exc.written == sum(reported) < len(DATA)
            cut = srv.requests("GET")[0].sent
            assert exc.written <= cut
            assert path.read_bytes() == DATA[:exc.written]  # only good bytes, in place
            n = objstore.read_into(url, None, fd, exc.written, len(DATA),
                                   on_bytes=reported.append)
            assert n == len(DATA) - exc.written and sum(reported) == len(DATA)
            assert srv.requests("GET")[1].start == exc.written  # resumed, not restarted
            assert path.read_bytes() == DATA
        finally:
            os.close(fd)


def test_read_into_file_offset_and_a_stall_times_out(tmp_path):
    with HTTPTestServer({"f.bin": DATA}, plan=[None, "stall"], stall_seconds=10) as srv:
        path = tmp_path / "out"
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            assert objstore.read_into(srv.url("f.bin"), None, fd, 1000, 3000,
                                      file_offset=0) == 2000
            assert path.read_bytes() == DATA[1000:3000]
            t0 = time.monotonic()
            with pytest.raises(StorageError) as info:
                objstore.read_into(srv.url("f.bin"), None, fd, 0, len(DATA), timeout=1)
            assert time.monotonic() - t0 < 5
            assert info.value.kind == "transient" and classify(info.value) == "transient"
        finally:
            os.close(fd)
