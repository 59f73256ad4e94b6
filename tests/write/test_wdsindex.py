"""Indexing webdataset tars and rebuilding shardstream indexes (`shardstream index`)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from shardstream.errors import CorruptShardError, DatasetExistsError, IndexMismatchError
from shardstream.format.index import INDEX_SUFFIX
from shardstream.format.manifest import MANIFEST_NAME
from shardstream.format.members import decode_member
from shardstream.format.webdataset import load_foreign_index, manifest_layout
from shardstream.pytorch.random_access import ShardDataset
from shardstream.read.webdataset import iter_foreign_samples
from shardstream.storage.io import load_manifest
from shardstream.write.reindex import build_index
from shardstream.write.scan import scan_block_tar
from shardstream.write.writer import ShardWriter

N = 53


def wds_sample(i: int) -> dict:
    return {"__key__": f"sample{i:05d}", "json": {"i": i, "tags": ["a", str(i)]},
            "npy": np.arange(i % 7 + 1, dtype=np.float32) * i, "cls": i % 5,
            "txt": f"text {i} \u00e9", "pyd": {"secret": i}, "bin": bytes([i % 256]) * (i % 3)}


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("wds")
    with wds.ShardWriter(str(d / "wds-%06d.tar"), maxcount=17, verbose=0) as w:
        for i in range(N):
            w.write(wds_sample(i))
    return str(d)


def shard_paths(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".tar"))


def test_webdataset_tars_len_and_decoding_match_webdataset(wds_dir, tmp_path):
    out = str(tmp_path / "idx")
    manifest = build_index(shard_paths(wds_dir), out)
    assert manifest.num_samples == N and len(manifest.shards) == 4
    assert manifest_layout(out) == "webdataset"
    assert json.load(open(os.path.join(out, MANIFEST_NAME)))["layout"] == "webdataset"
    assert sorted(os.listdir(wds_dir)) == [f"wds-{k:06d}.tar" for k in range(4)]  # untouched
    ds = ShardDataset(out)
    assert len(ds) == N
    theirs = list(wds.WebDataset(shard_paths(wds_dir), shardshuffle=False).decode())
    raw = list(wds.WebDataset(shard_paths(wds_dir), shardshuffle=False))
    assert len(theirs) == N
    for i in range(N):
        ours = ds[i]
        assert ours["__key__"] == theirs[i]["__key__"] == f"sample{i:05d}"
        assert ours["json"] == theirs[i]["json"]
        assert ours["cls"] == theirs[i]["cls"] and ours["txt"] == theirs[i]["txt"]
        np.testing.assert_array_equal(ours["npy"], theirs[i]["npy"])
        assert ours["npy"].dtype == np.float32
        assert ours["bin"] == raw[i]["bin"]
        assert type(ours["pyd"]) is bytes and ours["pyd"] == raw[i]["pyd"]  # never unpickled
        assert pickle.loads(ours["pyd"]) == {"secret": i}
    assert ds[-1]["__key__"] == f"sample{N - 1:05d}"
    assert [s["cls"] for s in ds[3:6]] == [3, 4, 0]


def test_default_output_is_the_shards_directory(wds_dir, tmp_path):
    d = shutil.copytree(wds_dir, tmp_path / "copy")
    build_index([os.path.join(d, "wds-{000000..000003}.tar")])
    m = load_manifest(str(d))
    assert [s.name for s in m.shards] == [f"wds-{k:06d}.tar" for k in range(4)]
    assert all(os.path.exists(os.path.join(d, s.index)) for s in m.shards)
    assert ShardDataset(str(d))[20]["cls"] == 0
    build_index([str(d)])  # re-indexing the directory is idempotent
    assert load_manifest(str(d)).num_samples == N


def test_iter_foreign_samples_for_the_stream_reader(wds_dir, tmp_path):
    out = str(tmp_path / "i")
    m = build_index(shard_paths(wds_dir), out)
    ds = ShardDataset(out)
    info = m.shards[1]
    index = load_foreign_index(os.path.join(out, info.index))
    path = os.path.join(out, info.name)
    got = list(iter_foreign_samples(path, index, 2, 9))
    assert [s["__key__"] for s in got] == [f"sample{i:05d}" for i in range(19, 26)]
    assert all(s["json"] == ds[17 + 2 + k]["json"] for k, s in enumerate(got))
    raw = next(iter_foreign_samples(path, index, 0, 1, decode=False))
    assert raw["cls"] == b"2" and raw["__key__"] == "sample00017"
    assert len(list(iter_foreign_samples(path, index))) == 17


def _tar(path: str, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1234.5  # float mtime: PAX headers in front of every member
            tf.addfile(ti, io.BytesIO(data))


def test_grouping_follows_webdataset(tmp_path):
    long = "d/" + "k" * 150  # > 100 chars: PAX long-name header
    members = [("__meta__", b"m"), ("a/x.c.json", b'{"v": 1}'), ("a/x.C.TXT", b"hi"),
               ("noext", b"skipped"), ("a/y.seg.npy", _npy(np.eye(2))), (long + ".cls", b"7"),
               (long + ".mpk", b"\x81\xa1a\x01"), ("z.pickle", b"\x80not unpickled")]
    path = str(tmp_path / "g.tar")
    _tar(path, members)
    build_index([path])
    ds = ShardDataset(str(tmp_path))
    theirs = list(wds.WebDataset(path, shardshuffle=False))
    assert len(ds) == len(theirs) == 4
    assert [ds[i]["__key__"] for i in range(4)] == [t["__key__"] for t in theirs]
    assert ds[0] == {"__key__": "a/x", "c.json": {"v": 1}, "c.txt": "hi"}
    np.testing.assert_array_equal(ds[1]["seg.npy"], np.eye(2))
    assert ds[2] == {"__key__": long, "cls": 7, "mpk": {"a": 1}}
    assert ds[3] == {"__key__": "z", "pickle": b"\x80not unpickled"}


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def test_npy_object_arrays_are_refused(tmp_path):
    b = io.BytesIO()
    np.save(b, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_member("npy", b.getvalue())
    path = str(tmp_path / "o.tar")
    _tar(path, [("k.npy", b.getvalue())])
    build_index([path])
    with pytest.raises(CorruptShardError, match="sample 0.*npy"):
        ShardDataset(str(tmp_path))[0]


def test_duplicate_member_and_compressed_tar(tmp_path):
    path = str(tmp_path / "dup.tar")
    _tar(path, [("k.txt", b"a"), ("k.txt", b"b")])
    with pytest.raises(CorruptShardError, match="duplicate"):
        build_index([path])
    gz = str(tmp_path / "c.tar.gz")
    with tarfile.open(gz, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("k.txt"), io.BytesIO(b""))
    with pytest.raises(CorruptShardError, match="decompress"):
        build_index([gz], str(tmp_path / "o"))


def test_foreign_tar_changed_after_indexing(wds_dir, tmp_path):
    d = shutil.copytree(wds_dir, tmp_path / "ch")
    build_index([str(d)])
    with open(os.path.join(d, "wds-000001.tar"), "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(IndexMismatchError, match="shardstream index"):
        ShardDataset(str(d))[20]


def test_refuses_to_overwrite_a_shardstream_dataset(wds_dir, tmp_path):
    out = tmp_path / "ss"
    with ShardWriter(out, fsync=False) as w:
        w.write({"a": 1})
    with pytest.raises(DatasetExistsError):
        build_index(shard_paths(wds_dir), str(out))


# ---------------------------------------------------------------- our own shards
def own_dataset(directory) -> str:
    rng = np.random.default_rng(1)
    with ShardWriter(directory, max_samples=30, block_bytes=700, fsync=False) as w:
        for i in range(100):
            n = 2000 if i % 17 == 0 else int(rng.integers(0, 50))
            w.write({"id": i, "x": rng.integers(0, 9, n, dtype=np.int16), "s": "y" * (i % 9)})
    return str(directory)


def test_rebuilt_own_index_is_byte_identical(tmp_path):
    root = own_dataset(tmp_path / "own")
    m = load_manifest(root)
    for info in m.shards:
        original = open(os.path.join(root, info.index), "rb").read()
        assert scan_block_tar(os.path.join(root, info.name)).to_bytes() == original
    before = open(os.path.join(root, MANIFEST_NAME)).read()
    os.remove(os.path.join(root, m.shards[1].index))
    build_index([os.path.join(root, m.shards[1].name)])
    assert open(os.path.join(root, MANIFEST_NAME)).read() == before
    assert ShardDataset(root)[45]["id"] == 45
    build_index([root])  # the whole dataset directory
    assert open(os.path.join(root, MANIFEST_NAME)).read() == before


def test_rebuild_fixes_a_replaced_shard(tmp_path):
    root = own_dataset(tmp_path / "a")
    other = own_dataset(tmp_path / "b")
    m = load_manifest(root)
    name = m.shards[0].name
    shutil.copy(os.path.join(other, load_manifest(other).shards[1].name),
                os.path.join(root, name))
    with pytest.raises(CorruptShardError, match="shardstream index"):
        ShardDataset(root)[0]
    build_index([os.path.join(root, name)])
    assert ShardDataset(root)[0]["id"] == 30  # the replacement's first sample


def test_rebuild_without_manifest(tmp_path):
    root = own_dataset(tmp_path / "nm")
    names = [s.name for s in load_manifest(root).shards]
    os.remove(os.path.join(root, MANIFEST_NAME))
    for n in names:
        os.remove(os.path.join(root, n + INDEX_SUFFIX))
    m = build_index([root])
    assert [s.name for s in m.shards] == names and m.num_samples == 100
    ds = ShardDataset(root)
    assert [ds[i]["id"] for i in range(100)] == list(range(100))


def test_truncated_own_shard_cannot_be_indexed(tmp_path):
    root = own_dataset(tmp_path / "tr")
    info = load_manifest(root).shards[0]
    os.truncate(os.path.join(root, info.name), info.bytes - 2000)
    with pytest.raises(CorruptShardError, match=info.name):
        build_index([os.path.join(root, info.name)])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_walk_matches_tarfile(tmp_path, fmt):
    from shardstream.format.tar import list_members, list_members_tarfile
    path = str(tmp_path / "t.tar")
    names = ["a.txt", "p" * 90 + "/" + "q" * 90 + ".json", "é/ü.cls", "big.bin"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("x" * 300 + ".txt")  # long names: GNU 'L' or pax path records
    with tarfile.open(path, "w", format=fmt, encoding="utf-8") as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("lnk.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "l" * 200 if fmt != tarfile.USTAR_FORMAT \
            else "a.txt"
        tf.addfile(link)
        for k, name in enumerate(names):
            ti = tarfile.TarInfo(name)
            data = bytes(range(256)) * (k * 7 + 1)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    assert list_members(path) == list_members_tarfile(path)
    assert [m.name for m in list_members(path)] == names


def test_global_pax_header_falls_back_to_tarfile(tmp_path):
    from shardstream.format.tar import list_members, list_members_tarfile
    path = str(tmp_path / "g.tar")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "hi"}) as tf:
        for k in range(3):
            ti = tarfile.TarInfo(f"s{k}.txt")
            ti.size = 1
            tf.addfile(ti, io.BytesIO(b"x"))
    assert list_members(path) == list_members_tarfile(path) and len(list_members(path)) == 3


@pytest.mark.parametrize("arr", [np.arange(300, dtype=np.int32), np.zeros((0, 3)),
                                 np.asfortranarray(np.arange(12.0).reshape(3, 4)),
                                 np.array(5, dtype=">i8"), np.array(["ab", "c"]),
                                 np.zeros(2, dtype=[("a", "<i4"), ("b", "f8")])])
def test_npy_fast_path_equals_np_load(arr):
    b = io.BytesIO()
    np.save(b, arr)
    data = b.getvalue()
    for _ in range(2):  # cold, then cached header
        ours, theirs = decode_member("npy", data), np.load(io.BytesIO(data))
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert np.array_equal(ours, theirs) and not ours.flags.writeable
    with pytest.raises(ValueError):
        decode_member("npy", data[:-1] if arr.size else data[:20])
