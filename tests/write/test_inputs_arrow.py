"""Arrow IPC files and Hugging Face datasets as inputs: exact round trips, one lists ->
arrays rule, named errors, and write_shards(hf_dataset) through Arrow batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from shardstream import write_shards
from shardstream.cli.commands import write_main
from shardstream.errors import InputError
from shardstream.format.encode import encode_sample
from shardstream.format.schema import SchemaBuilder
from shardstream.read.dataset import iter_dataset
from shardstream.storage.io import load_manifest
from shardstream.write.inputs import iter_inputs, iter_task
from shardstream.write.plan import InputTask, arrow_batches, detect_kind, estimate_total, plan_tasks

pa = pytest.importorskip("pyarrow")


def table(n: int = 10) -> "pa.Table":
    """ints, floats, strings, bools, bytes, list<int32>, list<list<int64>>, nulls."""
    return pa.table({
        "id": pa.array(range(n), pa.int64()),
        "small": pa.array([i % 3 - 1 for i in range(n)], pa.int8()),
        "x": pa.array([i / 4 for i in range(n)], pa.float32()),
        "name": [f"row {i} é" for i in range(n)],
        "flag": [i % 2 == 0 for i in range(n)],
        "blob": [bytes([i % 256]) * (i % 9) for i in range(n)],
        "ids": pa.array([list(range(i % 5)) for i in range(n)], pa.list_(pa.int32())),
        "grid": pa.array([[[i, i + 1], [i + 2, i + 3]] for i in range(n)],
                         pa.list_(pa.list_(pa.int64()))),
        "maybe": pa.array([None if i % 4 == 0 else i for i in range(n)], pa.int64()),
        "rec": [{"k": str(i), "v": [float(i)]} for i in range(n)],
    })


def expected(i: int) -> dict:
    return {"id": i, "small": i % 3 - 1, "x": i / 4, "name": f"row {i} é",
            "flag": i % 2 == 0, "blob": bytes([i % 256]) * (i % 9),
            "ids": np.arange(i % 5, dtype=np.int32),
            "grid": np.array([[i, i + 1], [i + 2, i + 3]], np.int64),
            "maybe": None if i % 4 == 0 else i, "rec": {"k": str(i), "v": np.array([float(i)])}}


def same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_rows(rows: list[dict], n: int) -> None:
    assert len(rows) == n
    for i, r in enumerate(rows):
        assert same(r, expected(i)), (i, r)


def ipc(path, t, stream: bool = False, batch: int = 4):
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(str(path), t.schema) as w:
        for b in t.to_batches(batch):
            w.write_batch(b)
    return str(path)


def pack(tmp_path, *args: str, name: str = "out") -> list[dict]:
    out = str(tmp_path / name)
    assert write_main([*args, "-o", out, "-q", "--overwrite"]) == 0
    return list(iter_dataset(out))


# ---------------------------------------------------------------- Arrow IPC files
@pytest.mark.parametrize("stream", [False, True], ids=["file", "stream"])
def test_arrow_file_round_trips_exactly(tmp_path, stream):
    p = ipc(tmp_path / "a.arrow", table(10), stream)
    assert detect_kind(p) == "arrow" and [r for r, _ in arrow_batches(p)] == [4, 4, 2]
    check_rows(list(iter_inputs([p])), 10)
    check_rows(pack(tmp_path, p), 10)
    check_rows(pack(tmp_path, p, "--workers", "3", name="par"), 10)  # split by batches
    never = list(iter_inputs([p], arrays="never"))
    assert never[3]["ids"] == [0, 1, 2] and never[3]["grid"] == [[3, 4], [5, 6]]


def test_arrow_tasks_split_by_record_batches_with_progress(tmp_path):
    p = ipc(tmp_path / "a.arrows", table(40), stream=True, batch=5)
    tasks = plan_tasks([p], 4)
    assert len(tasks) == 4 and [t.kind for t in tasks] == ["arrow"] * 4
    seen: list[int] = []
    rows = [r for t in tasks for r in iter_task(t, progress=seen.append, batch_rows=3)]
    check_rows(rows, 40)
    assert sum(seen) == os.path.getsize(p)
    feather = pytest.importorskip("pyarrow.feather")
    f = str(tmp_path / "a.feather")
    feather.write_feather(table(6), f, chunksize=4)
    check_rows(list(iter_inputs([f])), 6)


@pytest.mark.parametrize("content,what", [
    (b"", "not an Arrow IPC file"), (b"PAR1 this is not arrow at all" * 10,
                                     "not an Arrow IPC file")])
def test_bad_arrow_input_is_a_named_error(tmp_path, content, what):
    p = tmp_path / "bad.arrow"
    p.write_bytes(content)
    with pytest.raises(InputError, match=rf"bad\.arrow: {what}.*pyarrow\.ipc\.new_file"):
        list(iter_inputs([str(p)]))
    assert write_main([str(p), "-o", str(tmp_path / "o"), "-q"]) == 1


def test_truncated_arrow_file_is_a_named_error(tmp_path, capsys):
    good = ipc(tmp_path / "good.arrows", table(40), stream=True)
    data = open(good, "rb").read()
    p = tmp_path / "cut.arrows"
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=r"cut\.arrows: record batch \d+ cannot be read .*"
                                         r"truncated or corrupt: write it again"):
        list(iter_inputs([str(p)]))
    assert write_main([str(p), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "InputError: " in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_arrow_null_in_a_list_names_file_row_and_field(tmp_path, capsys):
    t = pa.table({"h": pa.array([[1, 2]] * 6 + [[1, None]] + [[3]] * 3, pa.list_(pa.int16()))})
    p = ipc(tmp_path / "h.arrow", t, batch=4)
    with pytest.raises(InputError, match=r'h\.arrow: row 6: field "h": list<int16> holds a '
                                         r"null at \[1\], .*fill_null.*--arrays never"):
        list(iter_inputs([p]))
    assert write_main([p, "-o", str(tmp_path / "o"), "-q"]) == 1
    assert 'h.arrow: row 6: field "h"' in capsys.readouterr().err
    assert list(iter_inputs([p], arrays="never"))[6] == {"h": [1, None]}


# ---------------------------------------------------------------- Hugging Face folders
def hf_dataset(n: int = 10):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset(table(n))


def test_hf_save_to_disk_folder_round_trips_exactly(tmp_path):
    ds = hf_dataset(50)
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=3)
    folder = str(tmp_path / "hf")
    assert detect_kind(folder) == "hf" and len(plan_tasks([folder], 1)) == 3
    assert estimate_total(plan_tasks([folder], 1)) == 50
    check_rows(list(iter_inputs([folder])), 50)
    check_rows(list(iter_task(InputTask(folder, "hf"))), 50)
    check_rows(pack(tmp_path, folder), 50)
    check_rows(pack(tmp_path, folder + os.sep, "--workers", "2", name="par"), 50)
    schema = load_manifest(str(tmp_path / "out")).schema
    assert schema["ids"]["dtypes"] == ["int32"] and schema["maybe"]["types"] == ["int", "null"]


def test_hf_dataset_dict_asks_for_one_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": hf_dataset(6), "test": hf_dataset(4)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"dd is a Hugging Face DatasetDict with the splits "
                                         r"train, test: pass one split's folder, e\.g\. "
                                         r".*dd.train"):
        plan_tasks([str(tmp_path / "dd")], 1)
    check_rows(pack(tmp_path, str(tmp_path / "dd" / "test")), 4)
    with pytest.raises(InputError, match=r"DatasetDict with the splits train, test: pass one "
                                         r"split, e\.g\. dd\['train'\]"):
        write_shards(dd, str(tmp_path / "w"))


def test_other_folders_and_broken_hf_folders_are_named_errors(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"not a Hugging Face save_to_disk folder .*plain"):
        plan_tasks([str(tmp_path / "plain")], 1)
    ds = hf_dataset(4)
    folder = tmp_path / "hf"
    ds.save_to_disk(str(folder))
    state = json.loads((folder / "state.json").read_text())
    (folder / state["_data_files"][0]["filename"]).unlink()
    with pytest.raises(InputError, match=r"state\.json lists data-00000-of-00001\.arrow, which "
                                         r"is missing: .*save_to_disk"):
        plan_tasks([str(folder)], 1)
    state["_data_files"] = [{"filename": "../x.arrow"}]
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(InputError, match=r"is not a file name inside"):
        plan_tasks([str(folder)], 1)


# ---------------------------------------------------------------- write_shards(hf_dataset)
def _decoded(out: str) -> list[dict]:
    return list(iter_dataset(out))


@pytest.mark.parametrize("workers", [1, 2])
def test_write_shards_of_an_hf_dataset_equals_the_cli_on_its_folder(tmp_path, workers):
    ds = hf_dataset(300)
    ds.save_to_disk(str(tmp_path / "hf"))
    cli = pack(tmp_path, str(tmp_path / "hf"), name="cli")
    m = write_shards(ds, str(tmp_path / "w"), workers=workers, max_samples=70)
    got = _decoded(str(tmp_path / "w"))
    check_rows(got, 300)
    assert all(same(a, b) for a, b in zip(got, cli))
    assert m.schema == load_manifest(str(tmp_path / "cli")).schema
    assert m.num_samples == 300 and len(m.shards) == (5 if workers == 1 else 6)  # 150 each


def test_write_shards_hf_indices_columns_compression_and_keys(tmp_path):
    ds = hf_dataset(40)
    picked = ds.select([7, 3, 30, 1])  # an indices mapping: rows in this order
    write_shards(picked, str(tmp_path / "a"))
    assert [r["id"] for r in _decoded(str(tmp_path / "a"))] == [7, 3, 30, 1]
    write_shards(ds.select_columns(["id", "ids"]), str(tmp_path / "b"), compression="zstd")
    rows = _decoded(str(tmp_path / "b"))
    assert [sorted(r) for r in rows[:1]] == [["id", "ids"]] and same(rows[9]["ids"],
                                                                     expected(9)["ids"])
    keyed = ds.map(lambda r: {"key": f"k{r['id']}"})
    m = write_shards(keyed, str(tmp_path / "c"), key_field="key")
    assert m.num_samples == 40
    py = write_shards(iter(ds), str(tmp_path / "d"))  # the escape hatch: the dataset's dicts
    assert py.schema["ids"]["types"] == ["list"]
    bad = ds.map(lambda r: {"h": [1, None]})
    with pytest.raises(InputError, match=r'datasets\.Dataset: row 0: field "h": list<int64> '
                                         r"holds a null at \[1\]"):
        write_shards(bad, str(tmp_path / "e"))


def test_hf_extension_arrays_become_nd_arrays(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"m": datasets.Array2D((2, 3), "float32")})
    ds = datasets.Dataset.from_dict({"m": [np.full((2, 3), i, np.float32) for i in range(5)]},
                                    features=feats)
    ds.save_to_disk(str(tmp_path / "hf"))
    for rows in (pack(tmp_path, str(tmp_path / "hf")),
                 (write_shards(ds, str(tmp_path / "w")) and _decoded(str(tmp_path / "w")))):
        assert [r["m"].shape for r in rows] == [(2, 3)] * 5 and rows[4]["m"].dtype == np.float32
        assert rows[4]["m"][1, 2] == 4


def test_write_shards_of_a_pyarrow_table(tmp_path):
    write_shards(table(12), str(tmp_path / "t"), workers=2)
    check_rows(_decoded(str(tmp_path / "t")), 12)


# ---------------------------------------------------------------- the batch encoder
def test_encode_batch_gives_encode_sample_bytes_and_schema():
    from shardstream.write.arrow import batch_dicts
    from shardstream.write.arrow_encode import encode_batch

    rng = np.random.default_rng(0)
    n = 600
    ints = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64) >> rng.integers(0, 63, n)
    t = pa.table({
        "i": ints, "i8": ints.astype(np.int8),
        "u": rng.integers(0, 2**64 - 1, n, dtype=np.uint64) >> np.arange(n, dtype=np.uint64) % 64,
        "inull": pa.array([None if k % 7 == 0 else int(x) for k, x in enumerate(ints)]),
        "f": rng.standard_normal(n), "f16": rng.standard_normal(n).astype(np.float16),
        "b": pa.array([None if k % 5 == 0 else bool(k % 2) for k in range(n)]),
        "s": pa.array([None if k % 3 == 0 else "é" * (k % 300) for k in range(n)]),
        "bin": pa.array([b"\0" * (k % 300) for k in range(n)], pa.large_binary()),
        "ls": pa.array([list(range(k % 40)) for k in range(n)], pa.list_(pa.int32())),
        "lb": pa.array([[True, False][: k % 3] for k in range(n)], pa.list_(pa.bool_())),
        "ln": pa.array([None if k % 4 == 0 else [1] * (k % 20) for k in range(n)],
                       pa.large_list(pa.int8())),
        "fsl": pa.array([[k, -k] for k in range(n)], pa.list_(pa.float32(), 2)),
        "big": pa.array(["y" * 70000 if k == 5 else "z" for k in range(n)]),
        "lbig": pa.array([list(range(20000)) if k == 3 else [1] for k in range(n)],
                         pa.list_(pa.int16())),
    })
    for batch in (t.to_batches()[0], t.to_batches()[0].slice(17, 500)):
        enc = encode_batch(batch)
        dicts = list(batch_dicts(batch, "auto", "x"))
        assert enc is not None and enc.samples == [encode_sample(d) for d in dicts]
        observed, merged = SchemaBuilder(), SchemaBuilder()
        for d in dicts:
            observed.observe(d)
        merged.merge(enc.schema)
        assert merged.to_dict() == observed.to_dict()
    # what it leaves to the dicts: structs, nested lists, nulls in lists, bad keys
    assert encode_batch(pa.record_batch({"r": [{"a": 1}]})) is None
    assert encode_batch(pa.record_batch({"g": [[[1]]]})) is None
    assert encode_batch(pa.record_batch({"h": [[1, None]]})) is None
    assert encode_batch(pa.record_batch({"a": [1]}), key_field="key") is None
    assert encode_batch(pa.record_batch({"key": [1.5]}), key_field="key") is None


def test_import_shardstream_needs_neither_pyarrow_nor_datasets():
    code = ("import sys, shardstream, shardstream.cli, shardstream.write.parallel, "
            "shardstream.write.inputs, shardstream.write.plan; "
            "bad = [m for m in ('pyarrow', 'datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
