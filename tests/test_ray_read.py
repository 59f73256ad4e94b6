"""Reading on Ray Data: exact reads of local and S3 datasets, columns, task plans, errors."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'shardstream[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

import pyarrow as pa  # noqa: E402
from ray.data.block import BlockAccessor  # noqa: E402

from shardstream.errors import ManifestError, ShardNotFoundError  # noqa: E402
from shardstream.integrations import ray as ssray  # noqa: E402
from shardstream.integrations import ray_read  # noqa: E402
from shardstream.integrations.ray_columns import samples_to_block  # noqa: E402
from shardstream.integrations.ray_read import (arrow_batch, column_plan, plan_pieces,  # noqa: E402
                                               rows_to_block)
from shardstream.read.shards import ShardRef  # noqa: E402
from shardstream.storage.io import load_manifest  # noqa: E402
from shardstream.write.writer import ShardWriter  # noqa: E402

from conftest import sample  # noqa: E402

N = 1_000
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the tests that need it, shut down after this module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def rich(i: int) -> dict:
    """The shared test sample plus a fixed-shape float32 tensor and an optional field."""
    s = sample(i)
    s["vec"] = np.full((2, 3), i, dtype=np.float32)
    if i % 3 == 0:
        s["opt"] = i
    return s


def check_rows(rows: list[dict], n: int, make=rich) -> None:
    """Every id in range(n) exactly once, each row equal to the sample written."""
    ids = [r["id"] for r in rows]
    assert len(ids) == n and sorted(ids) == list(range(n))
    for r in rows:
        want = make(r["id"])
        assert set(r) >= set(want)
        for k, v in want.items():
            if isinstance(v, np.ndarray):
                assert r[k].dtype == v.dtype and np.array_equal(r[k], v), (k, r)
            else:
                assert r[k] == v, (k, r)
        assert r.get("opt") == want.get("opt")


# ---------------------------------------------------------------- without Ray running
def refs(counts: list[int]) -> list[ShardRef]:
    return [ShardRef(f"s{i}.tar", f"s{i}.idx", num_samples=n, bytes=n * 10)
            for i, n in enumerate(counts)]


@pytest.mark.parametrize("counts", [[97] * 10 + [30], [1000], [5, 0, 7, 1], [3]])
@pytest.mark.parametrize("tasks", [1, 2, 3, 4, 11, 25, 200, 10_000])
def test_plan_covers_every_sample_once_in_order(counts, tasks):
    plan = plan_pieces(refs(counts), tasks)
    got = [(p.ref.path, i) for task in plan for p in task for i in range(p.start, p.stop)]
    assert got == [(f"s{s}.tar", i) for s, n in enumerate(counts) for i in range(n)]
    assert all(task for task in plan) and len(plan) <= max(tasks, sum(c > 0 for c in counts))
    if tasks <= sum(counts):
        assert len(plan) >= min(tasks, sum(c > 0 for c in counts))


def test_plan_whole_shards_when_there_are_enough():
    plan = plan_pieces(refs([97] * 10), 3)
    assert len(plan) == 3 and all(p.start == 0 and p.stop == 97 for t in plan for p in t)
    assert sorted(len(t) for t in plan) == [3, 3, 4]
    split = plan_pieces(refs([1000, 500]), 6)  # shards cut by their share of samples
    assert [len(t) for t in split] == [1] * 6 and [p.stop - p.start for t in split
                                                   for p in t] == [250] * 6


def test_column_plan_from_manifest_schema(make_dataset):
    m = load_manifest(make_dataset(300, make=rich))
    plan = column_plan(m.schema)
    assert plan["x"][0] == "ragged" and plan["vec"] == ("fixed", (np.dtype("float32"), (2, 3)))
    assert plan["id"][0] == plan["opt"][0] == plan["meta"][0] == "arrow"
    with pytest.raises(ValueError, match="nope.*fields: "):
        column_plan(m.schema, ["id", "nope"], where="ds")


def test_source_without_manifest_is_refused(tmp_path):
    with ShardWriter(str(tmp_path / "ds"), fsync=False) as w:
        w.write(sample(0))
    os.remove(tmp_path / "ds" / "manifest.json")
    tars = [str(p) for p in (tmp_path / "ds").glob("*.tar")]
    with pytest.raises(ManifestError, match=r"shard-000000\.tar.*Ray reads need a dataset "
                                            "with a manifest"):
        ssray.ShardstreamDatasource(tars)


def block_rows(table) -> list[dict]:
    """A block's rows as a consumer gets them (tensors as ndarrays, nulls as None)."""
    return list(BlockAccessor.for_block(table).iter_rows(public_row_format=True))


def mixed(i: int) -> dict:
    """Every column kind: ragged 1-d and 2-d, fixed shape, str/bytes, optional, struct."""
    s = rich(i)
    s["m"] = np.full((i % 3, 2), i, dtype=np.int16)  # ragged in dim 0, empty rows too
    s["b"] = bytes(range(i % 7))
    return s


MIXED_PLAN = {"id": ("arrow", pa.int64()), "f": ("arrow", pa.float64()),
              "s": ("arrow", pa.string()), "b": ("arrow", pa.binary()),
              "x": ("ragged", (np.dtype("int32"), 1)), "m": ("ragged", (np.dtype("int16"), 2)),
              "vec": ("fixed", (np.dtype("float32"), (2, 3))), "opt": ("arrow", pa.int64()),
              "meta": ("arrow", pa.struct([pa.field("even", pa.bool_())]))}


def test_block_built_in_chunks_equals_one_pass_and_round_trips():
    rows = [mixed(i) for i in range(60)]
    whole = samples_to_block([rows], MIXED_PLAN)
    cut = samples_to_block(iter([rows[:7], [], rows[7:20], rows[20:]]), MIXED_PLAN)
    assert cut.equals(whole) and all(c.num_chunks == 1 for c in cut.columns)
    assert "VariableShaped" in str(cut.schema.field("x").type)
    assert "VariableShaped" in str(cut.schema.field("m").type)
    assert "TensorTypeV2" in str(cut.schema.field("vec").type)
    got = block_rows(cut)
    check_rows(got, 60, make=mixed)  # dtypes, shapes and values exact; "opt" null if absent
    assert [r["m"].shape for r in got] == [(i % 3, 2) for i in range(60)]
    assert [r["meta"] for r in got] == [{"even": i % 2 == 0} for i in range(60)]
    empty = samples_to_block([], MIXED_PLAN)
    assert empty.num_rows == 0 and empty.column_names == list(MIXED_PLAN)


def test_value_the_schema_did_not_foresee_keeps_every_value():
    rows = [mixed(i) for i in range(30)]
    rows[12]["x"] = None  # one chunk's ragged column goes through Ray's conversion
    rows[25]["id"] = 2 ** 70  # beyond int64
    rows[3]["m"] = np.ones((2, 2, 2), dtype=np.int16)  # another ndim
    t = samples_to_block([rows[:10], rows[10:20], rows[20:]], MIXED_PLAN)
    got = block_rows(t)
    for want, r in zip(rows, got):
        for k in ("id", "x", "m", "s", "vec"):
            if isinstance(want[k], np.ndarray):
                assert r[k].dtype == want[k].dtype and np.array_equal(r[k], want[k]), k
            else:
                assert r[k] == want[k], k
    assert t.schema.field("s").type == pa.string()  # the other columns keep their types


@pytest.mark.parametrize("dtype", ["bool", "complex64", "float16", "uint64"])
def test_ragged_dtypes_round_trip(dtype):
    rows = [{"a": (np.arange(i % 4 + 1) % 3).astype(dtype)} for i in range(20)]
    t = samples_to_block([rows[:5], rows[5:]], {"a": ("ragged", (np.dtype(dtype), 1))})
    for want, r in zip(rows, block_rows(t)):
        assert r["a"].dtype == want["a"].dtype and np.array_equal(r["a"], want["a"])


def test_read_task_decodes_in_chunks_exactly(make_dataset, monkeypatch):
    out = make_dataset(N, make=rich, max_samples=None, block_bytes=512)  # one shard
    monkeypatch.setattr(ray_read, "CHUNK_BYTES", 1)  # the smallest chunks: 16 samples
    src = ray_read.ShardstreamDatasource(out, block_bytes=20_000)
    tasks = src.get_read_tasks(3)
    assert [t.read_fn.args[-1] for t in tasks] == [16] * 3
    blocks = [b for t in tasks for b in t.read_fn()]
    assert len(blocks) > 3 and all(c.num_chunks == 1 for b in blocks for c in b.columns)
    check_rows([r for b in blocks for r in block_rows(b)], N)


# ---------------------------------------------------------------- on Ray
def test_local_read_exact_with_values(ray_session, make_dataset):
    out = make_dataset(N, make=rich, max_samples=97)  # 11 shards of several blocks
    for blocks in (3, 40):  # whole shards grouped; shards cut into ranges
        ds = ssray.read(out, override_num_blocks=blocks, block_bytes=4096)
        check_rows(ds.take_all(), N)
    schema = ds.schema()
    assert "ArrowVariableShapedTensorType" in str(schema.types[schema.names.index("x")])
    assert "Tensor" in str(schema.types[schema.names.index("vec")])
    batch = ssray.read(out, columns=["id", "vec"]).take_batch(N)  # numpy batch
    assert set(batch) == {"id", "vec"} and batch["vec"].shape == (N, 2, 3)
    assert np.array_equal(batch["vec"][:, 0, 0], batch["id"].astype(np.float32))


def test_arrow_batch_pads_like_shardstream():
    rows = [rich(i) for i in range(60)]
    for r in rows:
        r["m"] = np.full((r["id"] % 3 + 1, 2), r["id"], dtype=np.int16)  # ragged in dim 0
        r["w"] = np.ones((r["id"] % 2 + 1, r["id"] % 3 + 1))  # ragged beyond dim 0
    plan = {"id": ("arrow", pa.int64()), "s": ("arrow", pa.string()),
            "x": ("ragged", (np.dtype("int32"), 1)), "m": ("ragged", (np.dtype("int16"), 2)),
            "w": ("ragged", (np.dtype("float64"), 2)),
            "vec": ("fixed", (np.dtype("float32"), (2, 3)))}
    table = rows_to_block(rows, plan)
    for part in (table, table.slice(7, 20), pa.concat_tables([table.slice(3, 5),
                                                                table.slice(30, 9)])):
        b = arrow_batch(part, pad_value=-1)
        assert b["vec"].shape == (len(part), 2, 3) and isinstance(b["w"], list)
        for k, i in enumerate(b["id"].tolist()):
            n, m = b["x_lengths"][k], b["m_lengths"][k]
            assert np.array_equal(b["x"][k, :n], rows[i]["x"]) and (b["x"][k, n:] == -1).all()
            assert np.array_equal(b["m"][k, :m], rows[i]["m"]) and (b["m"][k, m:] == -1).all()
            assert np.array_equal(b["w"][k], rows[i]["w"]) and b["s"][k] == rows[i]["s"]
            assert np.array_equal(b["vec"][k], rows[i]["vec"])


def test_iter_torch_batches_for_ray_train(ray_session, make_dataset):
    pytest.importorskip("ray.train", reason="Ray Train is not installed (pip install 'ray[train]')")
    import torch
    from ray.data.collate_fn import ArrowBatchCollateFn

    class Collate(ArrowBatchCollateFn):  # as in docs/scaling.md
        def __call__(self, table):
            return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                    for k, v in ssray.arrow_batch(table).items()}

    out = make_dataset(300, make=rich)
    ids = []
    for b in ssray.read(out).iter_torch_batches(batch_size=64, collate_fn=Collate()):
        assert b["vec"].dtype == torch.float32 and b["vec"].shape[1:] == (2, 3)
        assert b["x"].dtype == torch.int32 and b["x"].shape[1] == int(b["x_lengths"].max())
        assert b["x_lengths"].tolist() == [i % 5 + 1 for i in b["id"].tolist()]
        ids += b["id"].tolist()
    assert sorted(ids) == list(range(300))
    plain = next(iter(ssray.read(out, columns=["id", "vec"]).iter_torch_batches(batch_size=8)))
    assert plain["vec"].shape == (8, 2, 3) and plain["id"].dtype == torch.int64


def test_missing_shard_is_named(ray_session, make_dataset):
    out = make_dataset(300)
    ds = ssray.read(out, override_num_blocks=4)
    gone = os.path.join(out, load_manifest(out).shards[1].name)
    os.remove(gone)
    with pytest.raises(ShardNotFoundError, match=os.path.basename(gone)):
        ds.take_all()


@pytest.mark.storage
def test_s3_read_exact_with_values(ray_session, s3_server, s3_bucket, tmp_path):
    opts = s3_server.storage_options
    url = f"{s3_bucket}/ds"
    with ShardWriter(url, max_samples=97, block_bytes=1024, fsync=False,
                     storage_options=opts) as w:
        for i in range(N):
            w.write(rich(i))
    cache = str(tmp_path / "cache")
    ds = ssray.read(url, storage_options=opts, cache_dir=cache, override_num_blocks=20)
    check_rows(ds.take_all(), N)  # shards cut into ranges: several tasks share a download
    m = load_manifest(url, opts)
    assert sum(n.endswith(".tar") for n in os.listdir(cache)) == len(m.shards)
    grouped = ssray.read(url, storage_options=opts, cache_dir=str(tmp_path / "cache2"),
                         override_num_blocks=3)  # several shards per task, read ahead
    check_rows(grouped.take_all(), N)
