"""Tests for shardstream.write.inputs: every input kind, splitting, and error messages."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardstream.errors import InputError
from shardstream.write import plan
from shardstream.write.inputs import iter_inputs, iter_task
from shardstream.write.plan import (InputTask, detect_kind, estimate_total, group_tasks, plan_tasks,
                                    task_bytes)

ROWS = [{"id": i, "text": "x" * i, "tags": ["a", "b"][: i % 3], "meta": {"k": i / 2}} for i in range(7)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_all(tasks: list[InputTask], **kw) -> list[dict]:
    return [row for t in tasks for row in iter_task(t, **kw)]


# ---------------------------------------------------------------- round trips


def test_jsonl_and_ndjson_round_trip(tmp_path):
    for name in ("a.jsonl", "a.ndjson", "a.JSONL"):
        p = write_jsonl(tmp_path / name, ROWS)
        assert detect_kind(p) == "jsonl"
        assert list(iter_inputs([p])) == ROWS


def test_gzip_round_trip(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    assert detect_kind(str(p)) == "jsonl.gz"
    assert list(iter_inputs([str(p)])) == ROWS


def test_gzip_bad_line_and_truncated(tmp_path):
    p = tmp_path / "b.ndjson.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"a": 1}\n\n{"a": \n')
    with pytest.raises(InputError, match=r"b\.ndjson\.gz:3: invalid JSON"):
        list(iter_inputs([str(p)]))
    data = gzip.compress(b'{"a": 1}\n' * 1000)
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="gzip"):
        list(iter_inputs([str(p)]))


def test_json_array_round_trip_and_jsonl_fallback(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("\n  " + json.dumps(ROWS, indent=2))
    assert detect_kind(str(p)) == "json"
    assert list(iter_inputs([str(p)])) == ROWS
    q = write_jsonl(tmp_path / "lines.json", ROWS)
    assert detect_kind(q) == "jsonl"
    assert list(iter_inputs([q])) == ROWS


def test_json_array_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"a": 1}, {"a": 2}, 3]')
    with pytest.raises(InputError, match=r"bad\.json: element \[2\].*expected an object"):
        list(iter_inputs([str(p)]))
    p.write_text('[{"a": 1}, ')
    with pytest.raises(InputError, match=r"bad\.json: invalid JSON"):
        list(iter_inputs([str(p)]))


def test_msgpack_round_trip(tmp_path):
    rows = ROWS + [{1: b"bytes-key-int", "blob": b"\x00\xff"}]
    for ext in (".msgpack", ".mp", ".mpk"):
        p = tmp_path / f"a{ext}"
        p.write_bytes(b"".join(msgpack.packb(r) for r in rows))
        assert detect_kind(str(p)) == "msgpack"
        assert list(iter_inputs([str(p)])) == rows


def test_msgpack_errors(tmp_path):
    p = tmp_path / "a.msgpack"
    p.write_bytes(msgpack.packb({"a": 1}) + msgpack.packb([1, 2]))
    with pytest.raises(InputError, match="item 1 is a list, expected a map"):
        list(iter_inputs([str(p)]))
    full = msgpack.packb({"a": 1}) + msgpack.packb({"b": "x" * 50})
    p.write_bytes(full[:-5])
    got = []
    with pytest.raises(InputError, match="truncated in item 1"):
        for row in iter_inputs([str(p)]):
            got.append(row)
    assert got == [{"a": 1}]
    p.write_bytes(b"\xc1")
    with pytest.raises(InputError, match="invalid msgpack in item 0"):
        list(iter_inputs([str(p)]))


def test_pickle_refused_then_allowed(tmp_path):
    p = tmp_path / "a.pkl"
    p.write_bytes(pickle.dumps(ROWS))
    assert detect_kind(str(p)) == "pickle"
    with pytest.raises(InputError, match=r"refusing to unpickle .*a\.pkl.*--allow-pickle"):
        iter_task(InputTask(str(p), "pickle"))
    with pytest.raises(InputError, match="refusing to unpickle"):
        list(iter_inputs([str(p)]))
    assert list(iter_inputs([str(p)], allow_pickle=True)) == ROWS
    q = tmp_path / "b.pickle"
    q.write_bytes(pickle.dumps(({"a": 1}, [2])))
    with pytest.raises(InputError, match=r"element \[1\] is a list"):
        list(iter_inputs([str(q)], allow_pickle=True))


def test_stdin(monkeypatch):
    class FakeStdin:
        buffer = io.BytesIO(b'{"a": 1}\r\n\n{"a": 2}\n{"a": oops}\n')

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    assert detect_kind("-") == "stdin"
    it = iter_inputs(["-"])
    assert [next(it), next(it)] == [{"a": 1}, {"a": 2}]
    with pytest.raises(InputError, match=r"<stdin>:4: invalid JSON"):
        next(it)


# ---------------------------------------------------------------- errors


def test_malformed_jsonl_line_number(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\r\n{"a": [1, 2}\n{"a": 3}\n')
    with pytest.raises(InputError, match=r"data\.jsonl:4: invalid JSON: .*fix or remove the line"):
        list(iter_inputs([str(p)]))


def test_malformed_jsonl_in_split_task_reports_byte_offset(tmp_path):
    p = tmp_path / "data.jsonl"
    good = '{"a": 1}\n' * 10
    p.write_text(good + "{nope\n")
    with pytest.raises(InputError, match=rf"byte offset {len(good)}.*line number unknown"):
        list(iter_task(InputTask(str(p), "jsonl", 5, None)))


def test_non_object_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"data\.jsonl:2: expected a JSON object per line, got array"):
        list(iter_inputs([str(p)]))


def test_unknown_extension(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    with pytest.raises(InputError, match=r"data\.csv.*\.jsonl.*\.parquet"):
        detect_kind(str(p))
    with pytest.raises(InputError, match=r"data\.csv"):
        plan_tasks([str(p)], 1)


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="input file not found: .*nope.jsonl") as info:
        plan_tasks([write_jsonl(tmp_path / "ok.jsonl", ROWS), missing], 2)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InputError, match="input file not found"):
        list(iter_task(InputTask(missing, "jsonl")))
    with pytest.raises(InputError, match="input file not found"):
        detect_kind(str(tmp_path / "nope.json"))


# ---------------------------------------------------------------- JSONL splitting


@st.composite
def jsonl_files(draw):
    n = draw(st.integers(0, 30))
    rows, chunks = [], []
    for i in range(n):
        if draw(st.booleans()):
            chunks.append(draw(st.sampled_from(["\n", "\r\n", "   \n"])))  # blank lines
        row = {"i": i, "s": "é" * draw(st.integers(0, 40))}
        rows.append(row)
        end = draw(st.sampled_from(["\n", "\r\n"]))
        if i == n - 1 and draw(st.booleans()):
            end = ""  # missing final newline
        chunks.append(json.dumps(row, ensure_ascii=draw(st.booleans())) + end)
    data = "".join(chunks).encode()
    newlines = [k for k, b in enumerate(data) if b == 10]
    special = sorted({x for k in newlines for x in (k, k + 1) if 0 < x < len(data)})
    pool = st.integers(1, max(1, len(data) - 1))
    if special:
        pool = st.one_of(pool, st.sampled_from(special))
    cuts = sorted(set(draw(st.lists(pool, max_size=12))))
    return data, rows, [c for c in cuts if 0 < c < len(data)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=jsonl_files())
def test_jsonl_byte_ranges_read_every_line_once(tmp_path, case):
    data, rows, cuts = case
    p = tmp_path / "split.jsonl"
    p.write_bytes(data)
    bounds = [0, *cuts, None]
    tasks = [InputTask(str(p), "jsonl", a, b) for a, b in zip(bounds, bounds[1:])]
    assert read_all(tasks) == rows
    # a stop beyond EOF and empty ranges are harmless
    assert read_all([InputTask(str(p), "jsonl", 0, len(data) + 10)]) == rows
    assert read_all([InputTask(str(p), "jsonl", 3, 3)]) == []


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_plan_and_group_jsonl(tmp_path, parts):
    a = write_jsonl(tmp_path / "a.jsonl", [{"f": "a", "i": i, "pad": "p" * (i % 17)} for i in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"f": "b", "i": i} for i in range(40)])
    expected = list(iter_inputs([a, b]))
    tasks = plan_tasks([a, b], parts)
    assert [t.path for t in tasks] == sorted(t.path for t in tasks)  # input order kept
    if parts == 1:
        assert tasks == [InputTask(a, "jsonl"), InputTask(b, "jsonl")]
    groups = group_tasks(tasks, parts)
    assert len(groups) == parts
    assert [t for g in groups for t in g] == tasks
    assert [r for g in groups for r in read_all(g)] == expected
    sizes = [sum(task_bytes(t) for t in g) for g in groups]
    total = sum(sizes)
    assert total == Path(a).stat().st_size + Path(b).stat().st_size
    assert max(sizes) - min(sizes) <= 2  # cut at the ideal boundaries
    assert estimate_total(tasks) is None


def test_group_tasks_unsplittable_and_empty(tmp_path):
    files = []
    for i, n in enumerate([5, 50, 5, 5, 5]):
        p = tmp_path / f"f{i}.msgpack"
        p.write_bytes(b"".join(msgpack.packb({"i": j}) for j in range(n)))
        files.append(str(p))
    tasks = plan_tasks(files, 3)
    assert tasks == [InputTask(f, "msgpack") for f in files]
    groups = group_tasks(tasks, 3)
    assert [t for g in groups for t in g] == tasks
    assert groups[1][0].path == files[1]
    assert group_tasks(tasks[:2], 4).count([]) == 2
    assert group_tasks([], 3) == [[], [], []]


# ---------------------------------------------------------------- Parquet


def make_parquet(path: Path, n: int = 100, row_group_size: int = 13) -> list[dict]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tokens = [None if i == 3 else list(range(i % 5)) for i in range(n)]
    table = pa.table({
        "id": pa.array(range(n), pa.int64()),
        "tokens": pa.array(tokens, pa.list_(pa.int32())),
        "big": pa.array([[i, -i] for i in range(n)], pa.large_list(pa.float64())),
        "vec": pa.array([None if i == 5 else [i, i + 1, i + 2] for i in range(n)],
                        pa.list_(pa.float32(), 3)),
        "mask": pa.array([[True, i % 2 == 0] for i in range(n)], pa.list_(pa.bool_())),
        "short": pa.array([[1, 2] if i == 7 else [i] for i in range(n)], pa.list_(pa.int16())),
        "words": pa.array([["w"] * (i % 3) for i in range(n)], pa.list_(pa.string())),
        "text": pa.array([None if i % 11 == 0 else f"t{i}" for i in range(n)]),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return table.to_pylist()


def assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(g[k], np.ndarray):
                assert g[k].tolist() == w[k], (k, g[k], w[k])
            else:
                assert g[k] == w[k], (k, g[k], w[k])


def test_parquet_types_and_batching(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "a.parquet"
    want = make_parquet(p)
    assert detect_kind(str(p)) == "parquet"

    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        calls.append(kw)
        return real(self, *a, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("whole-file read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    got = list(iter_task(InputTask(str(p), "parquet"), batch_rows=8))
    assert calls and calls[0]["batch_size"] == 8
    assert_rows_equal(got, want)
    assert got[0]["tokens"].dtype == np.int32 and got[2]["tokens"].tolist() == [0, 1]
    assert got[3]["tokens"] is None
    assert got[0]["big"].dtype == np.float64
    assert got[2]["vec"].dtype == np.float32 and got[2]["vec"].shape == (3,)
    assert got[5]["vec"] is None
    assert got[0]["mask"].dtype == np.bool_
    assert got[7]["short"].tolist() == [1, 2] and got[7]["short"].dtype == np.int16
    assert isinstance(got[6]["short"], np.ndarray) and got[6]["short"].dtype == np.int16
    # (null items in a numeric list: tests/test_inputs_arrays.py)
    assert got[2]["words"] == ["w", "w"] and got[0]["text"] is None


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 20])
def test_parquet_split_by_row_groups(tmp_path, parts):
    p = tmp_path / "a.parquet"
    want = make_parquet(p, n=100, row_group_size=10)
    j = write_jsonl(tmp_path / "b.jsonl", ROWS)
    tasks = plan_tasks([str(p), j], parts)
    ptasks = [t for t in tasks if t.kind == "parquet"]
    assert ptasks[0].start == 0 and ptasks[-1].stop in (None, 10)
    assert all(a.stop == b.start for a, b in zip(ptasks, ptasks[1:]))
    if parts > 1:
        assert len(ptasks) > 1
    groups = group_tasks(tasks, parts)
    got = [r for g in groups for r in read_all(g, batch_rows=4)]
    assert_rows_equal(got[:100], want)
    assert got[100:] == ROWS
    assert estimate_total(ptasks) == 100
    assert estimate_total(tasks) is None
    assert estimate_total([InputTask(str(p), "parquet", 2, 5)]) == 30
    assert task_bytes(InputTask(str(p), "parquet")) == sum(task_bytes(t) for t in ptasks)


def test_parquet_bad_file_and_missing_pyarrow(tmp_path, monkeypatch):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"bad\.parquet"):
        list(iter_inputs([str(p)]))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    plan._row_groups.cache_clear()
    with pytest.raises(InputError, match=r"pip install 'shardstream\[parquet\]'"):
        list(iter_task(InputTask(str(p), "parquet")))
