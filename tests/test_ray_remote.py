"""Packing on Ray Data into object storage (SeaweedFS S3 on 127.0.0.1): exact round trips,
retried attempts, failures that leave nothing behind, overwrite/append, the CLI."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'shardstream[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

import shardstream  # noqa: E402
from shardstream.cli.commands import main  # noqa: E402
from shardstream.errors import DatasetExistsError  # noqa: E402
from shardstream.format.manifest import MANIFEST_NAME  # noqa: E402
from shardstream.integrations import ray as ssray  # noqa: E402
from shardstream.integrations.ray_remote import RemoteJob, check_remote_output  # noqa: E402
from shardstream.storage import io  # noqa: E402
from shardstream.storage.io import load_manifest  # noqa: E402
from shardstream.write.output import prepare_output  # noqa: E402

N = 20_000
pytestmark = [pytest.mark.slow, pytest.mark.storage,  # a Ray runtime and an S3 server
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")]


def _init() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # workers cannot import this test module: ship its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_session(s3_server):
    """One local Ray for this file (no S3 settings in its environment: the tasks get
    them from ``storage_options``), shut down before the next test module runs."""
    _init()
    yield
    if ray.is_initialized():
        ray.shutdown()


def numbered(batch: dict) -> dict:
    """Batch function: ids -> fixed float32 vectors, ragged int16 arrays, text."""
    ids = batch["id"]
    return {"id": ids, "vec": np.stack([ids.astype(np.float32) * k for k in range(4)], axis=1),
            "text": np.array([f"row {i}" for i in ids], dtype=object)}


def read_back(url: str, opts: dict, tmp_path, n: int) -> list[dict]:
    """Every id in range(n) exactly once, with its values, through ShardStream."""
    stream = shardstream.ShardStream(url, storage_options=opts,
                                     cache_dir=str(tmp_path / f"cache-{len(os.listdir(tmp_path))}"))
    rows = list(stream)
    ids = [int(r["id"]) for r in rows]
    assert len(ids) == n and set(ids) == set(range(n))
    return rows


def objects(url: str, opts: dict) -> list[str]:
    return io.list_prefix(url, storage_options=opts)


def listed(url: str, opts: dict) -> list[str]:
    """manifest.json and exactly the objects it lists are all there is under ``url``."""
    m = load_manifest(url, opts)
    names = sorted([MANIFEST_NAME] + [n for s in m.shards for n in (s.name, s.index)])
    assert objects(url, opts) == names
    return names


def test_write_to_s3_exact_in_order(ray_session, s3_server, s3_bucket, tmp_path):
    opts = s3_server.storage_options
    url = f"{s3_bucket}/ds"
    ds = ray.data.range(N, override_num_blocks=4).map_batches(numbered)
    m = ssray.write(ds, url, storage_options=opts, max_bytes=64 << 10, fsync=False)
    assert m.num_samples == N and len(m.shards) > 4 and load_manifest(url, opts) == m
    listed(url, opts)
    rows = read_back(url, opts, tmp_path, N)
    assert [int(r["id"]) for r in rows] == list(range(N))  # preserve_order: input order
    for i in (0, 1, 4321, N - 1):
        r = rows[i]
        assert np.array_equal(np.asarray(r["vec"]), np.arange(4, dtype=np.float32) * i)
        assert r["text"] == f"row {i}"
    assert all(s.name.startswith("shard-") for s in m.shards)
    cli_opts = [f"--storage-option=endpoint_url={s3_server.endpoint}",
                f"--storage-option=key={s3_server.KEY}",
                f"--storage-option=secret={s3_server.SECRET}"]
    assert main(["verify", url, *cli_opts]) == 0


def _flaky_sink(marker: str, mode: str, **kw):
    """A sink whose task 0 dies (``exit``) or raises after two blocks on its first attempt
    (its first shards are uploaded by then)."""

    class FlakySink(ssray.ShardstreamDatasink):
        def write(self, blocks, ctx):
            def rows_then_fail(blocks):
                for n, block in enumerate(blocks):
                    if n == 2 and ctx.task_idx == 0 and not os.path.exists(marker):
                        open(marker, "w").close()
                        if mode == "exit":
                            os._exit(1)  # the worker dies: its uploads stay for the driver
                        raise RuntimeError("transient failure")
                    yield block
            return super().write(rows_then_fail(blocks), ctx)

    return FlakySink(**kw)


@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_retried_attempt_leaves_no_duplicates(ray_session, s3_server, s3_bucket, tmp_path,
                                              mode, monkeypatch):
    removed: list[str] = []  # by the driver: what its sweep found
    remove = io.remove
    monkeypatch.setattr(io, "remove", lambda url, **kw: (removed.append(url), remove(url, **kw)))
    opts = s3_server.storage_options
    marker, url = str(tmp_path / "failed-once"), f"{s3_bucket}/ds"
    sink = _flaky_sink(marker, mode, output=url, storage_options=opts, max_bytes=16 << 10,
                       fsync=False, min_rows_per_write=5_000)
    ds = ray.data.range(N, override_num_blocks=16).map_batches(numbered)  # 4 blocks a task
    ds.write_datasink(sink, ray_remote_args={"max_retries": 2, "retry_exceptions": True})
    assert os.path.exists(marker)
    assert sink.manifest is not None and sink.manifest.num_samples == N
    listed(url, opts)  # the failed attempt's uploads are gone, none is listed
    # a dead attempt's uploads are swept by the driver; a failing one removes its own
    assert (len(removed) > 0) if mode == "exit" else removed == []
    read_back(url, opts, tmp_path, N)


def test_failing_task_leaves_nothing(ray_session, s3_server, s3_bucket, tmp_path):
    def boom(row):  # a row map that fails after some rows
        if row["id"] == N // 2 + 100:
            raise ValueError("bad row")
        return row

    opts = s3_server.storage_options
    url = f"{s3_bucket}/ds"
    kw = dict(storage_options=opts, max_bytes=16 << 10, fsync=False)
    with pytest.raises(Exception, match="bad row"):
        ssray.write(ray.data.range(N, override_num_blocks=4).map(boom), url, **kw)
    assert objects(url, opts) == []  # no manifest, no shard of the job

    ssray.write(ray.data.range(100), url, **kw)  # an old dataset
    with pytest.raises(DatasetExistsError, match="overwrite"):
        ssray.write(ray.data.range(10), url, **kw)
    before, names = load_manifest(url, opts), objects(url, opts)
    with pytest.raises(Exception, match="bad row"):
        ssray.write(ray.data.range(N, override_num_blocks=4).map(boom), url,
                    overwrite=True, **kw)
    assert load_manifest(url, opts) == before and objects(url, opts) == names  # untouched


def test_overwrite_and_append(ray_session, s3_server, s3_bucket, tmp_path):
    opts = s3_server.storage_options
    url = f"{s3_bucket}/ds"
    kw = dict(storage_options=opts, fsync=False)
    old = ssray.write(ray.data.range(1000), url, **kw)
    stray = "shard-0123456789ab-000000-89abcdef-000000.tar"  # of a job killed with its driver
    io.put_bytes(b"x", f"{url}/{stray}", storage_options=opts)
    io.put_bytes(b"mine", f"{url}/notes.txt", storage_options=opts)  # not the writer's
    m = ssray.write(ray.data.range(500), url, overwrite=True, **kw)
    assert m.num_samples == 500
    assert objects(url, opts) == sorted(listed_names(m) + [MANIFEST_NAME, "notes.txt"])
    assert not set(listed_names(old)) & set(objects(url, opts))  # the old objects went
    m2 = ssray.write(ray.data.range(300).map_batches(lambda b: {"id": b["id"] + 500}), url,
                     append=True, max_bytes=8192, **kw)
    assert m2.num_samples == 800 and [s.name for s in m2.shards][:len(m.shards)] == \
        [s.name for s in m.shards]
    assert [int(r["id"]) for r in read_back(url, opts, tmp_path, 800)] == list(range(800))


def test_remote_job_parts_and_cleanup(s3_server, s3_bucket):
    """Without Ray: what tasks upload, a failing attempt, duplicates, the driver's sweep."""
    opts = s3_server.storage_options
    url = f"{s3_bucket}/ds"
    job = RemoteJob(url, opts, "shard", "0123456789ab")
    kw = dict(max_samples=300, fsync=False)
    parts = [job.pack(k, ({"id": k * 1000 + i} for i in range(1000)), kw, f"part {k}")
             for k in range(2)]
    assert all(len(p.shards) > 1 for p in parts)

    def failing():
        yield from ({"id": i} for i in range(2000))
        raise RuntimeError("task died")
    with pytest.raises(RuntimeError, match="task died"):
        job.pack(2, failing(), kw, "part 2")
    uploaded = sorted(n for p in parts for s in p.shards for n in (s.name, s.index))
    assert objects(url, opts) == uploaded  # the failing attempt removed its own uploads
    target = prepare_output(url, prefix="shard", overwrite=False, append=True,
                            key_field="__key__", storage_options=opts)
    again = job.pack(1, iter([{"id": 1}]), kw, "part 1, second attempt")
    with pytest.raises(RuntimeError, match="two results for write task 1"):
        job.commit(target, parts + [again], key_field="__key__", block_bytes=65536,
                   compression=None, overwrite=False)
    job.cleanup()  # the driver after a failure: nothing was published
    assert objects(url, opts) == []


def listed_names(m) -> list[str]:
    return [n for s in m.shards for n in (s.name, s.index)]


def test_refused_outputs():
    with pytest.raises(ValueError, match="memory://"):
        check_remote_output("memory://x/ds")
    with pytest.raises(ValueError, match="pipe:"):
        ssray.ShardstreamDatasink("pipe:cat")
    assert ssray.ShardstreamDatasink("s3://bucket/ds").remote is not None


def test_cli_engine_ray_to_s3(ray_session, s3_server, s3_bucket, tmp_path, monkeypatch,
                              capsys):
    """``shardstream write --engine ray -o s3://...``: the S3 settings from the environment,
    which Ray workers inherit from the Ray that the command starts itself. Runs last."""
    ray.shutdown()
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "t": "x" * (i % 40)}) + "\n"
                           for i in range(3000)))
    url = f"{s3_bucket}/cli"
    assert main(["write", str(src), "-o", url, "--engine", "ray", "--workers", "2",
                 "--compress", "zstd", "--max-samples", "500"]) == 0
    assert "wrote 3,000 samples" in capsys.readouterr().err
    assert not ray.is_initialized()  # it shut down the Ray it started
    opts = s3_server.storage_options
    m = load_manifest(url, opts)
    assert m.compression is not None and len(m.shards) >= 6
    listed(url, opts)
    rows = read_back(url, opts, tmp_path, 3000)
    assert [int(r["id"]) for r in rows] == list(range(3000))
    assert all(r["t"] == "x" * (int(r["id"]) % 40) for r in rows)
