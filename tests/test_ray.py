"""Packing on Ray Data: exact round trips, retries, overwrite/append, failures."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'shardstream[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import shardstream  # noqa: E402
from shardstream.errors import DatasetExistsError, InputError  # noqa: E402
from shardstream.integrations import ray as ssray  # noqa: E402
from shardstream.read.dataset import iter_dataset  # noqa: E402
from shardstream.storage.io import load_manifest  # noqa: E402
from shardstream.write.inputs import iter_inputs  # noqa: E402

N = 50_000
pytestmark = [pytest.mark.slow,  # starts a Ray runtime
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray for this file, shut down before the next test module runs."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # workers cannot import this test module: ship its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def numbered(batch: dict) -> dict:
    """Batch function: ids -> ragged int32 arrays, fixed float32 vectors, text."""
    ids = batch["id"]
    return {"id": ids, "vec": np.stack([ids.astype(np.float32) * k for k in range(4)], axis=1),
            "text": np.array([f"row {i}" for i in ids], dtype=object)}


def leftovers(out: str) -> list[str]:
    return [e for e in os.listdir(out) if e.startswith(".staging")]


def check_exact(out: str, n: int) -> list[dict]:
    """Every id in range(n) exactly once; the dataset verifies."""
    rows = list(iter_dataset(out))
    ids = [r["id"] for r in rows]
    assert len(ids) == n and set(ids) == set(range(n))
    assert load_manifest(out).num_samples == n
    assert shardstream.verify(out).ok
    assert leftovers(out) == []
    return rows


def test_from_items_round_trip_in_order(tmp_path):
    items = [{"id": i, "x": np.arange(i % 13, dtype=np.int32), "f": i / 8,
              "meta": {"odd": bool(i % 2), "tag": f"t{i % 5}"}} for i in range(N)]
    out = str(tmp_path / "ds")
    m = ssray.write(ray.data.from_items(items, override_num_blocks=4), out,
                    max_bytes=512 << 10, fsync=False)
    rows = check_exact(out, N)
    assert [r["id"] for r in rows] == list(range(N))  # preserve_order keeps input order
    assert len(m.shards) > 4 and m.num_samples == N
    for i in (0, 1, 12345, N - 1):
        r = rows[i]
        assert r["x"].dtype == np.int32 and np.array_equal(r["x"], items[i]["x"])
        assert r["f"] == items[i]["f"] and r["meta"] == items[i]["meta"]
    assert m.schema["x"]["dtypes"] == ["int32"] and m.schema["meta.tag"]["types"] == ["str"]


def test_range_with_bare_datasink(tmp_path):
    out = str(tmp_path / "ds")
    sink = ssray.ShardstreamDatasink(out, max_bytes=1 << 20, fsync=False)
    ray.data.range(N, override_num_blocks=8).map_batches(numbered).write_datasink(sink)
    rows = check_exact(out, N)
    assert sink.manifest is not None and sink.manifest.num_samples == N
    for r in rows[:100]:
        assert r["vec"].dtype == np.float32 and r["vec"].shape == (4,)
        assert np.array_equal(r["vec"], np.float32(r["id"]) * np.arange(4, dtype=np.float32))
        assert r["text"] == f"row {r['id']}"


def test_parquet_read(tmp_path):
    n = 20_000
    src = str(tmp_path / "in.parquet")
    ids = np.arange(n)
    tokens = [list(range(i % 9)) for i in range(n)]
    pq.write_table(pa.table({"id": ids, "tokens": pa.array(tokens, pa.list_(pa.int32())),
                             "name": [None if i % 7 == 0 else f"n{i}" for i in range(n)]}),
                   src, row_group_size=4000)
    out = str(tmp_path / "ds")
    ssray.write(ray.data.read_parquet(src), out, max_bytes=256 << 10, fsync=False)
    rows = check_exact(out, n)
    expected = {r["id"]: r for r in ray.data.read_parquet(src).iter_rows()}
    for r in rows:
        e = expected[r["id"]]
        assert r["name"] == e["name"] and list(r["tokens"]) == list(e["tokens"])


def test_block_rows_equal_iter_rows():
    items = [{"i": 1, "s": "x", "b": b"\x00", "l": [1, 2], "d": {"a": 1.5}, "n": None,
              "fix": np.ones((2, 3), np.float16), "rag": np.arange(2, dtype=np.uint8)},
             {"i": 2, "s": "y", "b": b"", "l": [], "d": {"a": 2.5}, "n": None,
              "fix": np.zeros((2, 3), np.float16), "rag": np.arange(5, dtype=np.uint8)}]
    ds = ray.data.from_items(items, override_num_blocks=1).materialize()
    got = [r for ref in ds.to_arrow_refs() for r in ssray.block_rows(ray.get(ref))]
    want = [dict(r) for r in ds.iter_rows()]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            if isinstance(w[k], np.ndarray):
                assert g[k].dtype == w[k].dtype and np.array_equal(g[k], w[k])
            else:
                assert type(g[k]) is type(w[k]) and g[k] == w[k]


def _flaky_sink(marker: str, mode: str, **kw):
    """A sink whose task 0 dies (``exit``) or raises mid-write on its first attempt."""

    class FlakySink(ssray.ShardstreamDatasink):
        def write(self, blocks, ctx):
            def rows_then_fail(blocks):
                for n, block in enumerate(blocks):
                    if n == 1 and ctx.task_idx == 0 and not os.path.exists(marker):
                        open(marker, "w").close()
                        if mode == "exit":
                            os._exit(1)  # the worker dies: its staging folder stays behind
                        raise RuntimeError("transient failure")
                    yield block
            return super().write(rows_then_fail(blocks), ctx)

    return FlakySink(**kw)


@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_failed_attempt_is_retried_exactly_once(tmp_path, mode):
    marker, out = str(tmp_path / "failed-once"), str(tmp_path / "ds")
    sink = _flaky_sink(marker, mode, output=out, max_bytes=64 << 10, fsync=False,
                       min_rows_per_write=10_000)
    ds = ray.data.range(N, override_num_blocks=10).map_batches(numbered)
    ds.write_datasink(sink, ray_remote_args={"max_retries": 2, "retry_exceptions": True})
    assert os.path.exists(marker)
    check_exact(out, N)


def test_permanent_failure_leaves_no_manifest(tmp_path):
    def boom(batch):
        if batch["id"][0] >= N // 2:
            raise ValueError("bad row")
        return batch

    out = str(tmp_path / "ds")
    with pytest.raises(Exception, match="bad row"):
        ssray.write(ray.data.range(N, override_num_blocks=4).map_batches(boom), out,
                    fsync=False)
    assert not os.path.exists(out)  # the write made the directory, so it removed it again

    ssray.write(ray.data.range(100), out, overwrite=True, fsync=False)  # an old dataset
    before = load_manifest(out)
    with pytest.raises(Exception, match="bad row"):
        ssray.write(ray.data.range(N, override_num_blocks=4).map_batches(boom), out,
                    overwrite=True, fsync=False)
    assert load_manifest(out) == before and shardstream.verify(out).ok  # untouched


def test_overwrite_and_append(tmp_path):
    out = str(tmp_path / "ds")
    ssray.write(ray.data.range(1000), out, fsync=False)
    with pytest.raises(DatasetExistsError, match="overwrite"):
        ssray.write(ray.data.range(10), out)
    os.mkdir(os.path.join(out, ".staging-ray-crashed"))  # leftover of a killed job
    ssray.write(ray.data.range(500), out, overwrite=True, fsync=False)
    assert [r["id"] for r in iter_dataset(out)] == list(range(500))
    assert leftovers(out) == []
    kept = [s.name for s in load_manifest(out).shards]  # fresh names: the old ones skipped
    m = ssray.write(ray.data.range(300).map_batches(lambda b: {"id": b["id"] + 500}), out,
                    append=True, max_bytes=8192, fsync=False)
    assert [r["id"] for r in iter_dataset(out)] == list(range(800))
    assert m.num_samples == 800 and shardstream.verify(out).ok
    assert [s.name for s in m.shards][:len(kept)] == kept


def test_remote_output_accepted(tmp_path):
    sink = ssray.ShardstreamDatasink("s3://bucket/ds")  # written by tests/test_ray_remote.py
    assert sink.output_dir == "s3://bucket/ds" and sink.remote is not None
    with pytest.raises(ValueError, match="memory://"):
        ssray.ShardstreamDatasink("memory://x/ds")
    sink = ssray.ShardstreamDatasink(f"file://{tmp_path}/ds")
    assert sink.output_dir == f"{tmp_path}/ds" and sink.remote is None
    with pytest.raises(ValueError, match="max_bytes"):
        ssray.ShardstreamDatasink(str(tmp_path / "x"), max_bytes=10)


def test_write_inputs_with_ray(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    # ragged keys and mixed types must survive exactly (no Arrow round trip)
    jsonl.write_text("".join(json.dumps({"id": i, **({"extra": [i, "x"]} if i % 3 else {})})
                             + "\n" for i in range(3000)))
    src = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": np.arange(3000, 5000),
                             "v": pa.array([[i, i] for i in range(2000)], pa.list_(pa.int64()))}),
                   src, row_group_size=500)
    out = str(tmp_path / "ds")
    m = ssray.write_inputs_with_ray([str(jsonl), src], out, address=None, allow_pickle=False,
                                    parts=3, max_bytes=16 << 10, fsync=False)
    got = list(iter_dataset(out))
    want = list(iter_inputs([str(jsonl), src]))
    assert m.num_samples == len(got) == 5000 and [g["id"] for g in got] == list(range(5000))
    assert "extra" not in got[0] and got[1]["extra"] == [1, "x"]
    assert all(np.array_equal(g["v"], w["v"]) for g, w in zip(got[3000:], want[3000:]))
    assert leftovers(out) == []

    with pytest.raises(InputError, match="standard input"):
        ssray.write_inputs_with_ray(["-"], out, address=None, allow_pickle=False)
    (tmp_path / "p.pkl").write_bytes(b"")
    with pytest.raises(InputError, match="allow-pickle"):
        ssray.write_inputs_with_ray([str(tmp_path / "p.pkl")], str(tmp_path / "o2"),
                                    address=None, allow_pickle=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{"id": \n')
    with pytest.raises(InputError, match="bad.jsonl"):
        ssray.write_inputs_with_ray([str(bad)], str(tmp_path / "o3"), address=None,
                                    allow_pickle=False, parts=1)
    assert not os.path.exists(tmp_path / "o3" / "manifest.json")


def test_cli_engine_ray_with_compression(tmp_path, capsys):
    from shardstream.cli.commands import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "t": "x" * (i % 40)}) + "\n"
                           for i in range(3000)))
    out = str(tmp_path / "out")
    assert main(["write", str(src), "-o", out, "--engine", "ray", "--workers", "2",
                 "--compress", "zstd", "--max-samples", "500"]) == 0
    assert "wrote 3,000 samples" in capsys.readouterr().err
    assert [s["id"] for s in iter_dataset(out)] == list(range(3000))
    assert load_manifest(out).compression is not None
    assert main(["verify", out]) == 0
