"""Packing on Ray Data vs the local multi-process writer, same data, same run.

usage: python benchmarks/ray_write.py [--n 100000] [--cpus 2] [--repeat 3] [--out DIR]

Packs the ``tokens`` workload of the shared harness (``$SHARDSTREAM_BENCH``,
default ``../shared/bench``) three ways, each ``--repeat`` times, alternating:

- ``local``: ``shardstream.write_shards(list, workers=cpus)`` (the baseline);
- ``ray_items``: ``ray.data.from_items(list)`` + ``integrations.ray.write``
  (the driver converts the list to Arrow blocks: counted, it is part of the cost);
- ``ray_materialized``: the same list already in Ray's object store
  (``from_items(list).materialize()`` outside the timing), as rows arriving from
  an upstream Ray pipeline: the sink's own cost against ``local``;
- ``local_gen``: ``write_shards(tokens(n), workers=cpus)``: generation timed too,
  serial in the parent (the pool encodes chunks);
- ``ray_gen``: rows generated inside Ray tasks (``ray.data.range`` + ``map_batches``),
  as a distributed reader would produce them; same shapes and distribution, other
  values, generation timed too. Compare it with ``local_gen``.

Prints one JSON line per run, then a summary line with the median seconds and
``ratio`` = local seconds / Ray seconds (throughput of Ray relative to local).
``ray.init`` is timed separately and not included.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(HERE, "..", "..", "shared", "bench"))
sys.path.insert(0, BENCH)

from workloads import tokens  # noqa: E402


def tokens_batch(batch: dict) -> dict:
    """Ray read side: ``tokens`` rows for the ids of ``batch`` (seeded by the first id)."""
    import numpy as np

    ids = batch["id"]
    rows = list(tokens(len(ids), seed=int(ids[0])))
    ragged = np.empty(len(rows), dtype=object)
    ragged[:] = [r["input_ids"] for r in rows]
    return {"id": ids, "input_ids": ragged,
            "label": np.array([r["label"] for r in rows]),
            "text": np.array([r["text"] for r in rows], dtype=object)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-bytes", type=int, default=64 << 20)
    ap.add_argument("--out", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--modes", default="local,ray_items,ray_materialized,local_gen,ray_gen")
    args = ap.parse_args()

    import ray

    import shardstream
    from shardstream.integrations import ray as ssray

    scratch = args.out or tempfile.mkdtemp(prefix="ray-bench-")
    out = os.path.join(scratch, "ds")
    items = list(tokens(args.n, seed=0))
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    import workloads  # Ray workers cannot import the harness: ship it by value
    ray.cloudpickle.register_pickle_by_value(workloads)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    print(json.dumps({"ray_init_s": round(time.perf_counter() - t, 2), "ray": ray.__version__}))
    kw = dict(max_bytes=args.max_bytes, overwrite=True)

    def run(mode: str, warmup: bool = False) -> float:
        t = time.perf_counter()
        if mode == "local":
            m = shardstream.write_shards(items, out, workers=args.cpus, **kw)
        elif mode == "local_gen":
            m = shardstream.write_shards(tokens(args.n, seed=0), out, workers=args.cpus, **kw)
        elif mode == "ray_items":
            m = ssray.write(ray.data.from_items(items, override_num_blocks=2 * args.cpus),
                            out, **kw)
        elif mode == "ray_materialized":
            m = ssray.write(materialized, out, **kw)
        else:
            ds = ray.data.range(args.n, override_num_blocks=2 * args.cpus)
            m = ssray.write(ds.map_batches(tokens_batch, batch_size=1024), out, **kw)
        dt = time.perf_counter() - t
        if m.num_samples != args.n:
            raise RuntimeError(f"{mode}: wrote {m.num_samples} samples, expected {args.n}")
        print(json.dumps({"mode": mode, "warmup": warmup, "n": args.n, "seconds": round(dt, 3),
                          "samples_per_s": round(args.n / dt), "shards": len(m.shards),
                          "bytes": m.total_bytes}), flush=True)
        return dt

    modes = args.modes.split(",")
    if "ray_materialized" in modes:
        materialized = ray.data.from_items(items, override_num_blocks=2 * args.cpus)
        materialized = materialized.materialize()
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for mode in modes:  # warm up: imports in fresh worker processes, page cache
            run(mode, warmup=True)
        for _ in range(args.repeat):
            for mode in modes:
                times[mode].append(run(mode))
    finally:
        ray.shutdown()
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    summary = {"median_s": {m: round(v, 3) for m, v in med.items()}, "cpus": args.cpus}
    # each Ray mode against its local baseline
    pairs = {"ray_items": "local", "ray_materialized": "local", "ray_gen": "local_gen"}
    summary["ratio"] = {f"{r}/{b}": round(med[b] / med[r], 3) for r, b in pairs.items()
                        if r in med and b in med}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
