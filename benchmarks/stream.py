"""Streaming read benchmark: one epoch through ``shardstream.loader`` into tensors.

usage: python benchmarks/stream.py [--workloads tokens,tabular] [--out DIR]
                                   [--workers 2] [--batch 256] [--shuffle] [--repeat 1]

Writes each workload (``tokens`` 100k, ``tabular`` 400k from the peer
harness's ``workloads.py``) with ShardWriter into ``DIR/<workload>`` unless
it is already there, then reads one epoch per run in a fresh process and
prints one JSON line: ``samples_per_s`` (whole epoch, loader creation
included, as the peer harness measures), ``steady_samples_per_s`` (after
the first batch), ``first_batch_s``, the peak RSS of each worker, and the CPU
time per batch after the first in the main process and in all workers together
(``cpu_ms_per_batch_main`` / ``_workers``: steadier than rates on a shared machine).
Compare with ``run_peers.sh`` in the same session (ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(HERE, "..", "..", "shared", "bench"))
SIZES = {"tokens": 100_000, "tabular": 400_000, "vectors": 50_000, "images": 3_000}

WRITE = r"""
import sys, time, json
sys.path.insert(0, {bench!r})
from workloads import WORKLOADS
from shardstream.write.writer import ShardWriter
t = time.perf_counter()
with ShardWriter({out!r}, overwrite=True, fsync=False) as w:
    for s in WORKLOADS[{name!r}]({n}, seed=0):
        w.write(s)
print(json.dumps({{"mode": "write", "workload": {name!r}, "n": {n},
                  "seconds": round(time.perf_counter() - t, 3)}}))
"""

READ = r"""
import json, os, time
t0 = time.perf_counter()
import shardstream.pytorch.loader as L
from shardstream.pytorch.stream import ShardStream
ds = ShardStream({out!r}, batch_size={batch}, shuffle={shuffle})
dl = L.loader(ds, num_workers={workers})
def cpu_s(pid):
    try:
        with open(f"/proc/{{pid}}/stat") as f:
            p = f.read().rsplit(")", 1)[1].split()
        return (int(p[11]) + int(p[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0
n, nb, first = 0, 0, None
for b in dl:
    if first is None:
        first = time.perf_counter() - t0
        it = getattr(dl.dataloader, "_iterator", None)
        pids = [w.pid for w in getattr(it, "_workers", [])]
        c0, m0 = [cpu_s(p) for p in pids], time.process_time()
    n += len(b["id"])
    nb += 1
dt = time.perf_counter() - t0
# CPU per batch after the first (main process; each worker), robust to a busy machine
cpu_main = (time.process_time() - m0) / max(nb - 1, 1) * 1e3
cpu_workers = [(cpu_s(p) - c) / max(nb - 1, 1) * 1e3 for p, c in zip(pids, c0)]
rss = []
it = getattr(dl.dataloader, "_iterator", None)
for w in getattr(it, "_workers", []):
    try:
        with open(f"/proc/{{w.pid}}/status") as f:
            rss += [int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM")]
    except OSError:
        pass
print(json.dumps({{"mode": "read", "system": "shardstream", "workload": {name!r}, "n": n,
                  "workers": {workers}, "batch": {batch}, "shuffle": {shuffle},
                  "seconds": round(dt, 3), "first_batch_s": round(first, 3),
                  "samples_per_s": round(n / dt),
                  "steady_samples_per_s": round((n - {batch}) / (dt - first)),
                  "worker_peak_rss_mb": rss, "cpu_ms_per_batch_main": round(cpu_main, 3),
                  "cpu_ms_per_batch_workers": round(sum(cpu_workers), 3)}}))
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return proc.stdout.strip().splitlines()[-1]


def ensure_written(name: str, n: int, out: str) -> None:
    manifest = os.path.join(out, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            if json.load(f).get("num_samples") == n:
                return
    print(_run(WRITE.format(bench=os.path.abspath(BENCH), out=out, name=name, n=n)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="tokens,tabular")
    ap.add_argument("--out", default="/tmp/shardstream-bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    for name in args.workloads.split(","):
        out = os.path.join(args.out, name)
        ensure_written(name, SIZES[name], out)
        for _ in range(args.repeat):
            print(_run(READ.format(out=out, batch=args.batch, shuffle=args.shuffle,
                                   workers=args.workers, name=name)), flush=True)


if __name__ == "__main__":
    main()
