"""Per-member checksums of indexed webdataset tars (foreign index v2), and empty tars."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from xxhash import xxh3_64_intdigest as xxh3

from shardstream.errors import CorruptShardError, InputError
from shardstream.format.codec import decode_sample
from shardstream.format.encode import encode_sample
from shardstream.format.index import INDEX_SUFFIX
from shardstream.format.manifest import MANIFEST_NAME
from shardstream.format.webdataset import ForeignIndex, load_foreign_index
from shardstream.pytorch.random_access import ShardDataset
from shardstream.pytorch.stream import ShardStream
from shardstream.read.blocks import BlockReader
from shardstream.read.shards import ShardRef
from shardstream.read.verify import verify
from shardstream.read.webdataset import iter_foreign_samples
from shardstream.storage.io import load_manifest
from shardstream.write import scan
from shardstream.write.reindex import build_index
from shardstream.write.scan import scan_foreign_tar

pytestmark = pytest.mark.fuzz

N, PER_TAR = 60, 25
VICTIM = 31  # sample whose .txt member gets a flipped bit (second tar)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _members(i: int) -> list[tuple[str, bytes]]:
    key = f"k{i:04d}"
    return [(f"{key}.ids.npy", _npy(np.arange(i % 5 + 1, dtype=np.int32))),
            (f"{key}.cls", str(i % 7).encode()), (f"{key}.txt", f"review {i}".encode())]


def _write_tar(path: str, samples: range, extra: list[tuple[str, bytes]] = ()) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in [m for i in samples for m in _members(i)] + list(extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("wds") / "data")
    os.makedirs(d)
    for t, lo in enumerate(range(0, N, PER_TAR)):
        _write_tar(os.path.join(d, f"wds-{t:03d}.tar"), range(lo, min(lo + PER_TAR, N)))
    build_index([d])
    return d


@pytest.fixture
def damaged(clean, tmp_path) -> tuple[str, str, int]:
    """(dataset dir, victim tar, byte offset of the flipped bit) of a copy."""
    d = str(shutil.copytree(clean, tmp_path / "copy"))
    tar = os.path.join(d, "wds-001.tar")
    idx = load_foreign_index(tar + INDEX_SUFFIX)
    j = VICTIM - PER_TAR
    m = next(m for m in range(int(idx.member_first[j]), int(idx.member_first[j + 1]))
             if idx.exts[int(idx.member_ext[m])] == "txt")
    off = int(idx.member_offset[m])
    with open(tar, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 1]))  # "review" -> "seview": still valid text
    return d, tar, off


def _message(tar: str, off: int) -> str:
    return f"{tar}: sample 'k{VICTIM:04d}'.*member k{VICTIM:04d}.txt at byte offset {off} " \
           "fails its checksum"


# ---------------------------------------------------------------- the index
def test_index_v2_records_xxh3_of_every_member(clean):
    tar = os.path.join(clean, "wds-000.tar")
    idx = load_foreign_index(tar + INDEX_SUFFIX)
    assert idx.checksummed and idx.member_checksum.dtype == np.uint64
    assert decode_sample(open(tar + INDEX_SUFFIX, "rb").read())["version"] == 2
    with tarfile.open(tar) as tf:
        want = [xxh3(tf.extractfile(m).read()) for m in tf.getmembers()]
    assert idx.member_checksum.tolist() == want
    assert idx.checksums()[1] == want[1]  # cached view; pickling (spawn workers) drops it
    assert pickle.loads(pickle.dumps(idx)).checksums().tolist() == want


def test_members_spanning_read_chunks_hash_the_same(clean, monkeypatch):
    tar = os.path.join(clean, "wds-000.tar")
    whole = scan_foreign_tar(tar)
    monkeypatch.setattr(scan, "_SCAN_CHUNK", 100)  # every member spans chunks
    small = scan_foreign_tar(tar)
    assert small.member_checksum.tolist() == whole.member_checksum.tolist()
    assert small.shard_sha256 == whole.shard_sha256 != ""
    fast = scan_foreign_tar(tar, checksum=False)  # no sha256, still member checksums
    assert fast.shard_sha256 == "" and fast.member_checksum.tolist() == \
        whole.member_checksum.tolist()


@pytest.mark.parametrize("edit", ["missing", "short", "signed", "float"])
def test_damaged_member_checksums_are_refused(clean, tmp_path, edit):
    d = decode_sample(open(os.path.join(clean, "wds-000.tar" + INDEX_SUFFIX), "rb").read())
    c = d["member_checksum"]
    if edit == "missing":
        del d["member_checksum"]
    else:
        d["member_checksum"] = {"short": c[:-1], "signed": c.astype("<i8"),
                                "float": c.astype("<f8")}[edit]
    path = str(tmp_path / "bad.idx")
    with open(path, "wb") as f:
        f.write(encode_sample(d, check=False))
    with pytest.raises(CorruptShardError, match=f"{path}.*member_checksum"):
        load_foreign_index(path)


def test_version_1_indexes_read_as_before(damaged):
    """An index without checksums still opens; a flip goes unnoticed, as it did."""
    d, tar, _ = damaged
    old = load_foreign_index(tar + INDEX_SUFFIX)
    v1 = ForeignIndex(*(getattr(old, f) for f in (
        "num_samples", "shard_bytes", "shard_sha256", "exts", "key_blob", "key_offset",
        "member_first", "member_offset", "member_size", "member_ext")))
    data = v1.to_bytes()
    assert decode_sample(data)["version"] == 1 and "member_checksum" not in decode_sample(data)
    with open(tar + INDEX_SUFFIX, "wb") as f:
        f.write(data)
    doc = json.load(open(os.path.join(d, MANIFEST_NAME)))
    entry = next(s for s in doc["shards"] if s["name"] == "wds-001.tar")
    entry["index_bytes"], entry["index_sha256"] = len(data), hashlib.sha256(data).hexdigest()
    with open(os.path.join(d, MANIFEST_NAME), "w") as f:
        json.dump(doc, f)
    assert not load_foreign_index(tar + INDEX_SUFFIX).checksummed
    assert ShardDataset(d)[VICTIM]["txt"] == f"seview {VICTIM}"
    assert len(list(ShardStream(d, rank=0, world_size=1))) == N


# ---------------------------------------------------------------- readers
def test_random_access_names_tar_key_member_and_offset(damaged):
    d, tar, off = damaged
    ds = ShardDataset(d)
    with pytest.raises(CorruptShardError, match=_message(tar, off)):
        ds[VICTIM]
    with pytest.raises(CorruptShardError, match=_message(tar, off)):  # not marked as checked
        ds[VICTIM]
    assert [ds[i]["txt"] for i in range(N) if i != VICTIM] == \
        [f"review {i}" for i in range(N) if i != VICTIM]
    assert ShardDataset(d, verify_blocks=False)[VICTIM]["txt"] == f"seview {VICTIM}"


def test_streaming_raises_or_skips_never_wrong_data(damaged, caplog):
    d, tar, off = damaged
    with pytest.raises(CorruptShardError, match=_message(tar, off)):
        list(ShardStream(d, rank=0, world_size=1))
    s = ShardStream(d, rank=0, world_size=1, on_error="warn")
    with caplog.at_level(logging.WARNING, logger="shardstream"):
        got = list(s)
    assert "fails its checksum" in caplog.text and s.skipped > 0
    assert all(g["txt"] == f"review {int(g['__key__'][1:])}" for g in got)
    tars = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".tar"))
    with pytest.raises(CorruptShardError, match=_message(tar, off)):
        list(ShardStream(tars, rank=0, world_size=1))  # a list of indexed tars, too


def test_stream_reader_checks_every_run_read_from_disk(clean, tmp_path):
    """A run hashed once is hashed again when read from disk again (cache evicted)."""
    tar = str(shutil.copy(os.path.join(clean, "wds-000.tar"), tmp_path / "a.tar"))
    build_index([tar])
    reader = BlockReader([ShardRef(tar, tar + INDEX_SUFFIX)], cache_bytes=1)
    ref = reader.open(0)
    last = int(ref.block_first[-1])
    assert last > 0  # two runs at least: reading the last evicts the first
    one = lambda j: reader.read(np.zeros(1, np.int64), np.array([j]))[0]  # noqa: E731
    assert one(0)["txt"] == "review 0" and one(last)["__key__"] == f"k{last:04d}"
    idx = load_foreign_index(tar + INDEX_SUFFIX)
    off = int(idx.member_offset[int(idx.member_first[0]) + 2])  # k0000.txt
    with open(tar, "r+b") as f:
        f.seek(off)
        f.write(b"s")
    with pytest.raises(CorruptShardError, match=f"{tar}: sample 'k0000'.*k0000.txt at byte "
                                                f"offset {off} fails its checksum"):
        one(0)
    reader.close()


def test_streaming_opt_out_by_environment(damaged, monkeypatch):
    d, _, _ = damaged
    monkeypatch.setenv("SHARDSTREAM_VERIFY_BLOCKS", "0")
    got = {g["__key__"]: g["txt"] for g in ShardStream(d, rank=0, world_size=1)}
    assert got[f"k{VICTIM:04d}"] == f"seview {VICTIM}"
    assert ShardDataset(d)[VICTIM]["txt"] == f"seview {VICTIM}"


def test_iter_foreign_samples_and_verify_notice(damaged):
    d, tar, off = damaged
    idx = load_foreign_index(tar + INDEX_SUFFIX)
    with pytest.raises(CorruptShardError, match=_message(tar, off)):
        list(iter_foreign_samples(tar, idx))
    assert len(list(iter_foreign_samples(tar, idx, verify=False))) == PER_TAR
    report = verify(d)
    assert [p.shard for p in report.problems] == ["wds-001.tar"]


# ---------------------------------------------------------------- empty tars
def test_empty_tars_are_left_out_with_a_warning(tmp_path):
    d = str(tmp_path)
    _write_tar(os.path.join(d, "a.tar"), range(3))
    _write_tar(os.path.join(d, "b-empty.tar"), range(0))
    _write_tar(os.path.join(d, "c-meta.tar"), range(0), [("__meta__", b"{}")])
    with pytest.warns(UserWarning, match="b-empty.tar.*c-meta.tar.*left out of the manifest"):
        m = build_index([d])
    assert [s.name for s in m.shards] == ["a.tar"]
    assert [s.name for s in load_manifest(d).shards] == ["a.tar"]
    assert not os.path.exists(os.path.join(d, "b-empty.tar" + INDEX_SUFFIX))
    assert [s["__key__"] for s in ShardDataset(d)] == ["k0000", "k0001", "k0002"]


def test_only_empty_tars_is_an_input_error(tmp_path):
    path = str(tmp_path / "empty.tar")
    _write_tar(path, range(0))
    with pytest.raises(InputError, match=f"{path}: no samples to index"):
        build_index([path])
    assert not os.path.exists(os.path.join(str(tmp_path), MANIFEST_NAME))
