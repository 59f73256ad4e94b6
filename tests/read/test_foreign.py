"""Foreign webdataset tars: keys, safe decoding (never pickle), shard splitting."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
import webdataset as wds

from shardstream.errors import CorruptShardError
from shardstream.format.members import decode_member
from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream

N = 60


class Evil:
    """Unpickling this creates a file: the marker that pickle ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def wds_tars(tmp_path):
    Evil.marker = str(tmp_path / "PWNED")
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=20, verbose=0) as w:
        for i in range(N):
            w.write({"__key__": f"k{i:04d}", "json": {"id": i, "name": f"n{i}"},
                     "npy": np.full(3, i, dtype=np.int16), "cls": i % 3, "txt": f"text {i}",
                     "mp": msgpack.packb({"v": i}), "pyd": Evil(), "bin": b"\x00\x01"})
    return str(tmp_path / "wds-{000000..000002}.tar"), tmp_path


def test_members_decoded_safely(wds_tars):
    pattern, tmp = wds_tars
    samples = list(ShardStream(pattern))
    assert [s["__key__"] for s in samples] == [f"k{i:04d}" for i in range(N)]
    s = samples[7]
    assert s["json"] == {"id": 7, "name": "n7"} and s["cls"] == 1 and s["txt"] == "text 7"
    assert s["npy"].dtype == np.int16 and s["npy"].tolist() == [7, 7, 7]
    assert s["mp"] == {"v": 7} and s["bin"] == b"\x00\x01"
    assert isinstance(s["pyd"], bytes)  # pickle members stay bytes
    assert not os.path.exists(tmp / "PWNED")


def test_npy_with_objects_is_refused():
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_member("x.npy", buf.getvalue())


def test_batches_and_worker_split(wds_tars):
    pattern, _ = wds_tars
    dl = loader(ShardStream(pattern, batch_size=8, shuffle=True), num_workers=2)
    keys = [k for b in dl for k in b["__key__"]]
    assert sorted(keys) == [f"k{i:04d}" for i in range(N)]
    b = next(iter(ShardStream(pattern, batch_size=4)))
    assert b["npy"].shape == (4, 3) and b["cls"].tolist() == [0, 1, 2, 0]
    assert b["json"]["id"].tolist() == [0, 1, 2, 3]  # nested dicts collate recursively


def test_rank_split_is_by_shard(wds_tars):
    pattern, _ = wds_tars
    r0 = [s["__key__"] for s in ShardStream(pattern, rank=0, world_size=2)]
    r1 = [s["__key__"] for s in ShardStream(pattern, rank=1, world_size=2)]
    assert len(r0) == 40 and len(r1) == 20 and not set(r0) & set(r1)


def test_truncated_foreign_tar(wds_tars):
    pattern, tmp = wds_tars
    shard = tmp / "wds-000001.tar"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2 + 100)
    with pytest.raises(CorruptShardError, match="wds-000001.tar.*after sample 'k"):
        list(ShardStream(pattern))
    got = list(ShardStream(pattern, on_error="warn"))
    assert 40 <= len(got) < N


def test_corrupt_member_names_shard_and_key(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        w.write({"__key__": "good", "json": b'{"a": 1}'})
        w.write({"__key__": "broken", "json": b'{"a": '})
    with pytest.raises(CorruptShardError, match="bad.tar.*'broken'.*json"):
        list(ShardStream(str(tmp_path / "bad.tar")))


def test_member_decoding_is_shared_and_safe():
    import pickle

    import msgpack

    from shardstream.format.encode import encode_sample

    assert decode_member("a.MSGPACK", msgpack.packb({1: "int keys from other writers"})) == \
        {1: "int keys from other writers"}
    arr = decode_member("x.mp", encode_sample({"a": np.arange(3)}))["a"]
    np.testing.assert_array_equal(arr, [0, 1, 2])  # shardstream's array ext is understood
    blob = pickle.dumps({"x": 1})
    assert decode_member("x.pyd", blob) == blob and decode_member("x.pickle", blob) == blob
    assert decode_member("seg.cls", b" 7\n") == 7
