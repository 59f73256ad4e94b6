"""cat_lines: the functions behind `shardstream cat`."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import webdataset as wds

from shardstream.cli.inspect import cat_lines, to_jsonable
from shardstream.write.reindex import build_index
from shardstream.write.writer import ShardWriter


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("cat") / "ds"
    with ShardWriter(d, max_samples=4, fsync=False) as w:
        for i in range(10):
            w.write({"id": i, "x": np.arange(i, dtype=np.int16).reshape(1, i), "b": b"\x00\xff",
                     "f": float("nan") if i == 3 else i / 2, "m": {"t": "é", "l": [1, 2]}})
    return str(d)


def test_lines_summarise_arrays_and_bytes(root):
    lines = list(cat_lines(root))
    assert len(lines) == 10
    first = json.loads(lines[2])
    assert first == {"__index__": 2, "__key__": "000000002", "id": 2,
                     "x": {"dtype": "int16", "shape": [1, 2]}, "b": {"bytes": 2}, "f": 1.0,
                     "m": {"t": "é", "l": [1, 2]}}
    assert json.loads(lines[3])["f"] == "nan"


def test_full_values(root):
    line = json.loads(next(cat_lines(root, index=2, full=True)))
    assert line["x"] == [[0, 1]]
    assert base64.b64decode(line["b"]["base64"]) == b"\x00\xff"


def test_limit_index_and_key(root):
    assert [json.loads(s)["id"] for s in cat_lines(root, limit=3)] == [0, 1, 2]
    assert list(cat_lines(root, limit=0)) == []
    assert json.loads(next(cat_lines(root, index=-1)))["id"] == 9
    assert [json.loads(s)["id"] for s in cat_lines(root, key="000000007")] == [7]
    with pytest.raises(IndexError, match="10 samples"):
        list(cat_lines(root, index=10))
    with pytest.raises(KeyError, match="nope"):
        list(cat_lines(root, key="nope"))
    with pytest.raises(ValueError):
        list(cat_lines(root, index=1, key="a"))


def test_key_field(tmp_path):
    with ShardWriter(tmp_path / "k", key_field="name", fsync=False) as w:
        for i in range(5):
            w.write({"name": f"n{i}", "v": i})
    (line,) = cat_lines(str(tmp_path / "k"), key="n3")
    assert json.loads(line) == {"__index__": 3, "__key__": "n3", "name": "n3", "v": 3}


def test_webdataset_layout(tmp_path):
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write({"__key__": "k0", "txt": "hi", "jpg": b"\xff\xd8"})
    build_index([str(tmp_path / "a.tar")])
    (line,) = cat_lines(str(tmp_path))
    assert json.loads(line) == {"__index__": 0, "__key__": "k0", "jpg": {"bytes": 2}, "txt": "hi"}


def test_to_jsonable_scalars():
    assert to_jsonable([np.float32(1.5), float("-inf"), 1j, None]) == [1.5, "-inf", [0.0, 1.0],
                                                                      None]
