"""Input readers: exact integers and one lists -> arrays rule for every input kind."""

from __future__ import annotations

import gzip
import json
import pickle

import msgpack
import numpy as np
import pytest

from shardstream.cli.commands import write_main
from shardstream.errors import InputError
from shardstream.read.dataset import iter_dataset
from shardstream.write.inputs import iter_inputs, iter_task
from shardstream.write.plan import InputTask

BIG = 123456789012345678901234567890


def jsonl(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ---------------------------------------------------------------- exact integers
@pytest.mark.parametrize("value", [BIG, 2**64, -(2**63) - 1, -BIG])
def test_jsonl_integer_beyond_64_bits_is_an_error_naming_line_and_field(tmp_path, value):
    p = jsonl(tmp_path / "data.jsonl", ['{"a": 1}'] * 6 + ['{"meta": {"id": %d}}' % value])
    with pytest.raises(InputError, match=rf'data\.jsonl:7: field "meta\.id": integer {value} '
                                         r"does not fit in 64 bits; store it as a string"):
        list(iter_inputs([p]))
    with pytest.raises(InputError, match=r'data\.jsonl:7: field "meta\.id"'):
        list(iter_inputs([p], arrays="never"))


def test_integers_at_the_64_bit_edges_stay_exact(tmp_path):
    edges = [2**64 - 1, 2**63, -(2**63), 2**63 - 1, 10**18, -(10**18)]
    p = jsonl(tmp_path / "a.jsonl", [json.dumps({"v": v, "s": str(v) * 2, "f": 1e300,
                                                 "tiny": 0.000123456789012345678})
                                     for v in edges])
    got = list(iter_inputs([p]))
    assert [r["v"] for r in got] == edges and all(type(r["v"]) is int for r in got)
    assert got[0]["f"] == 1e300 and got[0]["tiny"] == 0.000123456789012345678
    ints = list(iter_inputs([jsonl(tmp_path / "b.jsonl", [json.dumps({"ids": [2**64 - 1, 1]})])]))
    assert ints[0]["ids"].dtype == np.uint64 and ints[0]["ids"].tolist() == [2**64 - 1, 1]


def test_big_integer_in_a_list_names_its_index(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", ['{"x": [[1, 2], [3, %d]]}' % BIG])
    with pytest.raises(InputError, match=r'a\.jsonl:1: field "x\[1\]\[1\]": integer'):
        list(iter_inputs([p]))


def test_big_integers_in_other_text_inputs(tmp_path):
    (tmp_path / "a.json").write_text('[{"a": 1}, {"b": {"c": %d}}]' % BIG)
    with pytest.raises(InputError, match=r'a\.json: element \[1\]: field "b\.c": integer'):
        list(iter_inputs([str(tmp_path / "a.json")]))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write('{"a": 1}\n{"a": %d}\n' % BIG)
    with pytest.raises(InputError, match=r'a\.jsonl\.gz:2: field "a": integer'):
        list(iter_inputs([str(tmp_path / "a.jsonl.gz")]))
    (tmp_path / "a.pkl").write_bytes(pickle.dumps([{"a": [1, BIG]}]))
    with pytest.raises(InputError, match=r'a\.pkl: element \[0\]: field "a\[1\]": integer'):
        list(iter_inputs([str(tmp_path / "a.pkl")], allow_pickle=True))


def test_cli_refuses_big_integer_and_publishes_nothing(tmp_path, capsys):
    p = jsonl(tmp_path / "data.jsonl", ['{"id": 1}', '{"id": %d}' % BIG])
    assert write_main([p, "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith('InputError: ') and 'data.jsonl:2: field "id": integer' in err
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---------------------------------------------------------------- lists -> arrays
ROW = {"ids": [1, 2, 3], "f": [0.5, 1], "b": [True, False], "words": ["a", "b"],
       "mixed": [1, "a", [2, 3]], "boolint": [True, 1], "empty": [], "grid": [[1, 2], [3, 4]],
       "ragged": [[1, 2], [3]], "nested": {"v": [1.5, 2.5]}, "recs": [{"v": [1, 2]}],
       "n": 1}


def check_auto(r: dict) -> None:
    assert r["ids"].dtype == np.int64 and r["ids"].tolist() == [1, 2, 3]
    assert r["f"].dtype == np.float64 and r["f"].tolist() == [0.5, 1.0]
    assert r["b"].dtype == np.bool_ and r["b"].tolist() == [True, False]
    assert r["words"] == ["a", "b"] and r["empty"] == [] and r["boolint"] == [True, 1]
    assert r["mixed"][:2] == [1, "a"] and r["mixed"][2].tolist() == [2, 3]
    assert r["grid"].shape == (2, 2) and r["grid"].dtype == np.int64
    assert type(r["ragged"]) is list and [a.tolist() for a in r["ragged"]] == [[1, 2], [3]]
    assert r["nested"]["v"].dtype == np.float64 and r["recs"][0]["v"].tolist() == [1, 2]
    assert r["n"] == 1


def test_one_rule_for_jsonl_json_msgpack_and_pickle(tmp_path):
    p = [jsonl(tmp_path / "a.jsonl", [json.dumps(ROW)])]
    (tmp_path / "b.json").write_text(json.dumps([ROW]))
    (tmp_path / "c.msgpack").write_bytes(msgpack.packb(ROW))
    (tmp_path / "d.pkl").write_bytes(pickle.dumps([ROW]))
    p += [str(tmp_path / n) for n in ("b.json", "c.msgpack", "d.pkl")]
    rows = list(iter_inputs(p, allow_pickle=True))
    assert len(rows) == 4
    for r in rows:
        check_auto(r)
    assert list(iter_inputs(p, allow_pickle=True, arrays="never")) == [ROW] * 4
    with pytest.raises(ValueError, match="arrays must be one of"):
        list(iter_inputs(p, arrays="sometimes"))


def test_numeric_list_with_null_is_an_error_in_every_kind(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", ['{"x": 1}', '{"m": {"v": [0.5, null, 1]}}'])
    with pytest.raises(InputError, match=r'a\.jsonl:2: field "m\.v": a list of numbers holds '
                                         r"null at \[1\].*--arrays never"):
        list(iter_inputs([p]))
    assert list(iter_inputs([p], arrays="never"))[1] == {"m": {"v": [0.5, None, 1]}}
    assert list(iter_inputs([jsonl(tmp_path / "b.jsonl", ['{"v": [null, null]}'])])) == \
        [{"v": [None, None]}]  # no numbers at all: a list


def test_float_list_with_an_inexact_integer_is_an_error(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", ['{"v": [0.5, %d]}' % (2**53 + 1)])
    with pytest.raises(InputError, match=r'field "v": a list of floats holds the integer '
                                         r"9007199254740993 at \[1\]"):
        list(iter_inputs([p]))
    assert list(iter_inputs([p], arrays="never"))[0]["v"][1] == 2**53 + 1


def parquet(path, table) -> str:
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(table, path, row_group_size=4)
    return str(path)


def test_parquet_null_item_is_an_error_naming_row_and_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    col = [[i, i] for i in range(10)]
    col[6] = [1, None]
    p = parquet(tmp_path / "a.parquet", pa.table({"id": list(range(10)),
                                                  "h": pa.array(col, pa.list_(pa.int16()))}))
    with pytest.raises(InputError, match=r'a\.parquet: row 6: field "h": list<int16> holds a '
                                         r"null at \[1\].*--arrays never"):
        list(iter_task(InputTask(p, "parquet"), batch_rows=3))
    with pytest.raises(InputError, match=r"row 6: "):  # split by row groups: file rows
        list(iter_task(InputTask(p, "parquet", 1, 2)))
    rows = list(iter_task(InputTask(p, "parquet"), arrays="never"))
    assert rows[6]["h"] == [1, None] and rows[0]["h"] == [0, 0]  # never: lists everywhere


def test_parquet_nested_and_struct_lists_follow_the_rule_with_arrow_dtypes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    grid = pa.array([[[1, 2], [3, 4]], [[1], [2, 3]], [], None],
                    pa.list_(pa.list_(pa.float32())))
    rec = pa.array([{"v": [1, 2], "s": "a"}, {"v": [], "s": "b"}, {"v": None, "s": "c"},
                    {"v": [5], "s": "d"}], pa.struct([("v", pa.list_(pa.uint8())),
                                                      ("s", pa.string())]))
    p = parquet(tmp_path / "n.parquet", pa.table({"grid": grid, "rec": rec,
                                                  "empty": pa.array([[], [1], [], [2]],
                                                                    pa.list_(pa.int8()))}))
    rows = list(iter_task(InputTask(p, "parquet")))
    assert rows[0]["grid"].dtype == np.float32 and rows[0]["grid"].shape == (2, 2)
    assert type(rows[1]["grid"]) is list and rows[1]["grid"][1].dtype == np.float32
    assert rows[2]["grid"].shape == (0,) and rows[3]["grid"] is None
    assert rows[0]["rec"]["v"].dtype == np.uint8 and rows[0]["rec"]["s"] == "a"
    assert rows[1]["rec"]["v"].shape == (0,) and rows[2]["rec"]["v"] is None
    assert rows[0]["empty"].dtype == np.int8 and rows[0]["empty"].shape == (0,)
    holed = pa.array([{"v": [1, None], "s": "x"}], rec.type)
    p2 = parquet(tmp_path / "h.parquet", pa.table({"rec": holed}))
    with pytest.raises(InputError, match=r'row 0: field "rec\.v": list<uint8> holds a null'):
        list(iter_task(InputTask(p2, "parquet")))


def test_jsonl_and_parquet_give_the_same_dataset_types(tmp_path):
    pa = pytest.importorskip("pyarrow")
    rows = [{"id": i, "ids": list(range(i % 4 + 1)), "y": [i * 0.5, 1.0]} for i in range(20)]
    j = jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    p = parquet(tmp_path / "a.parquet", pa.table({
        "id": [r["id"] for r in rows], "ids": pa.array([r["ids"] for r in rows],
                                                       pa.list_(pa.int64())),
        "y": pa.array([r["y"] for r in rows], pa.list_(pa.float64()))}))
    out = str(tmp_path / "out")
    assert write_main([j, p, "-o", out, "-q"]) == 0
    got = list(iter_dataset(out))
    for g in got:
        assert g["ids"].dtype == np.int64 and g["y"].dtype == np.float64
    assert [g["ids"].tolist() for g in got] == [r["ids"] for r in rows] * 2
    out2 = str(tmp_path / "never")
    assert write_main([j, p, "-o", out2, "-q", "--arrays", "never"]) == 0
    assert all(type(g["ids"]) is list for g in iter_dataset(out2))
