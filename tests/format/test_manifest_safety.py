"""What ``Manifest.from_json`` checks on load: names, counts, sizes, checksums, types (#14)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from shardstream import ManifestError, ShardWriter, StorageError, build_index, load_manifest
from shardstream.format.manifest import Manifest
from shardstream.storage import io as storage_io
from shardstream.write.lock import storage_error

pytestmark = pytest.mark.fuzz

SHA = "ab" * 32


def entry(**kw) -> dict:
    e = {"name": "shard-000000.tar", "num_samples": 3, "bytes": 4096, "sha256": SHA,
         "num_blocks": 1, "index": "shard-000000.tar.idx", "index_bytes": 200,
         "index_sha256": SHA}
    e.update(kw)
    return e


def doc(shards: list, **top) -> str:
    d = {"format": "shardstream", "version": 1, "created_by": "test", "layout": "shardstream",
         "key_field": "__key__", "block_bytes": 65536, "shards": shards, "schema": {}}
    d.update(top)
    return json.dumps(d)


def refused(text: str | bytes, *match: str) -> str:
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(text, where="/data/ds/manifest.json")
    msg = str(info.value)
    assert msg.startswith("/data/ds/manifest.json: "), msg
    for m in match:
        assert m in msg, msg
    return msg


def test_a_good_manifest_loads():
    m = Manifest.from_json(doc([entry(), entry(name="b.tar", index="b.tar.idx")]))
    assert [s.name for s in m.shards] == ["shard-000000.tar", "b.tar"] and m.num_samples == 6


@pytest.mark.parametrize("field", ["name", "index"])
@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b.tar", "a\\b.tar", ".", "..", "",
                                 "x\0y", "x\ny", "x\x7f", "manifest.json", ".shardstream.lock",
                                 ".staging-abc", "C:x", 7, None])
def test_names_must_be_plain_file_names_inside_the_dataset(field, bad):
    msg = refused(doc([entry(**{field: bad})]), f"shards[0].{field}", "rewrite the dataset")
    assert "tampered" in msg


def test_duplicate_names_are_refused_across_shards_and_indexes():
    refused(doc([entry(), entry()]), "shards[1].name", "listed twice", "shards[0].name")
    refused(doc([entry(), entry(name="b.tar", index="shard-000000.tar")]),
            "shards[1].index", "listed twice")


@pytest.mark.parametrize("field,bad", [
    ("num_samples", 0), ("num_samples", -5), ("num_samples", True), ("num_samples", "3"),
    ("num_samples", 3.0), ("num_samples", 2 ** 62), ("num_samples", 201),  # > index_bytes
    ("bytes", -1), ("bytes", 2 ** 49), ("bytes", False), ("index_bytes", -1),
    ("index_bytes", "200"), ("num_blocks", -1), ("num_blocks", True), ("num_blocks", None),
    ("sha256", "AB" * 32), ("sha256", "ab" * 31), ("sha256", ""), ("sha256", 5),
    ("index_sha256", ""), ("index_sha256", "zz" * 32)])
def test_entry_fields_are_type_and_range_checked(field, bad):
    refused(doc([entry(**{field: bad})]), f"shards[0].{field}")


def test_entries_must_be_complete_objects_in_a_list():
    refused(doc({"a": 1}), "shards must be a list")
    refused(doc([7]), "shards[0] must be an object")
    e = entry()
    del e["sha256"]
    refused(doc([e]), "shards[0] lacks 'sha256'")
    refused(doc([entry(extra=1)]), "shards[0] has unknown field", "'extra'")


@pytest.mark.parametrize("top,where", [
    ({"key_field": 3}, "key_field"), ({"key_field": ""}, "key_field"),
    ({"block_bytes": 0}, "block_bytes"), ({"block_bytes": True}, "block_bytes"),
    ({"block_bytes": "64k"}, "block_bytes"), ({"block_bytes": 2 ** 40}, "block_bytes"),
    ({"layout": "zip"}, "layout"), ({"schema": []}, "schema"),
    ({"schema": {"a": {"count": "1", "types": []}}}, "schema['a']"),
    ({"created_by": 1}, "created_by")])
def test_top_level_fields_are_type_checked(top, where):
    refused(doc([entry()], **top), where)


def test_a_boolean_version_is_not_version_1():
    refused(doc([entry()], version=True), "version")


def test_webdataset_layout_allows_relative_shard_paths_and_unchecked_tars():
    m = Manifest.from_json(doc([entry(name="../tars/a.tar", sha256="", index="a.tar.idx")],
                               layout="webdataset", block_bytes=0))
    assert m.shards[0].name == "../tars/a.tar"
    for bad in ("/abs/a.tar", "../tars/", "a//b.tar", "x\0.tar"):
        refused(doc([entry(name=bad, index="a.tar.idx")], layout="webdataset", block_bytes=0),
                "shards[0].name")
    refused(doc([entry(index="../a.tar.idx")], layout="webdataset", block_bytes=0),
            "shards[0].index")  # indexes are always written inside the dataset


def test_a_manifest_that_is_not_utf8_names_the_file(tmp_path):
    with ShardWriter(tmp_path / "ds", fsync=False) as w:
        w.write({"a": 1})
    path = tmp_path / "ds" / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"created_by"', b'"created\xff_by"'))
    with pytest.raises(ManifestError, match=f"{path}: not UTF-8"):
        load_manifest(str(tmp_path / "ds"))


def test_a_remote_manifest_that_is_not_utf8_names_the_url():
    url = "memory://manifest-safety/utf8"
    storage_io.put_bytes(b'{"format": "shardstream\xfe"}', url + "/manifest.json")
    with pytest.raises(ManifestError, match=f"{url}/manifest.json: not UTF-8"):
        load_manifest(url)


def test_deeply_nested_json_is_a_manifest_error():
    refused("[" * 100000, "not valid JSON")


def test_manifests_the_writers_make_load(tmp_path):
    with ShardWriter(tmp_path / "a", max_samples=2, fsync=False, compression="zstd") as w:
        for i in range(5):
            w.write({"i": i})
    assert load_manifest(str(tmp_path / "a")).num_samples == 5
    import io
    import tarfile

    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "x.tar", "w") as t:
        for k in range(3):
            data = f"{k}".encode()
            info = tarfile.TarInfo(f"s{k}.txt")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    m = build_index([str(tars / "x.tar")], str(tmp_path / "idx"), checksum=False)
    again = load_manifest(str(tmp_path / "idx"))
    assert again.shards == m.shards and again.shards[0].name == "../tars/x.tar"


def test_storage_error_prints_its_message_and_carries_errno(tmp_path):
    err = storage_error("write", "/d/x", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert str(err) == "cannot write /d/x: No space left on device"
    assert err.errno == errno.ENOSPC and isinstance(err, OSError)
    assert str(StorageError("plain")) == "plain" and StorageError("plain").errno is None
    import pickle

    back = pickle.loads(pickle.dumps(err))  # worker processes send errors to the parent
    assert str(back) == str(err) and back.errno == errno.ENOSPC
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError) as info:
        ShardWriter(tmp_path / "file" / "ds")
    assert str(info.value).startswith(f"cannot create directory {tmp_path}/file/ds: ")
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST)
