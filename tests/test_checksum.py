"""Per-block checksums (index/manifest format v4): every reader checks every block it
reads, so damaged bytes give CorruptShardError, never wrong samples; older versions
still read; the opt-out skips the check."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from shardstream.errors import CorruptShardError, ManifestError
from shardstream.format import codec, encode
from shardstream.format import index as format_index
from shardstream.format.index import INDEX_VERSION_CHECKSUMS, ShardIndex, block_checksum
from shardstream.format.manifest import Manifest
from shardstream.pytorch.random_access import ShardDataset
from shardstream.pytorch.stream import ShardStream
from shardstream.read.dataset import iter_dataset, open_dataset, read_block
from shardstream.read.verify import verify
from shardstream.storage.io import load_manifest
from shardstream.write.convert import convert
from shardstream.write.reindex import build_index

pytestmark = pytest.mark.fuzz

N = 240
V2 = os.path.join(os.path.dirname(__file__), "data", "v2-zstd")  # written by shardstream 0.1.0


def make(i: int) -> dict:
    """Samples whose every byte matters: a flipped bit changes a value or the structure."""
    return {"id": i, "s": f"text-{i:05d}-" + "abcdefgh"[i % 8] * (i % 40),
            "x": np.arange(i % 7 + 1, dtype=np.int32) * i, "f": i / 8}


def plain(s: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in s.items()}


EXPECTED = [plain(make(i)) for i in range(N)]


@pytest.fixture
def raw(make_dataset) -> str:
    return make_dataset(N, "raw", make=make, max_samples=90, block_bytes=700)


@pytest.fixture
def zst(make_dataset) -> str:
    return make_dataset(N, "zst", make=make, max_samples=90, block_bytes=700,
                        compression="zstd")


def _index(path: str, shard: int = 0) -> ShardIndex:
    ds = open_dataset(path)
    with open(ds.index_path(ds.manifest.shards[shard]), "rb") as f:
        return ShardIndex.from_bytes(f.read())


def _rewrite_index(path: str, shard: int, index: ShardIndex, version: int | None = None) -> None:
    """Replace one index and fix its manifest entry (as an older shardstream wrote it)."""
    ds = open_dataset(path)
    data = index.to_bytes()
    open(ds.index_path(ds.manifest.shards[shard]), "wb").write(data)
    doc = json.load(open(os.path.join(path, "manifest.json")))
    doc["shards"][shard].update(index_bytes=len(data),
                                index_sha256=hashlib.sha256(data).hexdigest())
    if version is not None:
        doc["version"] = version
    json.dump(doc, open(os.path.join(path, "manifest.json"), "w"))


# ---------------------------------------------------------------- format
def test_v4_indexes_carry_block_checksums(raw, zst) -> None:
    for path in (raw, zst):
        assert json.load(open(os.path.join(path, "manifest.json")))["version"] == 4
        ds = open_dataset(path)
        for info in ds.manifest.shards:
            data = open(ds.index_path(info), "rb").read()
            assert codec.decode_sample(data)["version"] == INDEX_VERSION_CHECKSUMS
            idx = ShardIndex.from_bytes(data)
            assert idx.checksummed and idx.block_checksum.dtype == np.uint64
            shard = open(ds.shard_path(info), "rb").read()
            for b in range(idx.num_blocks):
                off, size = int(idx.block_offset[b]), int(idx.block_size[b])
                assert int(idx.block_checksum[b]) == block_checksum(shard[off:off + size])
    assert _index(zst).framed and _index(raw).compression is None


def test_v4_index_without_checksums_is_corrupt(raw) -> None:
    doc = codec.decode_sample(ShardIndex.to_bytes(_index(raw)))
    del doc["block_checksum"]
    with pytest.raises(CorruptShardError, match=r"my\.idx: .*'block_checksum' is missing"):
        ShardIndex.from_bytes(encode.encode_sample(doc, check=False), where="my.idx")


def test_newer_versions_are_refused_with_upgrade(raw) -> None:
    doc = codec.decode_sample(_index(raw).to_bytes())
    doc["version"] = 5
    with pytest.raises(CorruptShardError, match="upgrade shardstream"):
        ShardIndex.from_bytes(encode.encode_sample(doc, check=False))
    text = json.load(open(os.path.join(raw, "manifest.json")))
    text["version"] = 5
    with pytest.raises(ManifestError, match="upgrade shardstream"):
        Manifest.from_json(json.dumps(text))


def test_rebuilt_index_has_checksums(raw, zst) -> None:
    for path in (raw, zst):
        ds = open_dataset(path)
        before = [open(ds.index_path(s), "rb").read() for s in ds.manifest.shards]
        for s in ds.manifest.shards:
            os.unlink(ds.index_path(s))
        build_index([path])
        assert [open(ds.index_path(s), "rb").read() for s in ds.manifest.shards] == before


# ---------------------------------------------------------------- older versions
def _downgrade(path: str, version: int) -> None:
    """Rewrite every index without checksums, as shardstream 0.2 (v1 raw / v3 framed) did."""
    for k in range(len(open_dataset(path).manifest.shards)):
        _rewrite_index(path, k, dataclasses.replace(_index(path, k), block_checksum=None),
                       version)


@pytest.mark.parametrize("kind, version", [("raw", 1), ("zst", 3)])
def test_old_versions_still_read(kind, version, request, tmp_path) -> None:
    path = request.getfixturevalue(kind)
    _downgrade(path, version)
    ds = open_dataset(path)
    data = open(ds.index_path(ds.manifest.shards[0]), "rb").read()
    assert codec.decode_sample(data)["version"] == version
    assert ds.manifest.version == version and not _index(path).checksummed
    assert [plain(s) for s in iter_dataset(path)] == EXPECTED
    assert [plain(s) for s in ShardStream(path)] == EXPECTED
    rd = ShardDataset(path)
    assert [plain(rd[i]) for i in (0, 5, 97, N - 1)] == [EXPECTED[i] for i in (0, 5, 97, N - 1)]
    assert verify(path).ok
    out = str(tmp_path / "up")  # `shardstream convert OLD NEW` upgrades to v4
    m = convert(path, out, compression="zstd" if kind == "zst" else None, fsync=False)
    assert load_manifest(out).version == 4 and m.num_samples == N and _index(out).checksummed
    assert [plain(s) for s in iter_dataset(out)] == EXPECTED


def test_v2_dataset_still_reads(tmp_path) -> None:
    path = str(tmp_path / "v2")
    shutil.copytree(V2, path)
    assert load_manifest(path).version == 2 and not _index(path).checksummed
    got = list(ShardStream(path))
    assert [s["id"] for s in got] == list(range(250))
    assert ShardDataset(path)[123]["id"] == 123
    assert verify(path).ok


# ---------------------------------------------------------------- damage
def _read_all(path: str, **kw) -> dict[str, object]:
    """What each reader gives for the whole dataset: a list of samples or the error."""
    out: dict[str, object] = {}
    for name, fn in (("stream", lambda: [plain(s) for s in ShardStream(path, **kw)]),
                     ("iter", lambda: [plain(s) for s in iter_dataset(path)])):
        try:
            out[name] = fn()
        except CorruptShardError as exc:
            out[name] = exc
    return out


def _flip(path: str, pos: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ (1 << bit)]))


@pytest.mark.parametrize("kind", ["raw", "zst"])
def test_seeded_bit_flips_never_give_wrong_data(kind, request) -> None:
    """Random single-bit flips in the block bytes of the shards: every read in every reader
    is correct or a CorruptShardError; verify reports every flip."""
    path = request.getfixturevalue(kind)
    ds = open_dataset(path)
    rng = np.random.default_rng(14)
    starts = ds.manifest.shard_starts()
    detected = 0
    for _ in range(25):
        k = int(rng.integers(len(ds.manifest.shards)))
        info = ds.manifest.shards[k]
        idx = _index(path, k)
        b = int(rng.integers(idx.num_blocks))
        pos = int(idx.block_offset[b]) + int(rng.integers(int(idx.block_size[b])))
        bit = int(rng.integers(8))
        shard = ds.shard_path(info)
        _flip(shard, pos, bit)
        try:
            for name, got in _read_all(path).items():
                if isinstance(got, CorruptShardError):
                    assert f"block {b}" in str(got) and info.name in str(got), name
                    detected += 1
                else:
                    assert got == EXPECTED, name
            warn = [plain(s) for s in ShardStream(path, on_error="warn")]
            assert all(s == EXPECTED[s["id"]] for s in warn)
            rd = ShardDataset(path)
            first, stop = idx.block_samples(b)
            for i in range(starts[k] + first, starts[k] + stop):
                try:
                    assert plain(rd[i]) == EXPECTED[i]
                except CorruptShardError as exc:
                    assert f"block {b}" in str(exc)
                    detected += 1
            assert not verify(path).ok
        finally:
            _flip(shard, pos, bit)
    assert detected >= 25  # every flip was caught by stream and iter at least
    assert verify(path).ok


def _damage_string(path: str) -> tuple[int, int]:
    """Change one letter inside a str value of shard 0, block 1 (still valid msgpack)."""
    ds = open_dataset(path)
    idx = _index(path)
    first, _ = idx.block_samples(1)
    shard = ds.shard_path(ds.manifest.shards[0])
    data = open(shard, "rb").read()
    pos = data.index(f"text-{first:05d}-".encode(), int(idx.block_offset[1]))
    _flip(shard, pos + 1, 0)  # "text" -> "tdxt"
    return first, int(idx.block_offset[1])


def test_raw_damage_is_caught_not_returned(raw) -> None:
    first, off = _damage_string(raw)
    name = open_dataset(raw).manifest.shards[0].name
    pattern = rf"{name}: block 1 at byte offset {off} \(its first sample: .*{first}.*checksum"
    with pytest.raises(CorruptShardError, match=pattern):
        list(ShardStream(raw))
    with pytest.raises(CorruptShardError, match=rf"block 1 at byte offset {off}.*{first}"):
        ShardDataset(raw)[first]
    with pytest.raises(CorruptShardError, match=pattern):
        list(iter_dataset(raw))
    idx = _index(raw)
    with open(os.path.join(raw, name), "rb") as f:
        with pytest.raises(CorruptShardError, match="block 1 at byte offset"):
            read_block(f, idx, 1, where=name)
        read_block(f, idx, 0, where=name)  # the other blocks are fine
    got = [s["id"] for s in ShardStream(raw, on_error="warn")]
    assert first not in got and set(range(first)) <= set(got)


def test_opt_out_skips_the_check(raw, monkeypatch) -> None:
    """With the check off the same damage comes back as a wrong sample: what it costs."""
    first, _ = _damage_string(raw)
    assert ShardDataset(raw, verify_blocks=False)[first]["s"].startswith("tdxt")
    assert [s["s"][:4] for s in ShardStream(raw, verify_blocks=False)][first] == "tdxt"
    with pytest.raises(CorruptShardError, match="checksum"):
        list(ShardStream(raw, verify_blocks=True))
    monkeypatch.setenv("SHARDSTREAM_VERIFY_BLOCKS", "0")
    assert [s["s"][:4] for s in ShardStream(raw)][first] == "tdxt"
    assert ShardDataset(raw)[first]["s"].startswith("tdxt")
    monkeypatch.setenv("SHARDSTREAM_VERIFY_BLOCKS", "1")
    with pytest.raises(CorruptShardError, match="checksum"):
        ShardDataset(raw)[first]


def test_random_access_hashes_each_block_once(raw, zst, monkeypatch) -> None:
    calls = []
    real = format_index.xxhash.xxh3_64_intdigest
    monkeypatch.setattr(format_index.xxhash, "xxh3_64_intdigest",
                        lambda data: calls.append(len(data)) or real(data))
    for path in (raw, zst):
        calls.clear()
        rd = ShardDataset(path)
        order = np.random.default_rng(0).permutation(N).tolist()
        assert [plain(rd[i]) for i in order * 2] == [EXPECTED[i] for i in order * 2]
        blocks = sum(_index(path, k).num_blocks for k in range(len(rd.dataset.manifest.shards)))
        assert len(calls) == blocks
