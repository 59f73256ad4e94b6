"""ShardWriter / write_shards: format on disk, rolling, atomicity, overwrite/append."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

import shardstream
from shardstream import (DatasetExistsError, EncodeError, ShardWriter, load_manifest, verify,
                         write_shards)
from shardstream.format.index import ShardIndex
from shardstream.read.dataset import iter_dataset


def rows(n: int, start: int = 0) -> list[dict]:
    rng = np.random.default_rng(start)
    return [{"id": i, "tokens": rng.integers(0, 1000, int(rng.integers(1, 300)), dtype=np.int32),
             "text": "w" * (i % 37), "score": i / 7, "meta": {"odd": bool(i % 2)}}
            for i in range(start, start + n)]


def ids(path) -> list[int]:
    return [s["id"] for s in iter_dataset(path)]


def test_round_trip_in_order_with_arrays_and_nested_dicts(tmp_path):
    data = rows(500)
    with ShardWriter(tmp_path / "ds", max_samples=120, block_bytes=4096) as w:
        for s in data:
            w.write(s)
    out = list(iter_dataset(tmp_path / "ds"))
    assert len(out) == 500 and w.manifest.num_samples == 500
    for a, b in zip(data, out):
        assert a["id"] == b["id"] and a["meta"] == b["meta"] and a["text"] == b["text"]
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert [s.num_samples for s in w.manifest.shards] == [120, 120, 120, 120, 20]
    assert verify(str(tmp_path / "ds")).ok


def test_shards_roll_by_real_bytes_on_disk(tmp_path):
    limit = 100_000
    with ShardWriter(tmp_path, max_bytes=limit, block_bytes=8192) as w:
        for s in rows(2000):
            w.write(s)
    m = w.manifest
    assert len(m.shards) > 5
    for info in m.shards:
        size = os.path.getsize(tmp_path / info.name)
        assert size == info.bytes <= limit
        assert size % 512 == 0
    assert sum(s.num_samples for s in m.shards) == 2000


def test_large_samples_stand_alone_small_ones_share_blocks(tmp_path):
    big = np.zeros(50_000, np.uint8)
    with ShardWriter(tmp_path, block_bytes=10_000) as w:
        for i in range(30):
            w.write({"i": i, "x": big if i == 10 else np.zeros(10, np.uint8)})
    info = w.manifest.shards[0]
    index = ShardIndex.from_bytes((tmp_path / info.index).read_bytes())
    counts = np.diff(np.append(index.block_first, index.num_samples))
    assert 1 in counts.tolist()  # the big one
    assert counts.max() > 5  # small ones packed
    big_block = int(np.argmax(index.block_size))
    assert index.block_samples(big_block) == (10, 11)


def test_shard_is_a_plain_tar_that_tar_and_webdataset_read(tmp_path):
    import webdataset as wds

    with ShardWriter(tmp_path, max_samples=50, block_bytes=2048) as w:
        for s in rows(120):
            w.write(s)
    names = [s.name for s in w.manifest.shards]
    listing = subprocess.run(["tar", "tf", str(tmp_path / names[0])], capture_output=True,
                             text=True, check=True).stdout.split()
    assert listing and all(n.endswith(".ssb") for n in listing)
    with tarfile.open(tmp_path / names[0]) as t:
        assert [m.name for m in t.getmembers()] == listing
    url = str(tmp_path / "shard-{000000..000002}.tar")
    pipe = wds.WebDataset(url, shardshuffle=False, empty_check=False).compose(
        shardstream.unpack_blocks)
    assert [s["id"] for s in pipe] == list(range(120))


def test_identical_input_gives_identical_shards(tmp_path):
    for d in ("a", "b"):
        with ShardWriter(tmp_path / d, max_samples=100) as w:
            for s in rows(300):
                w.write(s)
    a, b = load_manifest(str(tmp_path / "a")), load_manifest(str(tmp_path / "b"))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_nothing_is_published_before_close(tmp_path):
    w = ShardWriter(tmp_path / "ds", max_samples=10)
    for s in rows(55):
        w.write(s)
    visible = [e for e in os.listdir(tmp_path / "ds") if not e.startswith(".")]
    assert visible == []
    w.close()
    assert sorted(os.listdir(tmp_path / "ds"))[-1] == "shard-000005.tar.idx"
    assert "manifest.json" in os.listdir(tmp_path / "ds")
    assert not [e for e in os.listdir(tmp_path / "ds") if e.startswith(".staging")]


def test_encode_error_names_field_and_publishes_nothing(tmp_path):
    data = rows(30)
    data[17]["meta"]["bad"] = {1, 2}
    with pytest.raises(EncodeError, match=r"sample 17, field 'meta.bad'"):
        with ShardWriter(tmp_path / "ds", max_samples=5) as w:
            for s in data:
                w.write(s)
    assert not os.path.exists(tmp_path / "ds")  # the writer made it, so it removed it again


def test_key_field_errors_name_the_sample(tmp_path):
    with pytest.raises(EncodeError, match="sample 1: key field 'uid' is missing"):
        with ShardWriter(tmp_path / "ds", key_field="uid") as w:
            w.write({"uid": "a"})
            w.write({"x": 1})
    with pytest.raises(EncodeError, match="must be str or int"):
        with ShardWriter(tmp_path / "ds2") as w:
            w.write({"__key__": 1.5})


def test_existing_dataset_is_refused_overwritten_or_appended(tmp_path):
    out = tmp_path / "ds"
    write_shards(rows(100), out, max_samples=40)
    with pytest.raises(DatasetExistsError, match="--overwrite"):
        ShardWriter(out)
    write_shards(rows(30, start=1000), out, max_samples=40, append=True)
    m = load_manifest(str(out))
    assert [s.name for s in m.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert ids(out) == list(range(100)) + list(range(1000, 1030))
    assert m.schema["id"]["count"] == 130
    write_shards(rows(10, start=5000), out, overwrite=True)
    assert ids(out) == list(range(5000, 5010))
    # new names skip the old dataset's (0-3), so the manifest switch is one atomic step
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-000004.tar",
                                       "shard-000004.tar.idx"]


def test_failed_overwrite_and_append_keep_the_old_dataset(tmp_path):
    out = tmp_path / "ds"
    write_shards(rows(50), out, max_samples=20)
    before = sorted(os.listdir(out))
    bad = rows(10) + [{"x": object()}]
    for mode in ({"overwrite": True}, {"append": True}):
        with pytest.raises(EncodeError):
            write_shards(bad, out, max_samples=3, **mode)
        assert sorted(os.listdir(out)) == before
        assert ids(out) == list(range(50))


def test_empty_dataset_is_valid(tmp_path):
    m = write_shards([], tmp_path / "ds")
    assert m.num_samples == 0 and m.shards == []
    assert list(iter_dataset(tmp_path / "ds")) == []


def test_schema_records_types_dtypes_and_varying_dims(tmp_path):
    data = rows(20) + [{"id": 99, "tokens": None, "text": b"bytes"}]
    m = write_shards(data, tmp_path / "ds")
    assert m.schema["tokens"]["types"] == ["ndarray", "null"]
    assert m.schema["tokens"]["dtypes"] == ["int32"] and m.schema["tokens"]["shape"] == [None]
    assert m.schema["text"]["types"] == ["bytes", "str"]
    assert m.schema["meta.odd"] == {"count": 20, "types": ["bool"]}


@pytest.mark.parametrize("as_iterator", [False, True])
def test_parallel_writing_keeps_input_order_and_equals_serial(tmp_path, as_iterator):
    data = rows(3000)
    serial = write_shards(data, tmp_path / "one", max_samples=256)
    source = iter(data) if as_iterator else data
    par = write_shards(source, tmp_path / "two", workers=2, max_samples=256, chunk_size=100)
    assert ids(tmp_path / "two") == list(range(3000))
    assert par.num_samples == serial.num_samples == 3000
    assert par.schema == serial.schema
    assert verify(str(tmp_path / "two")).ok
    assert not [e for e in os.listdir(tmp_path / "two") if e.startswith(".")]


def test_parallel_worker_error_publishes_nothing(tmp_path):
    data = rows(2000)
    data[1500]["bad"] = {1}
    with pytest.raises(EncodeError, match="field 'bad'"):
        write_shards(data, tmp_path / "ds", workers=2, max_samples=100)
    assert not os.path.exists(tmp_path / "ds")  # the writer made it, so it removed it again


def test_output_path_that_is_a_file_is_a_storage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(shardstream.StorageError, match="file"):
        ShardWriter(tmp_path / "file" / "ds")


KILL_SCRIPT = textwrap.dedent("""
    import signal, sys, numpy as np
    from shardstream import ShardWriter
    # a Ctrl-C, even when the test runner was started with SIGINT ignored (nohup, CI)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with ShardWriter(sys.argv[1], max_samples=50, fsync=False, overwrite=True) as w:
        for i in range(10**9):
            w.write({"id": i, "x": np.zeros(100)})
            if i == 400:
                print("ready", flush=True)
""")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_killed_writer_leaves_nothing_listed_and_rerun_succeeds(tmp_path, sig):
    import signal

    out = tmp_path / "ds"
    write_shards(rows(20), out)  # an old dataset that a killed overwrite must not corrupt
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=30)
    m = load_manifest(str(out))  # old manifest still consistent with its shards
    assert ids(out) == list(range(20)) and verify(str(out)).ok
    staging = [e for e in os.listdir(out) if e.startswith(".staging")]
    assert bool(staging) == (sig == "SIGKILL")  # Ctrl-C cleans up, SIGKILL cannot
    write_shards(rows(5), out, overwrite=True)
    assert ids(out) == list(range(5)) and m.num_samples == 20
    assert not [e for e in os.listdir(out) if e.startswith(".")]


def test_schema_fast_path_counts_and_still_rejects_bad_values(tmp_path):
    data = [{"a": i, "x": np.zeros(i % 3, np.float32)} for i in range(10)]
    data += [{"a": "s", "x": np.zeros((2, 2), np.int8)}, {"a": 1, "x": np.zeros(4, np.float32)}]
    m = write_shards(data, tmp_path / "ds")
    assert m.schema["a"] == {"count": 12, "types": ["int", "str"]}
    assert m.schema["x"]["count"] == 12 and m.schema["x"]["dtypes"] == ["float32", "int8"]
    assert m.schema["x"]["shape"] is None  # ndim varies
    with pytest.raises(EncodeError, match="field 'x'"):
        write_shards(data + [{"a": 2, "x": np.array(["str"])}], tmp_path / "ds2")
    with pytest.raises(EncodeError, match="field 'a'"):
        write_shards(data + [{"a": 2**70, "x": np.zeros(1)}], tmp_path / "ds3")
