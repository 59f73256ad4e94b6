"""A reader that trusts no index: crafted or damaged indexes give CorruptShardError naming
the file (never MemoryError/TypeError), and an index that is not the one the manifest
lists (a dataset overwritten under a reader, a stale index) is an IndexMismatchError."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import numpy as np
import pytest

from shardstream.errors import CorruptShardError, IndexMismatchError
from shardstream.format.codec import decode_sample
from shardstream.format.encode import encode_sample
from shardstream.format.index import ShardIndex
from shardstream.format.limits import MAX_BLOCK_RAW_BYTES
from shardstream.pytorch.random_access import ShardDataset
from shardstream.pytorch.stream import ShardStream
from shardstream.read.dataset import iter_dataset, open_dataset
from shardstream.write.writer import ShardWriter

pytestmark = pytest.mark.fuzz

N = 200


@pytest.fixture
def raw(make_dataset) -> str:
    return make_dataset(N, "raw", max_samples=70, block_bytes=600)


@pytest.fixture
def zst(make_dataset) -> str:
    return make_dataset(N, "zst", max_samples=70, block_bytes=600, compression="zstd")


def _doc(path: str) -> dict:
    ds = open_dataset(path)
    data = open(ds.index_path(ds.manifest.shards[0]), "rb").read()
    d = decode_sample(data)
    return {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in d.items()}


def _crafts(raw_doc: dict, zst_doc: dict) -> dict[str, dict]:
    """name -> a crafted index map."""
    def edit(base: dict, **kw) -> dict:
        d = dict(base)
        for k, v in kw.items():
            if v is None:
                del d[k]
            else:
                d[k] = v
        return d

    r, z = raw_doc, zst_doc
    wrap = r["block_offset"].astype(np.uint64).copy()
    wrap[1] = np.uint64(2**64 - 256)  # offset + size wraps around in uint64
    huge = z["block_raw_size"].astype(np.uint64).copy()
    huge[0] = 3_300_000_000  # a 51 KB shard "inflating" to 3.3 GB
    big = z["block_raw_size"].astype(np.uint64).copy()
    big[0] = int(z["block_size"][0]) * 40_000  # more than zstd can expand anything to
    neg = r["sample_offset"].astype(np.int64).copy()
    neg[3] = -5
    back = r["sample_offset"].astype(np.int64).copy()
    back[2] = back[1]  # two samples at one offset
    return {
        "wrap-around offset": edit(r, block_offset=wrap),
        "offset beyond shard": edit(r, block_offset=r["block_offset"] + r["shard_bytes"]),
        "huge raw size": edit(z, block_raw_size=huge),
        "raw size beyond zstd": edit(z, block_raw_size=big),
        "float array": edit(r, block_size=r["block_size"].astype(np.float64)),
        "2-D array": edit(r, block_first=np.stack([r["block_first"]] * 2)),
        "int instead of array": edit(r, sample_offset=7),
        "list instead of array": edit(r, block_offset=r["block_offset"].tolist()),
        "missing field": edit(r, block_size=None),
        "missing checksums": edit(r, block_checksum=None),
        "signed checksums": edit(r, block_checksum=r["block_checksum"].astype(np.int64)),
        "bool num_samples": edit(r, num_samples=True),
        "float num_samples": edit(r, num_samples=float(r["num_samples"])),
        "negative shard_bytes": edit(r, shard_bytes=-1),
        "huge num_samples": edit(r, num_samples=2**63),
        "negative sample offset": edit(r, sample_offset=neg),
        "samples out of order": edit(r, sample_offset=back),
        "bool array": edit(r, block_first=r["block_first"].astype(bool)),
        "str sha": edit(r, shard_sha256=5),
        "bytes dictionary": edit(z, dictionary="abc"),
        "unknown codec": edit(z, compression="lz4"),
        "short frame_starts": edit(z, frame_starts=z["frame_starts"][:-1]),
        "frame offsets 2-D": edit(z, frame_offset=np.stack([z["frame_offset"]] * 2)),
        "short checksums": edit(r, block_checksum=r["block_checksum"][:-1]),
    }


def test_crafted_indexes_are_corrupt_shard_errors(raw, zst) -> None:
    crafts = _crafts(_doc(raw), _doc(zst))
    assert MAX_BLOCK_RAW_BYTES == 1 << 30
    for name, doc in crafts.items():
        data = encode_sample(doc, check=False)
        with pytest.raises(CorruptShardError, match=r"^/x/s\.tar\.idx: ") as exc:
            ShardIndex.from_bytes(data, where="/x/s.tar.idx")
        assert "rebuild" in str(exc.value) or "upgrade" in str(exc.value), name


def test_crafted_index_in_every_reader(raw) -> None:
    """A crafted index on disk: each reader raises (or, in warn mode, skips) cleanly."""
    ds = open_dataset(raw)
    idx_path = ds.index_path(ds.manifest.shards[0])
    doc = _doc(raw)
    doc["block_offset"] = doc["block_offset"].astype(np.float64)
    open(idx_path, "wb").write(encode_sample(doc, check=False))
    pattern = rf"{idx_path}: index is inconsistent"
    with pytest.raises(CorruptShardError, match=pattern):
        list(ShardStream(raw))
    with pytest.raises(CorruptShardError, match=pattern):
        ShardDataset(raw)[0]
    with pytest.raises(CorruptShardError, match=pattern):
        list(iter_dataset(raw))
    got = [s["id"] for s in ShardStream(raw, on_error="warn")]
    assert got[70:] == list(range(70, N))


def test_every_index_bit_flip_is_caught(raw, zst, caplog) -> None:
    """A flipped bit in every byte of an index (seeded): from_bytes parses it or raises
    CorruptShardError, and the stream reader (warn mode) yields only correct samples,
    never MemoryError."""
    rng = np.random.default_rng(3)
    for path in (raw, zst):
        ds = open_dataset(path)
        idx_path = ds.index_path(ds.manifest.shards[0])
        good = open(idx_path, "rb").read()
        for pos in range(len(good)):
            bad = bytearray(good)
            bad[pos] ^= 1 << int(rng.integers(8))
            try:
                ShardIndex.from_bytes(bytes(bad), where=idx_path)
            except CorruptShardError as exc:
                assert idx_path in str(exc)
        for pos in rng.integers(0, len(good), 12).tolist():
            bad = bytearray(good)
            bad[pos] ^= 1 << int(rng.integers(8))
            open(idx_path, "wb").write(bytes(bad))
            with caplog.at_level(logging.WARNING, logger="shardstream"):
                got = list(ShardStream(path, on_error="warn"))
            assert all(s["id"] == i for s, i in zip(got[70:], range(70, N)))
            assert all(s["s"] == f"s{s['id']}" for s in got)
            with pytest.raises(CorruptShardError):  # IndexMismatchError or inconsistent
                ShardDataset(path)[0]
        open(idx_path, "wb").write(good)


def test_index_of_another_shard(raw) -> None:
    ds = open_dataset(raw)
    a, b = ds.manifest.shards[:2]
    shutil.copy(ds.index_path(b), ds.index_path(a))
    for read in (lambda: list(ShardStream(raw)), lambda: ShardDataset(raw)[0],
                 lambda: list(iter_dataset(raw))):
        with pytest.raises(IndexMismatchError, match="shardstream index"):
            read()


def test_stale_index_of_same_size_is_a_mismatch(raw) -> None:
    """Same sample count, same shard size: only the sha256s differ."""
    ds = open_dataset(raw)
    info = ds.manifest.shards[0]
    idx = ShardIndex.from_bytes(open(ds.index_path(info), "rb").read())
    stale = dataclasses.replace(idx, shard_sha256="0" * 64).to_bytes()
    open(ds.index_path(info), "wb").write(stale)
    for read in (lambda: list(ShardStream(raw)), lambda: ShardDataset(raw)[0],
                 lambda: list(iter_dataset(raw))):
        with pytest.raises(IndexMismatchError, match="shard sha256.*reopen it.*rebuild"):
            read()


def _replace_files(path: str, other: str) -> None:
    """Write another dataset of the same sizes and counts (other strings) and move its
    shards and indexes over ``path``'s names, as an overwrite that reuses the shard names
    does (one file at a time, manifest last)."""
    with ShardWriter(other, max_samples=70, block_bytes=600, fsync=False) as w:
        for i in range(N):
            w.write({"id": i, "f": i / 4, "s": f"t{i}", "x": np.arange(i % 5 + 1, dtype=np.int32),
                     "meta": {"even": i % 2 == 0}})
    for name in sorted(os.listdir(other)):
        os.replace(os.path.join(other, name), os.path.join(path, name))


def test_overwrite_under_a_reader(raw, tmp_path) -> None:
    """Readers opened before an overwrite never mix the two datasets' samples."""
    stream = ShardStream(raw, batch_size=None)
    ds = ShardDataset(raw)
    assert ds[0]["id"] == 0  # shard 0 mapped (the old file stays readable)
    _replace_files(raw, str(tmp_path / "new"))
    with pytest.raises(IndexMismatchError, match="changed under this reader.*reopen it"):
        list(stream)
    with pytest.raises(IndexMismatchError, match="changed under this reader.*reopen it"):
        ds[N - 1]
    assert ds[1]["s"] == "s1"  # the old map of shard 0: still the old dataset, consistently
    assert ShardDataset(raw)[N - 1]["s"] == f"t{N - 1}"  # reopened: the new dataset
