"""CLI in-process: every input kind, options, exit codes, info and verify."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from shardstream import load_manifest
from shardstream.cli.args import parse_size
from shardstream.cli.commands import main, write_main
from shardstream.read.dataset import iter_dataset

ROWS = [{"id": i, "text": "t" * (i % 50), "ids": list(range(i % 9)), "y": i * 0.5}
        for i in range(2000)]


def ids(path) -> list[int]:
    return [s["id"] for s in iter_dataset(path)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def jsonl(tmp_path) -> str:
    return write_jsonl(tmp_path / "in.jsonl", ROWS)


def test_parse_size():
    assert parse_size("256MB") == 256_000_000
    assert parse_size("64KiB") == 65536
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("1000") == 1000


def test_write_then_info_and_verify(jsonl, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert write_main([jsonl, "-o", out, "--max-samples", "300"]) == 0
    assert ids(out) == list(range(2000))
    err = capsys.readouterr().err
    assert "wrote 2,000 samples" in err and "7 shards" in err
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "samples      2,000" in text and "ids" in text
    assert main(["info", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 2000
    assert main(["verify", out]) == 0
    assert "OK: 7 shards, 2,000 samples" in capsys.readouterr().out


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_give_the_same_dataset(jsonl, tmp_path, workers):
    out = str(tmp_path / f"w{workers}")
    assert main(["write", jsonl, jsonl, "-o", out, "--workers", str(workers),
                 "--max-size", "20KB", "-q"]) == 0
    assert ids(out) == list(range(2000)) * 2
    m = load_manifest(out)
    assert all(s.bytes <= 20_000 for s in m.shards)


def test_every_input_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ROWS[:300]
    paths = [write_jsonl(tmp_path / "a.jsonl", rows)]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    paths.append(str(tmp_path / "b.jsonl.gz"))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    paths.append(str(tmp_path / "c.json"))
    (tmp_path / "d.msgpack").write_bytes(b"".join(msgpack.packb(r) for r in rows))
    paths.append(str(tmp_path / "d.msgpack"))
    table = pa.table({"id": [r["id"] for r in rows],
                      "ids": pa.array([r["ids"] for r in rows], pa.list_(pa.int32()))})
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=64)
    paths.append(str(tmp_path / "e.parquet"))
    (tmp_path / "f.pkl").write_bytes(pickle.dumps(rows))
    paths.append(str(tmp_path / "f.pkl"))
    out = str(tmp_path / "out")
    assert main(["write", *paths, "-o", out, "--allow-pickle", "-q"]) == 0
    samples = list(iter_dataset(out))
    assert [s["id"] for s in samples] == [r["id"] for r in rows] * 6
    parquet = samples[4 * 300 + 8]["ids"]
    assert isinstance(parquet, np.ndarray) and parquet.dtype == np.int32
    assert parquet.tolist() == rows[8]["ids"]


def test_stdin(tmp_path, monkeypatch):
    data = "".join(json.dumps(r) + "\n" for r in ROWS[:10]).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["write", "-", "-o", str(tmp_path / "out"), "-q"]) == 0
    assert ids(tmp_path / "out") == list(range(10))


def test_key_field_is_recorded(jsonl, tmp_path):
    out = str(tmp_path / "out")
    assert main(["write", jsonl, "-o", out, "--key-field", "id", "-q"]) == 0
    assert load_manifest(out).key_field == "id"


def test_malformed_line_names_file_and_line_and_publishes_nothing(tmp_path, capsys):
    lines = [json.dumps(r) for r in ROWS[:50]]
    lines[41] = '{"id": 41, "text": oops}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["write", str(bad), "-o", str(out), "--max-samples", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("InputError: ") and f"{bad}:42" in err
    assert not out.exists() or os.listdir(out) == []


def test_unencodable_value_names_field(tmp_path, capsys):
    (tmp_path / "x.msgpack").write_bytes(msgpack.packb({"a": {"b": msgpack.ExtType(5, b"")}}))
    assert main(["write", str(tmp_path / "x.msgpack"), "-o", str(tmp_path / "o")]) == 1
    assert "EncodeError: sample 0, field 'a.b'" in capsys.readouterr().err


def test_pickle_needs_opt_in(tmp_path, capsys):
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(ROWS[:3]))
    assert main(["write", str(tmp_path / "p.pkl"), "-o", str(tmp_path / "o")]) == 1
    assert "--allow-pickle" in capsys.readouterr().err


def test_existing_output_needs_overwrite_or_append(jsonl, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["write", jsonl, "-o", out, "-q"]) == 0
    assert main(["write", jsonl, "-o", out, "-q"]) == 1
    assert "DatasetExistsError" in capsys.readouterr().err
    assert main(["write", jsonl, "-o", out, "-q", "--append"]) == 0
    assert len(ids(out)) == 4000
    assert main(["write", jsonl, "-o", out, "-q", "--overwrite"]) == 0
    assert len(ids(out)) == 2000


def test_usage_errors_exit_2(jsonl, tmp_path):
    for argv in (["write", jsonl], ["write", jsonl, "-o", "x", "--max-size", "lots"],
                 ["write", jsonl, "-o", "x", "--overwrite", "--append"],
                 ["write", jsonl, "-o", "x", "--workers", "0"], ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2


def test_storage_error_exits_1(jsonl, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["write", jsonl, "-o", str(tmp_path / "file" / "out")]) == 1
    assert capsys.readouterr().err.startswith("StorageError: ")


def test_verify_reports_corrupt_truncated_and_missing_shards(jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["write", jsonl, "-o", str(out), "--max-samples", "500", "-q"]) == 0
    m = load_manifest(str(out))
    shard1 = out / m.shards[1].name
    data = bytearray(shard1.read_bytes())
    data[2000] ^= 0xFF
    shard1.write_bytes(bytes(data))
    os.truncate(out / m.shards[2].name, 5000)
    os.remove(out / m.shards[3].name)
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard-000001.tar: sha256 differs" in err
    assert "shard-000002.tar: size 5000" in err
    assert "shard-000003.tar.idx" not in err and "shard-000003.tar is missing" in err
    assert "3 of 4 shards have problems" in err


def test_verify_names_the_sample_of_an_undecodable_block(tmp_path, capsys):
    """Bytes damaged after writing, with checksums refreshed: decoding still catches it."""
    import hashlib

    from shardstream.format.index import ShardIndex

    out = tmp_path / "out"
    assert main(["write", write_jsonl(tmp_path / "a.jsonl", ROWS[:100]), "-o", str(out),
                 "-q", "--block-size", "1KB"]) == 0
    m = load_manifest(str(out))
    info = m.shards[0]
    index = ShardIndex.from_bytes((out / info.index).read_bytes())
    data = bytearray((out / info.name).read_bytes())
    start = int(index.block_offset[3])
    data[start:start + 8] = b"\xc1" * 8
    (out / info.name).write_bytes(bytes(data))
    sha = hashlib.sha256(data).hexdigest()
    doc = json.loads((out / "manifest.json").read_text())
    doc["shards"][0]["sha256"] = sha
    new_index = ShardIndex(index.num_samples, index.shard_bytes, sha, index.block_offset,
                           index.block_size, index.block_first, index.sample_offset).to_bytes()
    (out / info.index).write_bytes(new_index)
    doc["shards"][0]["index_sha256"] = hashlib.sha256(new_index).hexdigest()
    (out / "manifest.json").write_text(json.dumps(doc))
    assert main(["verify", str(out)]) == 1
    first = int(index.block_first[3])
    assert f"shard-000000.tar, sample {first:09d}: shard shard-000000.tar: block 3" in \
        capsys.readouterr().err


def test_console_scripts_and_python_m(jsonl, tmp_path):
    out = str(tmp_path / "out")
    subprocess.run([sys.executable, "-m", "shardstream", "write", jsonl, "-o", out, "-q"],
                   check=True)
    r = subprocess.run([sys.executable, "-m", "shardstream", "verify", out],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_cli_write_publishes_nothing_and_cleans_up(tmp_path, workers):
    import signal
    import time

    src = write_jsonl(tmp_path / "big.jsonl", ROWS * 100)  # 200k lines
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "shardstream", "write", src, "-o", str(out),
                             "--workers", str(workers), "--max-samples", "1000", "-q"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until shards are being staged
        staging = [e for e in os.listdir(out) if e.startswith(".staging")] if out.exists() else []
        if any(os.listdir(out / s) for s in staging):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "nothing was published" in err
    assert not out.exists()  # the writer made it, so it removed it again


def test_index_info_verify_and_cat_on_foreign_webdataset_tars(tmp_path, capsys):
    import webdataset as wds

    os.makedirs(tmp_path / "wds")
    with wds.ShardWriter(str(tmp_path / "wds" / "part-%02d.tar"), maxcount=40, verbose=0) as w:
        for i in range(100):
            w.write({"__key__": f"s{i:03d}", "json": {"id": i}, "cls": i % 3,
                     "npy": np.arange(i % 5, dtype=np.int16)})
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("*.tar"))
    assert main(["index", *shards]) == 0
    assert "indexed 3 shards, 100 samples" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "wds")]) == 0
    assert "OK: 3 shards, 100 samples" in capsys.readouterr().out
    assert main(["cat", str(tmp_path / "wds"), "--key", "s042"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["json"] == {"id": 42} and line["cls"] == 0
    assert main(["cat", str(tmp_path / "wds"), "--key", "nope"]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
