"""Reading on Ray Data vs ShardStream with 2 DataLoader workers, same data, same run.

usage: python benchmarks/ray_read.py [--workload tokens] [--cpus 2] [--workers 2]
                                     [--batch 256] [--repeat 3] [--out DIR]
                                     [--modes shardstream,ray_numpy,ray_torch]
                                     [--refresh-ray-limits]

Writes the workload (``tokens`` 100k of the shared harness, as ``benchmarks/stream.py``)
into ``DIR/<workload>`` unless it is there, then reads one epoch per run, each in a
fresh process, the modes alternating, ``--repeat`` rounds:

- ``shardstream``: ``ShardStream(batch_size=B)`` through ``loader(num_workers=W)``
  (batches of tensors: ragged ``input_ids`` padded, plus ``input_ids_lengths``);
- ``ray_numpy``: ``integrations.ray.read(path).iter_batches(batch_size=B)`` (numpy
  batches: ragged ``input_ids`` as an object array of arrays), ``ray.init(num_cpus=C)``;
- ``ray_torch``: the same through ``iter_torch_batches`` with an ``ArrowBatchCollateFn``
  over ``integrations.ray.arrow_batch`` (``input_ids`` padded plus ``input_ids_lengths``,
  as ShardStream gives them: the Ray Train path of docs/scaling.md).

Each run reads two epochs. ``cold``: the clock starts after the driver's imports and
``ray.init`` (timed apart, ``init_s``) and stops after the last batch, so reader
creation, worker start-up (DataLoader forks; Ray workers importing Ray Data and
shardstream on their first task) and the first batch count. ``warm``: the second
epoch in the same process (ShardStream's persistent workers; the same Ray Dataset
executed again). Prints one JSON line per epoch, then per epoch kind a summary: the
median ``samples_per_s`` per mode and ``ratio`` = each Ray mode's median / ShardStream's.

``--refresh-ray-limits`` is a diagnostic, not a setting: Ray Data (2.60) starts every
execution with zero resource limits (the autoscaling coordinator's answer arrives
asynchronously and the limits are cached for ``ResourceManager.
GLOBAL_LIMITS_UPDATE_INTERVAL_S`` = 1 s), so for its first second it runs one read task
at a time; a sub-second epoch is read serially. The flag sets that private attribute
to 0 in the Ray runs (limits re-read every scheduling step, two tasks at once from the
start) to measure what the serial start costs; the lines then carry
``"refresh_ray_limits": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from stream import SIZES, ensure_written  # noqa: E402

COMMON = r"""
import json, time
import numpy as np
import torch
def finish(mode, n, t0, first):
    dt = time.perf_counter() - t0
    return dict(mode=mode, n=n, seconds=round(dt, 3), first_batch_s=round(first, 3),
                samples_per_s=round(n / dt),
                steady_samples_per_s=round((n - {batch}) / (dt - first)))
"""

SHARDSTREAM = COMMON + r"""
import shardstream.pytorch.loader as L
from shardstream.pytorch.stream import ShardStream
t0 = time.perf_counter()
ds = ShardStream({path!r}, batch_size={batch})
dl = L.loader(ds, num_workers={workers})  # persistent workers: epoch 2 reuses them
for epoch in ("cold", "warm"):
    if epoch == "warm":
        ds.set_epoch(1)
        t0 = time.perf_counter()
    n, first = 0, None
    for b in dl:
        first = time.perf_counter() - t0 if first is None else first
        n += len(b["id"])
    print(json.dumps(dict(finish("shardstream", n, t0, first), epoch=epoch,
                          workers={workers})))
"""

RAY = COMMON + r"""
import ray
from shardstream.integrations import ray as ssray
if {refresh}:  # diagnostic (see the module docs): a private Ray attribute
    from ray.data._internal.execution.resource_manager import ResourceManager
    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = 0
t = time.perf_counter()
ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False,
         logging_level="ERROR", configure_logging=False)
ray.data.DataContext.get_current().enable_progress_bars = False
init_s = time.perf_counter() - t

from ray.data.collate_fn import ArrowBatchCollateFn
from shardstream.integrations.ray import arrow_batch

class Collate(ArrowBatchCollateFn):  # as in docs/scaling.md
    def __call__(self, table):
        return {{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in arrow_batch(table).items()}}

t0 = time.perf_counter()
ds = ssray.read({path!r})
for epoch in ("cold", "warm"):  # warm: the same Dataset executed again
    if epoch == "warm":
        t0 = time.perf_counter()
    if {mode!r} == "ray_torch":
        it = ds.iter_torch_batches(batch_size={batch}, collate_fn=Collate())
    else:
        it = ds.iter_batches(batch_size={batch})
    n, first = 0, None
    for b in it:
        first = time.perf_counter() - t0 if first is None else first
        n += len(b["id"])
    extra = dict(refresh_ray_limits=True) if {refresh} else {{}}
    print(json.dumps(dict(finish({mode!r}, n, t0, first), epoch=epoch, cpus={cpus},
                          init_s=round(init_s, 3), **extra)))
"""


def run(code: str) -> list[dict]:
    """Run ``code`` in a fresh interpreter; its JSON lines (one per epoch)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="tokens")
    ap.add_argument("--out", default="/tmp/shardstream-bench")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="shardstream,ray_numpy,ray_torch")
    ap.add_argument("--refresh-ray-limits", action="store_true",
                    help="diagnostic: Ray Data re-reads its resource limits every step")
    args = ap.parse_args()
    path = os.path.join(args.out, args.workload)
    ensure_written(args.workload, SIZES[args.workload], path)
    modes = args.modes.split(",")
    rates: dict[str, dict[str, list[float]]] = {"cold": {}, "warm": {}}
    for _ in range(args.repeat):
        for mode in modes:
            code = (SHARDSTREAM if mode == "shardstream" else RAY).format(
                path=path, batch=args.batch, workers=args.workers, cpus=args.cpus, mode=mode,
                refresh=args.refresh_ray_limits)
            for res in run(code):
                assert res["n"] == SIZES[args.workload], res
                print(json.dumps(res), flush=True)
                rates[res["epoch"]].setdefault(mode, []).append(res["samples_per_s"])
    for epoch, by_mode in rates.items():
        med = {m: statistics.median(r) for m, r in by_mode.items()}
        summary: dict = {"summary": args.workload, "epoch": epoch, "median_samples_per_s": med}
        if args.refresh_ray_limits:
            summary["refresh_ray_limits"] = True
        if "shardstream" in med:
            summary["ratio"] = {m: round(v / med["shardstream"], 3) for m, v in med.items()
                                if m != "shardstream"}
        print(json.dumps(summary), flush=True)

if __name__ == "__main__":
    main()
