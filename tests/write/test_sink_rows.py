"""ShardSink.write_rows (a batch of samples back to back, blocks and shards cut with
numpy) writes the very bytes that write_encoded writes one sample at a time."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardstream.format.encode import encode_sample
from shardstream.write.arrow_encode import EncodedRows
from shardstream.write.sink import ShardSink


def _samples(sizes: list[int]) -> list[bytes]:
    # real encoded samples of these payload sizes (so the bytes are well formed)
    return [encode_sample({"b": bytes([i % 251]) * s}, key=i) for i, s in enumerate(sizes)]


def _raw(sizes: list[int]) -> list[bytes]:
    # the sink does not parse what it stores: exact sizes hit every boundary case
    return [bytes([i % 251]) * s for i, s in enumerate(sizes)]


def _files(d: str) -> dict[str, bytes]:
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def _rows(samples: list[bytes]) -> EncodedRows:
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in samples])]).astype(np.int64)
    return EncodedRows(b"".join(samples), offsets, {})


def _write(d: str, samples: list[bytes], cuts: list[int] | None, **kw) -> list:
    os.makedirs(d)
    sink = ShardSink(d, fsync=False, **kw)
    if cuts is None:
        for s in samples:
            sink.write_encoded(s)
    else:
        bounds = [0, *cuts, len(samples)]
        for a, b in zip(bounds, bounds[1:]):
            if a < b:
                sink.write_rows(_rows(samples[a:b]))
    return sink.finish()


_SIZE = st.one_of(st.integers(1, 3000), st.sampled_from([1, 255, 256, 511, 512, 513, 1024]))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(_SIZE, min_size=1, max_size=120), encoded=st.booleans(),
       block_bytes=st.sampled_from([1, 64, 512, 700, 1024, 1536, 4096, 20000]),
       max_samples=st.one_of(st.none(), st.integers(1, 40)),
       max_bytes=st.sampled_from([4096, 4608, 5120, 6000, 9000, 65536, 1 << 20]),
       cuts=st.lists(st.integers(0, 120), max_size=6))
def test_write_rows_cuts_where_write_encoded_cuts(tmp_path_factory, sizes, encoded, block_bytes,
                                                    max_samples, max_bytes, cuts):
    samples = _samples(sizes) if encoded else _raw(sizes)
    cuts = sorted({c for c in cuts if c <= len(samples)})
    base = tmp_path_factory.mktemp("sink")
    kw = dict(block_bytes=block_bytes, max_samples=max_samples, max_bytes=max_bytes)
    one = _write(str(base / "one"), samples, None, **kw)
    rows = _write(str(base / "rows"), samples, cuts, **kw)
    assert one == rows
    assert _files(str(base / "one")) == _files(str(base / "rows"))


def test_write_rows_mixes_with_single_samples(tmp_path):
    """A block holds runs of a batch and samples written one by one, in order."""
    samples = _samples([50 * (i % 7) for i in range(60)])
    kw = dict(block_bytes=600, max_bytes=8192, fsync=False)
    for name in ("one", "mixed"):
        os.makedirs(tmp_path / name)
    ref = ShardSink(str(tmp_path / "one"), **kw)
    for s in samples:
        ref.write_encoded(s)
    mixed = ShardSink(str(tmp_path / "mixed"), **kw)
    for lo in range(0, 60, 10):
        mixed.write_rows(_rows(samples[lo:lo + 7]))
        for s in samples[lo + 7:lo + 10]:
            mixed.write_encoded(s)
    assert ref.finish() == mixed.finish()
    assert _files(str(tmp_path / "one")) == _files(str(tmp_path / "mixed"))


def test_write_rows_merges_the_schema_and_compressed_sinks_take_rows(tmp_path):
    samples = _samples([10, 20, 30])
    rows = EncodedRows(b"".join(samples), np.cumsum([0, *map(len, samples)]),
                       {"b": {"count": 3, "types": ["bytes"]}})
    sink = ShardSink(str(tmp_path), fsync=False, compression="zstd")
    sink.write_rows(rows)
    infos = sink.finish()
    assert sum(i.num_samples for i in infos) == 3
    assert sink.schema.to_dict()["b"]["count"] == 3
    assert rows.samples == samples


@pytest.mark.parametrize("n", [1, 5])
def test_encoded_rows_len_and_samples(n):
    samples = _samples(list(range(n)))
    rows = _rows(samples)
    assert len(rows) == n and rows.samples == samples


def test_a_failing_disk_is_named_and_short_writes_complete(tmp_path, monkeypatch):
    import errno
    import hashlib

    from shardstream.errors import StorageError
    from shardstream.write import shardfile

    def short(fd, bufs):  # writes (and says it wrote) half of the first buffer
        return os.write(fd, memoryview(bufs[0])[:max(1, len(bufs[0]) // 2)])

    monkeypatch.setattr(shardfile.os, "writev", short)
    f = shardfile.ShardFile(str(tmp_path / "short.tar"), fsync=True)
    pieces = [bytes([i]) * (1000 + i) for i in range(50)]
    for p in pieces:
        f.write(memoryview(p))
    assert f.close() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert (tmp_path / "short.tar").read_bytes() == b"".join(pieces)

    def full(fd, bufs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shardfile.os, "writev", full)
    sink = ShardSink(str(tmp_path / "out"), fsync=False, max_bytes=1 << 20)
    os.makedirs(tmp_path / "out")
    with pytest.raises(StorageError, match=r"part-000000\.tar: No space left"):
        for s in _raw([4000] * 2000):
            sink.write_encoded(s)
        sink.finish()
    sink.close_files()
