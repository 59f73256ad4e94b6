"""Compressed shards: per-block zstd with random access, convert, corruption handling."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

import shardstream.compression as compression
from shardstream.cli import main
from shardstream.compression import Compression, parse_compression
from shardstream.convert import convert
from shardstream.errors import CorruptShardError, ManifestError
from shardstream.index import ShardIndex
from shardstream.inspect import cat_lines
from shardstream.manifest import load_manifest
from shardstream.parallel import write_shards
from shardstream.random_access import ShardDataset
from shardstream.shard import iter_dataset, open_dataset
from shardstream.stream import ShardStream
from shardstream.verify import verify
from shardstream.wdsindex import build_index

N = 400


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k]


@pytest.fixture
def pair(make_dataset) -> tuple[str, str]:
    """The same samples uncompressed and zstd-compressed (several shards and blocks)."""
    return make_dataset(N, "raw"), make_dataset(N, "zst", compression="zstd", level=5)


def test_format_records_compression(pair) -> None:
    raw, zst = pair
    doc = json.load(open(os.path.join(zst, "manifest.json")))
    assert doc["version"] == 2 and doc["compression"] == {"codec": "zstd", "level": 5,
                                                          "checksum": True}
    doc_raw = json.load(open(os.path.join(raw, "manifest.json")))
    assert doc_raw["version"] == 1 and "compression" not in doc_raw  # v1 stays as it was
    m = load_manifest(zst)
    assert m.compression == Compression("zstd", 5) and len(m.shards) > 2
    names = tarfile.open(os.path.join(zst, m.shards[0].name)).getnames()
    assert names[0] == "000000.ssb.zst" and len(names) > 1
    if shutil.which("tar"):
        out = subprocess.run(["tar", "tf", os.path.join(zst, m.shards[0].name)],
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == names
    with open(os.path.join(zst, m.shards[0].index), "rb") as f:
        idx = ShardIndex.from_bytes(f.read())
    assert idx.compression == "zstd" and int(idx.block_raw_size.sum()) > int(idx.block_size.sum())


def test_round_trip_every_reader(pair) -> None:
    raw, zst = pair
    expected = list(iter_dataset(raw))
    got = list(iter_dataset(zst))
    assert len(got) == N
    for a, b in zip(expected, got):
        _same(a, b)
    assert [s["id"] for s in ShardStream(zst)] == list(range(N))
    shuffled = [s["id"] for s in ShardStream(zst, shuffle=True, seed=3)]
    assert shuffled == [s["id"] for s in ShardStream(raw, shuffle=True, seed=3)]
    ds = ShardDataset(zst)
    for i in (0, 1, 96, 97, N - 1, 250, 3):
        _same(ds[i], expected[i])
    assert list(cat_lines(zst, limit=5)) == list(cat_lines(raw, limit=5))
    assert list(cat_lines(zst, index=-1)) == list(cat_lines(raw, index=-1))
    report = verify(zst)
    assert report.ok and report.samples == N


def test_large_standalone_samples(make_dataset) -> None:
    rng = np.random.default_rng(0)
    big = [rng.integers(0, 100, 100_000).astype(np.int64) for _ in range(4)]

    def make(i: int) -> dict:
        return {"id": i, "x": big[i % 4] if i % 3 == 0 else np.arange(i % 7)}

    path = make_dataset(30, "big", block_bytes=4096, max_samples=None, make=make,
                        compression="zstd", max_bytes=1 << 20)
    ds = ShardDataset(path)
    for i in (0, 3, 29, 1, 27):
        _same(ds[i], make(i))
    assert [s["id"] for s in ShardStream(path, shuffle=True)] != list(range(30))
    assert sorted(s["id"] for s in ShardStream(path, shuffle=True)) == list(range(30))
    assert verify(path).ok


def test_random_access_decompresses_one_block(make_dataset, monkeypatch) -> None:
    path = make_dataset(N, "one", compression="zstd", max_samples=None, block_bytes=2048)
    calls = []
    real = compression.decompress_block

    def counting(*args, **kw):
        calls.append(kw["where"])
        return real(*args, **kw)

    monkeypatch.setattr(compression, "decompress_block", counting)
    ds = ShardDataset(path)
    ds[200]
    assert len(calls) == 1
    ds[201], ds[199]  # same block (cached) or a neighbour: never more than one each
    assert len(calls) <= 2
    for i in (5, 300, 100, 399, 0):
        before = len(calls)
        ds[i]
        assert len(calls) - before <= 1


def test_convert_both_ways(pair, tmp_path) -> None:
    raw, zst = pair
    out = str(tmp_path / "conv")
    m = convert(raw, out, compression="zstd:1")
    assert m.compression == Compression("zstd", 1) and verify(out).ok
    assert m.schema == load_manifest(raw).schema
    assert [s["id"] for s in iter_dataset(out)] == list(range(N))
    back = str(tmp_path / "back")
    assert main(["convert", out, back, "--compress", "none", "-q", "--max-size", "256MiB"]) == 0
    mb = load_manifest(back)
    assert mb.compression is None and verify(back).ok
    # the same packing on uncompressed sizes: the original shards, byte for byte
    direct = str(tmp_path / "direct")
    convert(raw, direct, compression=None)
    assert [s.sha256 for s in mb.shards] == [s.sha256 for s in load_manifest(direct).shards]
    with pytest.raises(ValueError, match="another directory"):
        convert(zst, zst, compression=None)


def test_convert_keeps_key_field(tmp_path) -> None:
    src = str(tmp_path / "keyed")
    with ShardWriterKeyed(src) as w:
        for i in range(50):
            w.write({"name": f"k{49 - i}", "v": i})
    out = str(tmp_path / "keyed-z")
    convert(src, out, compression="zstd")
    ds = ShardDataset(out, with_key=True)
    assert [ds[i]["__key__"] for i in range(50)] == [f"k{49 - i}" for i in range(50)]


def ShardWriterKeyed(path: str):
    from shardstream.writer import ShardWriter
    return ShardWriter(path, key_field="name", block_bytes=256, fsync=False)


def test_cli_write_compressed(tmp_path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "t": "word " * (i % 20)}) + "\n"
                           for i in range(300)))
    out = str(tmp_path / "cli")
    assert main(["write", str(src), "-o", out, "--compress", "zstd:9", "-q",
                 "--block-size", "2KiB"]) == 0
    assert load_manifest(out).compression == Compression("zstd", 9)
    assert [s["id"] for s in iter_dataset(out)] == list(range(300))
    assert main(["verify", out, "-q"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["write", str(src), "-o", out + "2", "--compress", "lz5"])
    assert exc.value.code == 2


def test_parse_compression() -> None:
    assert parse_compression("none") is None and parse_compression(None) is None
    assert parse_compression("zstd") == Compression("zstd", 3)
    assert parse_compression("ZSTD:19") == Compression("zstd", 19)
    assert parse_compression("zstd", level=7) == Compression("zstd", 7)
    for bad in ("gzip", "zstd:99", "zstd:x", "none:3"):
        with pytest.raises(ValueError):
            parse_compression(bad)


# ---------------------------------------------------------------- damage
def _refresh_checksums(path: str, shard: int) -> None:
    """Re-hash shard ``shard`` into its index and the manifest: only decoding can tell."""
    ds = open_dataset(path)
    info = ds.manifest.shards[shard]
    data = open(ds.shard_path(info), "rb").read()
    with open(ds.index_path(info), "rb") as f:
        idx = ShardIndex.from_bytes(f.read())
    sha = hashlib.sha256(data).hexdigest()
    idx_bytes = dataclasses.replace(idx, shard_sha256=sha).to_bytes()
    open(ds.index_path(info), "wb").write(idx_bytes)
    doc = json.load(open(os.path.join(path, "manifest.json")))
    doc["shards"][shard].update(sha256=sha, index_sha256=hashlib.sha256(idx_bytes).hexdigest(),
                                index_bytes=len(idx_bytes))
    json.dump(doc, open(os.path.join(path, "manifest.json"), "w"))


def _damage(path: str, block: int, how: str) -> tuple[str, int]:
    ds = open_dataset(path)
    info = ds.manifest.shards[1]
    with open(ds.index_path(info), "rb") as f:
        idx = ShardIndex.from_bytes(f.read())
    off, size = int(idx.block_offset[block]), int(idx.block_size[block])
    with open(ds.shard_path(info), "r+b") as f:
        if how == "flip":  # inside the compressed payload: the checksum must catch it
            f.seek(off + size // 2)
            byte = f.read(1)
            f.seek(off + size // 2)
            f.write(bytes([byte[0] ^ 0x5A]))
        else:  # zero the frame's tail, e.g. a lost write
            f.seek(off + size - 8)
            f.write(b"\0" * 8)
    _refresh_checksums(path, 1)
    first = ds.manifest.shard_starts()[1] + int(idx.block_first[block])
    return info.name, first


@pytest.mark.parametrize("how", ["flip", "tail"])
def test_corrupt_block_is_named(make_dataset, how) -> None:
    path = make_dataset(N, "bad", compression="zstd")
    name, first = _damage(path, 2, how)
    pattern = rf"{name}.*block 2"
    with pytest.raises(CorruptShardError, match=pattern):
        list(iter_dataset(path))
    with pytest.raises(CorruptShardError, match=pattern):
        list(ShardStream(path))
    with pytest.raises(CorruptShardError, match=rf"{pattern}.*sample {first:09d}"):
        ShardDataset(path)[first]
    report = verify(path)
    assert not report.ok and "block 2" in report.problems[0].reason
    assert report.problems[0].key == f"{first:09d}"
    ShardDataset(path)[first - 1]  # the blocks around it still read


def test_wrong_declared_size_and_truncation(make_dataset) -> None:
    path = make_dataset(N, "trunc", compression="zstd")
    ds = open_dataset(path)
    info = ds.manifest.shards[0]
    with open(ds.index_path(info), "rb") as f:
        idx = ShardIndex.from_bytes(f.read())
    raw = idx.block_raw_size.copy()
    raw[1] += 1  # the index and the frame disagree
    fake = dataclasses.replace(idx, block_raw_size=raw)
    with pytest.raises(CorruptShardError, match="block 1.*declares"):
        from shardstream.shard import read_block
        with open(ds.shard_path(info), "rb") as f:
            read_block(f, fake, 1, where=info.name)
    p = ds.shard_path(info)
    os.truncate(p, int(idx.block_offset[-1]) + 10)
    with pytest.raises(CorruptShardError, match="truncated"):
        list(ShardStream(path))
    with pytest.raises(CorruptShardError, match="truncated"):
        ShardDataset(path)[int(idx.block_first[-1])]
    assert not verify(path).ok


# ---------------------------------------------------------------- compatibility
def test_index_rebuild_is_identical(pair) -> None:
    _, zst = pair
    m = load_manifest(zst)
    before = [open(os.path.join(zst, s.index), "rb").read() for s in m.shards]
    for s in m.shards:
        os.unlink(os.path.join(zst, s.index))
    rebuilt = build_index([zst])
    assert [open(os.path.join(zst, s.index), "rb").read() for s in m.shards] == before
    assert rebuilt.compression == m.compression and verify(zst).ok


def test_append_needs_same_compression(make_dataset, pair) -> None:
    from shardstream.writer import ShardWriter
    raw, zst = pair
    with pytest.raises(ManifestError, match="zstd:5"):
        ShardWriter(zst, append=True)
    with pytest.raises(ManifestError, match="none"):
        ShardWriter(raw, append=True, compression="zstd")
    with ShardWriter(zst, append=True, compression="zstd", level=5, fsync=False) as w:
        w.write({"id": N})
    assert [s["id"] for s in iter_dataset(zst)][-2:] == [N - 1, N]


def test_parallel_writers_compress(tmp_path) -> None:
    samples = [{"id": i, "x": np.full(50, i, np.int32)} for i in range(600)]
    out = str(tmp_path / "par")
    m = write_shards(samples, out, workers=2, compression="zstd", max_samples=150,
                     block_bytes=1024, fsync=False)
    assert m.compression == Compression("zstd", 3) and len(m.shards) >= 4
    assert [s["id"] for s in ShardStream(out)] == list(range(600))
    assert verify(out).ok


def test_uncompressed_datasets_unchanged(make_dataset) -> None:
    path = make_dataset(120, "plain")
    ds = open_dataset(path)
    with open(ds.index_path(ds.manifest.shards[0]), "rb") as f:
        idx = ShardIndex.from_bytes(f.read())
    assert idx.compression is None and idx.block_raw_size is None
    names = tarfile.open(ds.shard_path(ds.manifest.shards[0])).getnames()
    assert names[0] == "000000.ssb"
    assert [s["id"] for s in ShardStream(path)] == list(range(120))
