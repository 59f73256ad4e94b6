"""Writing datasets to S3 (SeaweedFS on 127.0.0.1): ShardWriter, write_shards, the CLI."""

from __future__ import annotations

import json
import os

import pytest

from shardstream.cli.commands import main, write_main
from shardstream.errors import DatasetExistsError, StorageError
from shardstream.format.manifest import MANIFEST_NAME
from shardstream.read.dataset import open_dataset
from shardstream.read.verify import verify
from shardstream.storage import download
from shardstream.storage import io
from shardstream.storage import io as storage
from shardstream.storage import urls
from shardstream.storage.io import load_manifest
from shardstream.write.parallel import write_shards
from shardstream.write.writer import ShardWriter

from conftest import sample

pytestmark = pytest.mark.storage


def _write(url: str, n: int, opts: dict, **kw) -> ShardWriter:
    with ShardWriter(url, max_samples=40, block_bytes=512, fsync=False,
                     storage_options=opts, **kw) as w:
        for i in range(n):
            w.write(sample(i))
    return w


def _decoded_ids(local: str) -> list[int]:
    from shardstream.cli.inspect import cat_lines

    ds = open_dataset(local)
    out = [json.loads(line)["id"] for line in cat_lines(local)]
    assert len(out) == ds.manifest.num_samples
    return out


def test_shard_writer_to_s3_then_verify_a_local_copy(s3_server, s3_bucket, tmp_path):
    url = f"{s3_bucket}/ds"
    opts = s3_server.storage_options
    w = _write(url, 150, opts)
    assert not os.path.exists(w._staging)  # the local staging dir is gone
    names = io.list_prefix(url, storage_options=opts)
    m = load_manifest(url, opts)
    assert m.num_samples == 150 and len(m.shards) == 4
    assert set(names) == {MANIFEST_NAME} | {n for s in m.shards for n in (s.name, s.index)}
    local = download.fetch_to_cache(url, str(tmp_path / "cache"), storage_options=opts)
    report = verify(local)
    assert report.ok and report.samples == 150
    assert _decoded_ids(local) == list(range(150))


def test_manifest_is_uploaded_last(s3_server, s3_bucket, monkeypatch):
    url = f"{s3_bucket}/ds"
    opts = s3_server.storage_options
    murl = urls.join(url, MANIFEST_NAME)
    events = []
    put_file, put_bytes = io.put_file, io.put_bytes

    def spy_file(local, dst, **kw):
        events.append(("shard", dst, io.exists(murl, storage_options=opts)))
        put_file(local, dst, **kw)

    def spy_bytes(data, dst, **kw):
        listed = io.list_prefix(url, storage_options=opts)
        events.append(("manifest", dst, listed))
        put_bytes(data, dst, **kw)
    monkeypatch.setattr(storage, "put_file", spy_file)
    monkeypatch.setattr(storage, "put_bytes", spy_bytes)
    _write(url, 100, opts)
    assert [e[0] for e in events][-1] == "manifest" and events[-1][1] == murl
    assert [e[0] for e in events].count("manifest") == 1
    assert not any(e[2] for e in events if e[0] == "shard")  # no manifest while uploading
    m = load_manifest(url, opts)
    assert set(events[-1][2]) == {n for s in m.shards for n in (s.name, s.index)}


def test_overwrite_and_append_on_s3(s3_server, s3_bucket, tmp_path):
    url = f"{s3_bucket}/ds"
    opts = s3_server.storage_options
    _write(url, 130, opts)  # 4 shards
    with pytest.raises(DatasetExistsError, match="overwrite"):
        _write(url, 10, opts)
    _write(url, 30, opts, overwrite=True)  # 1 shard, under a name the old 4 do not use
    m = load_manifest(url, opts)
    assert m.num_samples == 30
    assert io.list_prefix(url, storage_options=opts) == sorted(
        [MANIFEST_NAME, "shard-000004.tar", "shard-000004.tar.idx"])
    first = io.read_bytes(urls.join(url, "shard-000004.tar"), storage_options=opts)
    _write(url, 50, opts, append=True)
    m = load_manifest(url, opts)
    assert m.num_samples == 80 and [s.name for s in m.shards] == [
        "shard-000004.tar", "shard-000005.tar", "shard-000006.tar"]
    assert io.read_bytes(urls.join(url, "shard-000004.tar"),
                         storage_options=opts) == first  # appended, old untouched
    local = download.fetch_to_cache(url, str(tmp_path / "c"), storage_options=opts)
    assert verify(local).ok
    assert _decoded_ids(local) == list(range(30)) + list(range(50))


def test_failed_upload_leaves_no_manifest_and_no_orphans(s3_server, s3_bucket, monkeypatch):
    url = f"{s3_bucket}/ds"
    opts = s3_server.storage_options
    _write(url, 60, opts)  # 2 shards
    before = io.list_prefix(url, storage_options=opts)
    old = load_manifest(url, opts)
    real = io.put_file
    calls = []

    def flaky(local, dst, **kw):
        calls.append(dst)
        if len(calls) == 3:
            raise StorageError(f"cannot upload to {dst}: injected")
        real(local, dst, **kw)
    monkeypatch.setattr(storage, "put_file", flaky)
    with pytest.raises(StorageError, match="injected"):
        _write(url, 120, opts, append=True)
    assert io.list_prefix(url, storage_options=opts) == before  # orphans deleted
    assert load_manifest(url, opts) == old  # the appended-to dataset is untouched
    fresh = f"{s3_bucket}/fresh"
    calls.clear()
    with pytest.raises(StorageError):
        _write(fresh, 120, opts)
    assert io.list_prefix(fresh, storage_options=opts) == []


def test_write_shards_with_workers_to_s3(s3_server, s3_bucket, tmp_path):
    url = f"{s3_bucket}/par"
    opts = s3_server.storage_options
    m = write_shards([sample(i) for i in range(200)], url, workers=2, max_samples=30,
                     fsync=False, storage_options=opts)
    assert load_manifest(url, opts) == m and m.num_samples == 200
    local = download.fetch_to_cache(url, str(tmp_path / "c"), storage_options=opts)
    assert _decoded_ids(local) == list(range(200))


def test_cli_write_info_verify_on_s3(s3_server, s3_bucket, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(500)))
    url = f"{s3_bucket}/cli"
    opts = [f"--storage-option=endpoint_url={s3_server.endpoint}",
            f"--storage-option=key={s3_server.KEY}", "--storage-option",
            f"secret={s3_server.SECRET}"]
    assert write_main([str(src), "-o", url, "--max-samples", "200", "-q", *opts]) == 0
    assert write_main([str(src), "-o", url, "-q", *opts]) == 1
    assert "DatasetExistsError" in capsys.readouterr().err
    # the environment alone (AWS_ENDPOINT_URL + keys) is enough too
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    assert main(["write", str(src), "-o", url, "--append", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num_samples"] == 1000 and doc["num_shards"] == 4
    assert main(["verify", url, *opts]) == 0
    assert "OK: 4 shards, 1,000 samples" in capsys.readouterr().out


def test_cli_storage_option_parsing():
    from shardstream.cli.args import _storage_option, storage_options

    pairs = [_storage_option("anon=true"), _storage_option("client_kwargs.region_name=eu"),
             _storage_option("endpoint_url=http://h:1")]
    assert storage_options(pairs) == {"anon": True, "client_kwargs": {"region_name": "eu"},
                                      "endpoint_url": "http://h:1"}
    with pytest.raises(Exception, match="key=value"):
        _storage_option("novalue")
