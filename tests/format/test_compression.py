"""Compressed shards (format v3: zstd frames of samples with a trained dictionary):
random access, convert, corruption handling, and reading format-v2 datasets."""

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

from shardstream.cli.commands import main
from shardstream.cli.inspect import cat_lines
from shardstream.errors import CorruptShardError, ManifestError
from shardstream.format.codec import PACKED_EXT, decode_sample
from shardstream.format.compression import (DEFAULT_DICT_BYTES, DEFAULT_FRAME_BYTES, Compression,
                                            parse_compression)
from shardstream.format.encode import encode_sample
from shardstream.format.frames import FrameDecoder
from shardstream.format.index import ShardIndex
from shardstream.pytorch.random_access import ShardDataset
from shardstream.pytorch.stream import ShardStream
from shardstream.read.dataset import iter_dataset, open_dataset
from shardstream.read.verify import verify
from shardstream.storage.io import load_manifest
from shardstream.write.convert import convert
from shardstream.write.parallel import write_shards
from shardstream.write.reindex import build_index

N = 400
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = os.path.join(TESTS, "data", "v2-zstd")  # written by shardstream 0.1.0


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
    assert doc["version"] == 4 and doc["compression"] == {
        "codec": "zstd", "level": 5, "checksum": True, "frame_bytes": DEFAULT_FRAME_BYTES,
        "dict_bytes": DEFAULT_DICT_BYTES, "packed_ints": True}
    assert doc["codec"] == {"name": "msgpack", "ndarray_ext": 1, "packed_ext": PACKED_EXT}
    doc_raw = json.load(open(os.path.join(raw, "manifest.json")))
    assert doc_raw["version"] == 4 and "compression" not in doc_raw  # v4: block checksums
    assert doc_raw["codec"] == {"name": "msgpack", "ndarray_ext": 1}
    m = load_manifest(zst)
    assert m.compression == Compression("zstd", 5) and len(m.shards) > 2
    names = tarfile.open(os.path.join(zst, m.shards[0].name)).getnames()
    assert names[:2] == ["zstd.dict", "000000.ssb.zst"] and len(names) > 2
    if shutil.which("tar"):
        out = subprocess.run(["tar", "tf", os.path.join(zst, m.shards[0].name)],
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == names
    with open(os.path.join(zst, m.shards[0].index), "rb") as f:
        idx = ShardIndex.from_bytes(f.read())
    assert idx.compression == "zstd" and idx.framed
    assert int(idx.block_raw_size.sum()) > int(idx.block_size.sum())
    t = idx.frame_table()
    assert len(t.first) > idx.num_blocks  # several frames per block
    # the dictionary member in the shard is the one in the index (too small to train: empty)
    member = tarfile.open(os.path.join(zst, m.shards[0].name)).extractfile("zstd.dict").read()
    assert member == idx.dictionary


def test_frames_and_dictionary(make_dataset, tmp_path) -> None:
    """Enough data trains a dictionary; frames hold about frame_bytes; each block member
    is plain zstd (`zstd -D zstd.dict -d` reads it)."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]

    def make(i: int) -> dict:
        return {"id": i, "ids": rng.integers(0, 30_000, 4 + i % 150).astype(np.int64),
                "text": " ".join(words[j] for j in rng.integers(0, 300, 5 + i % 30))}

    path = make_dataset(12000, "dict", make=make, max_samples=None, compression="zstd",
                        block_bytes=65536)
    m = load_manifest(path)
    idx = ShardIndex.from_bytes(open(os.path.join(path, m.shards[0].index), "rb").read())
    assert 1000 < len(idx.dictionary) <= DEFAULT_DICT_BYTES
    t = idx.frame_table()
    sizes = t.raw_end - t.raw_start
    counts = np.diff(np.append(t.first, idx.num_samples))
    small = sizes[counts > 1]  # grouped frames: the group stops once it reaches frame_bytes
    assert len(small) and small.max() < DEFAULT_FRAME_BYTES + 600  # < frame_bytes + a sample
    assert (sizes[counts == 1] >= DEFAULT_FRAME_BYTES).mean() > 0.9  # (or a block's last)
    rng = np.random.default_rng(0)
    expected = [make(i) for i in range(12000)]
    got = list(iter_dataset(path))
    for a, b in zip(expected, got):
        _same(a, b)
        assert b["ids"].dtype == np.int64  # narrowed inside frames, widened back
    with tarfile.open(os.path.join(path, m.shards[0].name)) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    block, dict_path = tmp_path / "x" / "000000.ssb.zst", tmp_path / "x" / "zstd.dict"
    import io

    import zstandard
    d = zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(dict_path.read_bytes()))
    raw = d.stream_reader(io.BytesIO(block.read_bytes()), read_across_frames=True).read()
    assert len(raw) == int(idx.block_raw_size[0])
    assert decode_sample(raw[:int(idx.sample_offset[1])])["id"] == 0
    if shutil.which("zstd"):  # the command-line tool agrees
        out = subprocess.run(["zstd", "-d", "-c", "-D", str(dict_path), str(block)],
                             capture_output=True, check=True).stdout
        assert out == raw


def test_random_access_decompresses_one_frame(make_dataset, monkeypatch) -> None:
    path = make_dataset(N, "one", compression="zstd", max_samples=None, block_bytes=4096)
    sizes = []
    real = FrameDecoder.frame

    def counting(self, f, data, label=""):
        out = real(self, f, data, label)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(FrameDecoder, "frame", counting)
    ds = ShardDataset(path)
    expected = list(iter_dataset(path))
    sizes.clear()
    for i in (200, 5, 300, 100, 399, 0, 201):
        before = len(sizes)
        _same(ds[i], expected[i])
        assert len(sizes) - before <= 1  # one frame, or none when it is the cached one
    largest = max(len(encode_sample(s, pack=True)) for s in expected)
    assert max(sizes) < DEFAULT_FRAME_BYTES + largest  # a frame, not a 4 KiB block


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
    from shardstream.write.writer import ShardWriter
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


def _damage(path: str, block: int, how: str) -> tuple[str, int, int]:
    """Damage the last frame of ``block`` in shard 1: (shard name, global ordinal of the
    block's first sample, of the damaged frame's first sample)."""
    ds = open_dataset(path)
    info = ds.manifest.shards[1]
    with open(ds.index_path(info), "rb") as f:
        idx = ShardIndex.from_bytes(f.read())
    t = idx.frame_table()
    frame = int(t.block_frame[block + 1]) - 1
    assert frame > int(t.block_frame[block])  # not the block's only frame
    off = int(idx.block_offset[block] + t.rel_start[frame])
    size = int(t.rel_end[frame] - t.rel_start[frame])
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
    start = ds.manifest.shard_starts()[1]
    return info.name, start + int(idx.block_first[block]), start + int(t.first[frame])


@pytest.mark.parametrize("how", ["flip", "tail"])
def test_corrupt_frame_is_named(make_dataset, how) -> None:
    path = make_dataset(N, "bad", compression="zstd")
    name, first, frame_first = _damage(path, 2, how)
    pattern = rf"{name}.*block 2, frame \d+ \(shard-local samples"
    with pytest.raises(CorruptShardError, match=pattern):
        list(iter_dataset(path))
    with pytest.raises(CorruptShardError, match=pattern):
        list(ShardStream(path))
    with pytest.raises(CorruptShardError, match=rf"{pattern}.*requested sample "
                                                rf"{frame_first:09d}"):
        ShardDataset(path)[frame_first]
    report = verify(path)
    assert not report.ok and "block 2" in report.problems[0].reason
    assert report.problems[0].key == f"{first:09d}"
    ds = ShardDataset(path)
    ds[frame_first - 1], ds[first]  # other frames of the same block still read
    # warn mode skips the damaged part and names it, never yields a wrong sample
    got = {s["id"] for s in ShardStream(path, on_error="warn")}
    assert frame_first not in got and set(range(first)) <= got


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
        from shardstream.read.dataset import read_block
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
    from shardstream.write.writer import ShardWriter
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


# ---------------------------------------------------------------- format v2 (0.1.0) datasets
@pytest.fixture
def v2(tmp_path) -> str:
    """A copy of the format-v2 dataset shardstream 0.1.0 wrote (one zstd frame per block)."""
    out = str(tmp_path / "v2")
    shutil.copytree(V2, out)
    return out


def _v2_sample(i: int) -> dict:  # what tests/data/v2-zstd holds
    return {"id": i, "f": i / 4, "s": f"s{i}", "x": np.arange(i % 5 + 1, dtype=np.int32),
            "ids": np.arange(i, i + 40, dtype=np.int64), "meta": {"even": i % 2 == 0}}


def test_v2_datasets_still_read(v2) -> None:
    m = load_manifest(v2)
    assert m.version == 2 and m.compression == Compression("zstd", 3, 0, 0)
    assert not m.compression.framed
    for i, got in enumerate(iter_dataset(v2)):
        _same(got, _v2_sample(i))
    assert sorted(s["id"] for s in ShardStream(v2, shuffle=True)) == list(range(250))
    ds = ShardDataset(v2)
    for i in (0, 249, 97, 123):
        _same(ds[i], _v2_sample(i))
    assert list(cat_lines(v2, index=5))
    assert verify(v2).ok
    before = [open(os.path.join(v2, s.index), "rb").read() for s in m.shards]
    for s in m.shards:
        os.unlink(os.path.join(v2, s.index))
    build_index([v2])  # a v2 index is rebuilt as v2, byte for byte
    assert [open(os.path.join(v2, s.index), "rb").read() for s in m.shards] == before


def test_info_describes_the_compression(v2, pair, capsys) -> None:
    _, zst = pair
    assert main(["info", zst]) == 0
    assert "zstd:5 in 256-byte frames with a 32 KiB dictionary" in capsys.readouterr().out
    assert main(["info", v2]) == 0
    assert "one frame per block (format v2: `shardstream convert" in capsys.readouterr().out


def test_v2_upgrade_by_convert(v2, tmp_path) -> None:
    from shardstream.write.writer import ShardWriter
    with pytest.raises(ManifestError, match="shardstream convert"):
        ShardWriter(v2, append=True, compression="zstd")
    out = str(tmp_path / "v3")
    assert main(["convert", v2, out, "--compress", "zstd", "-q"]) == 0
    m = load_manifest(out)
    assert m.version == 4 and m.compression.framed and verify(out).ok
    for i, got in enumerate(iter_dataset(out)):
        _same(got, _v2_sample(i))
    assert m.schema == load_manifest(v2).schema
    with ShardWriter(out, append=True, compression="zstd", fsync=False) as w:
        w.write(_v2_sample(250))
    assert ShardDataset(out)[250]["id"] == 250


def test_append_with_other_frame_settings_is_refused(pair) -> None:
    from shardstream.write.writer import ShardWriter
    _, zst = pair
    with pytest.raises(ManifestError, match="frame_bytes=4096"):
        ShardWriter(zst, append=True, compression=Compression("zstd", 5, frame_bytes=4096))


def test_small_shards_skip_the_dictionary(make_dataset) -> None:
    """A dictionary is stored in every shard: not when it would be a big part of one."""
    path = make_dataset(3000, "small", compression="zstd", max_samples=None,
                        max_bytes=64 << 10)
    m = load_manifest(path)
    assert len(m.shards) > 1
    for s in m.shards:
        idx = ShardIndex.from_bytes(open(os.path.join(path, s.index), "rb").read())
        assert idx.dictionary == b""
    assert [s["id"] for s in iter_dataset(path)] == list(range(3000))


def test_damaged_frame_table_is_refused(pair) -> None:
    _, zst = pair
    m = load_manifest(zst)
    idx = ShardIndex.from_bytes(open(os.path.join(zst, m.shards[0].index), "rb").read())
    bits = idx.frame_starts.copy()
    bits[0] &= 0x7F  # the first sample no longer starts a frame
    with pytest.raises(CorruptShardError, match="inconsistent"):
        ShardIndex.from_bytes(dataclasses.replace(idx, frame_starts=bits).to_bytes())
    offs = idx.frame_offset.astype(np.int64)
    offs[1] = offs[2]  # two frames at one offset
    with pytest.raises(CorruptShardError, match="inconsistent"):
        ShardIndex.from_bytes(dataclasses.replace(idx, frame_offset=offs).to_bytes())


# ---------------------------------------------------------------- object storage
@pytest.mark.storage
def test_compressed_dataset_on_s3(s3_server, s3_bucket, tmp_path, monkeypatch) -> None:
    """Written to S3 with compression, streamed back with 2 workers and read by random
    access from the node cache: every sample, exact dtypes."""
    import torch

    from shardstream.pytorch.loader import loader
    url = f"{s3_bucket}/zst"
    opts = s3_server.storage_options

    def make(i: int) -> dict:
        return {"id": i, "ids": np.arange(i, i + 64, dtype=np.int64), "t": f"text {i}" * 5}

    from shardstream.write.writer import ShardWriter
    with ShardWriter(url, compression="zstd", fsync=False, block_bytes=2048, max_samples=300,
                     storage_options=opts) as w:
        for i in range(1000):
            w.write(make(i))
    ds = ShardStream(url, batch_size=50, storage_options=opts, cache_dir=str(tmp_path / "c"))
    seen = []
    for batch in loader(ds, num_workers=2):
        assert batch["ids"].dtype == torch.int64
        assert torch.equal(batch["ids"][:, 0], batch["id"])
        seen.extend(batch["id"].tolist())
    assert sorted(seen) == list(range(1000))
    for k, v in s3_server.env.items():  # ShardDataset reads credentials from the environment
        monkeypatch.setenv(k, v)
    local = ShardDataset(url, cache_dir=str(tmp_path / "c2"))
    for i in (0, 999, 456):
        _same(local[i], make(i))
