"""CLI safety: escaped terminal output, plain help, verify's contract, the progress bar."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import unicodedata

import numpy as np
import pytest

import shardstream
from shardstream.cli import inspect as inspect_mod
from shardstream.cli.commands import main, write_main
from shardstream.cli.text import escape, escape_json
from shardstream.cli.write import _Progress
from shardstream.format.index import ShardIndex
from shardstream.read.verify import verify
from shardstream.write.inputs import iter_task
from shardstream.write.plan import InputTask

verify_mod = importlib.import_module("shardstream.read.verify")

EVIL = "f\x1b[31mred\u202eevil\x9b\x7f\u2066\u200b"  # CSI, RLO, C1 CSI, DEL, LRI, ZWSP
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def assert_clean(text: str) -> None:
    """No raw control, format or bidi character anywhere but the line breaks."""
    bad = [f"U+{ord(c):04X}" for c in text if c != "\n" and unicodedata.category(c) in UNSAFE]
    assert not bad, (bad, text)
    raw = text.encode("utf-8", "surrogateescape")
    assert b"\x1b" not in raw and b"\xc2\x9b" not in raw and b"\xe2\x80\xae" not in raw


@pytest.fixture
def crafted(tmp_path) -> str:
    """A dataset whose field names, keys, values and created_by hold escapes."""
    out = str(tmp_path / "crafted")
    with shardstream.ShardWriter(out) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}\x1b]0;title\x07", EVIL: f"v\x9b{i}\u2066 é 中",
                     "ok": i})
    path = os.path.join(out, "manifest.json")
    doc = json.loads(open(path).read())
    doc["created_by"] = "writer \x1b[2J\u202e\x85"
    with open(path, "w") as f:
        f.write(json.dumps(doc))
    return out


# ---------------------------------------------------------------- escaping
def test_escape_function():
    assert escape("a\x1b[31mb\x9b\u202e\u2066\x7f\n\t") == \
        "a\\x1b[31mb\\x9b\\u202e\\u2066\\x7f\\n\\t"
    assert escape("é 中 \u3000 plain") == "é 中 \u3000 plain"  # printable text kept as is
    assert escape("\U000e0001\ud800") == "\\U000e0001\\ud800"
    line = json.dumps({EVIL: "\x9b\U000e0001\ud800"}, ensure_ascii=False)
    safe = escape_json(line)
    assert_clean(safe)
    assert json.loads(safe) == json.loads(line)


def test_info_escapes_field_names_and_created_by(crafted, capsys):
    assert main(["info", crafted]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    assert "f\\x1b[31mred\\u202eevil\\x9b\\x7f\\u2066\\u200b" in out
    assert "writer \\x1b[2J\\u202e\\x85" in out
    assert main(["info", crafted, "--json"]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    assert EVIL in json.loads(out)["schema"]


def test_cat_escapes_keys_fields_and_values_and_stays_json(crafted, capsys):
    assert main(["cat", crafted, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[1][EVIL] == "v\x9b1\u2066 é 中" and rows[1]["__key__"] == "k1\x1b]0;title\x07"
    assert "é 中" in out  # printable non-ASCII is not escaped


def test_verify_and_errors_escape_paths_and_names(crafted, tmp_path, capsys):
    evil_dir = str(tmp_path / "ds\x1b[31m\u202e")
    shutil.copytree(crafted, evil_dir)
    os.remove(os.path.join(evil_dir, "shard-000000.tar"))
    assert main(["verify", evil_dir]) == 1  # BAD lines quote the shard's path
    err = capsys.readouterr().err
    assert_clean(err)
    assert "BAD shard-000000.tar: " in err and "ds\\x1b[31m\\u202e" in err
    assert main(["cat", evil_dir]) == 1  # an error printed by main
    err = capsys.readouterr().err
    assert_clean(err)
    assert "ds\\x1b[31m\\u202e" in err
    path = os.path.join(crafted, "manifest.json")
    doc = json.loads(open(path).read())
    doc["shards"][0]["name"] = "sh\x1b[31m\u202e\x9bard.tar"
    with open(path, "w") as f:
        f.write(json.dumps(doc))
    for cmd in ("verify", "info", "cat"):
        assert main([cmd, crafted]) == 1
        err = capsys.readouterr().err
        assert_clean(err)
        assert "Error: " in err and "Traceback" not in err


def test_index_and_convert_escape_paths(crafted, tmp_path, capsys):
    assert main(["index", str(tmp_path / "no\x1b[31m\u202e.tar")]) == 1
    err = capsys.readouterr().err
    assert_clean(err)
    assert "no\\x1b[31m\\u202e.tar" in err
    out = str(tmp_path / "conv\x9b\u202e")
    assert main(["convert", crafted, out, "--compress", "none"]) == 0
    err = capsys.readouterr().err
    assert_clean(err)
    assert "converted 5 samples into" in err and "conv\\x9b\\u202e" in err


def test_input_error_with_crafted_field_name_is_escaped(tmp_path, capsys):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({EVIL: 2**70}) + "\n")
    assert write_main([str(p), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert_clean(err)
    assert err.startswith("InputError: ") and "does not fit in 64 bits" in err


def test_unexpected_error_prints_an_escaped_traceback(crafted, monkeypatch, capsys):
    

    def boom(*a, **kw):
        raise RuntimeError("bug near \x1b[31m\u202e")

    monkeypatch.setattr(inspect_mod, "cat_lines", boom)
    assert main(["cat", crafted]) == 1
    err = capsys.readouterr().err
    assert_clean(err)
    assert "RuntimeError: bug near \\x1b[31m\\u202e" in err and "this is a bug" in err


# ---------------------------------------------------------------- help
@pytest.mark.parametrize("entry", [main, write_main])
def test_help_is_plain_text(entry, capsys):
    with pytest.raises(SystemExit) as info:
        entry(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
    assert "Exit codes: 0 ok" in out and "shardstream-write" in out
    if entry is write_main:
        assert "--arrays {auto,never}" in out


# ---------------------------------------------------------------- verify's contract
def write_dataset(tmp_path, name: str = "ds", shards: int = 3) -> str:
    out = str(tmp_path / name)
    shardstream.write_shards(({"id": i, "x": np.arange(i % 7)} for i in range(30 * shards)),
                             out, max_samples=30, block_bytes=256)
    return out


def refresh(out: str, shard: int, data: bytes | None = None,
            index: bytes | None = None, **fields) -> None:
    """Rewrite shard/index bytes and make the manifest's checksums match them again."""
    path = os.path.join(out, "manifest.json")
    doc = json.loads(open(path).read())
    entry = doc["shards"][shard]
    if data is not None:
        with open(os.path.join(out, entry["name"]), "wb") as f:
            f.write(data)
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    if index is not None:
        with open(os.path.join(out, entry["index"]), "wb") as f:
            f.write(index)
        entry["index_sha256"] = hashlib.sha256(index).hexdigest()
    entry.update(fields)
    with open(path, "w") as f:
        f.write(json.dumps(doc))


def test_verify_reports_a_bare_exception_with_shard_sample_offset_and_goes_on(
        tmp_path, monkeypatch):
    out = write_dataset(tmp_path)
    real = verify_mod.iter_block_samples
    calls = []

    def flaky(data, index, block, *, where=""):
        calls.append(where)
        if where == "shard-000001.tar" and block == 2:
            raise RecursionError("maximum recursion depth exceeded")
        return real(data, index, block, where=where)

    monkeypatch.setattr(verify_mod, "iter_block_samples", flaky)
    report = verify(out)
    assert len(report.problems) == 1 and report.shards == 3
    p = report.problems[0]
    idx = ShardIndex.from_bytes(open(os.path.join(out, "shard-000001.tar.idx"), "rb").read())
    first = 30 + int(idx.block_first[2])
    assert (p.shard, p.key, p.offset) == ("shard-000001.tar", f"{first:09d}",
                                          int(idx.block_offset[2]))
    assert str(p).startswith(f"shard-000001.tar, sample {first:09d}: RecursionError: ")
    assert f"(at byte offset {int(idx.block_offset[2])})" in str(p)
    assert "shard-000002.tar" in calls  # the next shard was still checked
    assert report.samples == 90 - (idx.num_samples - int(idx.block_first[2]))


def test_verify_survives_a_shard_that_is_a_directory(tmp_path):
    out = write_dataset(tmp_path)
    shard = os.path.join(out, "shard-000000.tar")
    os.remove(shard)
    os.mkdir(shard)
    refresh(out, 0, bytes=os.path.getsize(shard))  # size matches: sha256 opens a directory
    report = verify(out)
    assert [p.shard for p in report.problems] == ["shard-000000.tar"]
    assert "IsADirectoryError" in report.problems[0].reason
    assert report.samples == 60


def test_verify_foreign_dataset_with_a_broken_index_is_a_problem(tmp_path, capsys):
    import webdataset as wds

    os.makedirs(tmp_path / "wds")
    with wds.ShardWriter(str(tmp_path / "wds" / "part-%02d.tar"), maxcount=20, verbose=0) as w:
        for i in range(40):
            w.write({"__key__": f"s{i:03d}", "cls": i % 3})
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("*.tar"))
    assert main(["index", *shards]) == 0
    out = str(tmp_path / "wds")
    doc = json.loads(open(os.path.join(out, "manifest.json")).read())
    refresh(out, 0, index=b"\x93\x01\x02")  # valid msgpack, not an index
    assert main(["verify", out]) == 1  # was an UnboundLocalError traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"BAD {doc['shards'][0]['name']}" in err
    assert "1 of 2 shards have problems" in err


# ---------------------------------------------------------------- progress bar
class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reader_progress_adds_up_to_the_file_size(tmp_path):
    rows = [{"i": i, "t": "x" * (i % 50)} for i in range(1000)]
    plain = tmp_path / "a.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(plain.read_text())
    for path, kind in ((plain, "jsonl"), (gz, "jsonl.gz")):
        seen = []
        assert sum(1 for _ in iter_task(InputTask(str(path), kind), progress=seen.append)) == 1000
        assert sum(seen) == os.path.getsize(path) and len(seen) > 2, kind  # compressed bytes
    size = os.path.getsize(plain)
    halves = [InputTask(str(plain), "jsonl", 0, size // 2), InputTask(str(plain), "jsonl", size // 2)]
    seen = []
    assert sum(sum(1 for _ in iter_task(t, progress=seen.append)) for t in halves) == 1000
    assert sum(seen) == size


def test_progress_bar_counts_input_bytes_with_samples_postfix(tmp_path, monkeypatch):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(3000)))
    tty = _TTY()
    monkeypatch.setattr("sys.stderr", tty)
    assert write_main([str(p), "-o", str(tmp_path / "o")]) == 0
    text = tty.getvalue()
    size = os.path.getsize(p)
    assert f"100%|##########| {size / 1000:.1f}k/{size / 1000:.1f}k" in text  # bytes, complete
    assert "3,000 samples]" in text and re.search(r"\d[kMG]?B/s", text), text
    bar = _Progress(True, None)  # stdin: no total, counts samples
    bar(5, 0)
    assert bar.bar.total is None and bar.bar.n == 5
    bar.close()
