"""Streaming from S3 vs local disk: one epoch through ``shardstream.loader``, same run.

usage: python benchmarks/remote_read.py [--n 100000] [--shard-mb 32] [--workers 2]
                                        [--batch 256] [--no-shuffle] [--repeat 3]

Writes the harness's ``tokens`` workload (``../shared/bench/workloads.py``) to
a local directory, starts SeaweedFS on 127.0.0.1 (``tests/servers.py``),
uploads the same shards to ``s3://bench/tokens``, then alternates one-epoch
reads, each in a fresh process: local disk, S3 with a cold (empty) cache dir,
S3 again with that cache warm. Prints one JSON line per read: ``samples_per_s``
and ``mb_per_s`` (whole epoch, loader creation included), ``first_batch_s``,
``steady_samples_per_s`` (after the first batch), ``construct_s`` (imports and
``ShardStream(...)``: for S3 the manifest request, and the s3fs import where reads
go through s3fs, e.g. with ``SHARDSTREAM_S3_LITE=0``), and a
summary with the S3/local ratios (medians), the timed figures all counted from
the start of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from shardstream.storage import io, urls

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(ROOT, "..", "shared", "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

READ = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {here!r})
from common import epoch
import shardstream
ds = shardstream.ShardStream({src!r}, batch_size={batch}, shuffle={shuffle},
                             cache_dir={cache!r}, storage_options={opts!r})
built = time.perf_counter() - t0
r = epoch(shardstream.loader(ds, num_workers={workers}), t0)
r["construct_s"] = built
print(json.dumps({{k: r[k] for k in ("seconds", "first_batch_s", "n",
                                     "steady_samples_per_s", "construct_s")}}))
"""


def _write(n: int, out: str, shard_mb: int) -> int:
    sys.path.insert(0, os.path.abspath(BENCH))
    from shardstream.write.writer import ShardWriter

    from workloads import WORKLOADS

    if os.path.exists(os.path.join(out, "manifest.json")):
        with open(os.path.join(out, "manifest.json")) as f:
            doc = json.load(f)
        if doc.get("num_samples") == n and len(doc["shards"]) == -(-_bytes(out) // (
                shard_mb << 20)):
            return _bytes(out)
    with ShardWriter(out, overwrite=True, fsync=False, max_bytes=shard_mb << 20) as w:
        for s in WORKLOADS["tokens"](n, seed=0):
            w.write(s)
    return _bytes(out)


def _bytes(out: str) -> int:
    return sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
               if f.endswith(".tar"))


def _upload(local: str, url: str, opts: dict) -> None:
    names = sorted(n for n in os.listdir(local) if n != "manifest.json")
    for name in names + ["manifest.json"]:  # the manifest last, as the writer does
        io.put_file(os.path.join(local, name), urls.join(url, name), storage_options=opts)


def _read(src: str, args: argparse.Namespace, cache: str, opts: dict | None) -> dict:
    code = READ.format(src=src, batch=args.batch, shuffle=args.shuffle, workers=args.workers,
                       cache=cache, opts=opts, here=HERE)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--shard-mb", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="/tmp/shardstream-bench-remote")
    args = ap.parse_args()
    from servers import SeaweedFS

    local = os.path.join(args.out, "tokens")
    nbytes = _write(args.n, local, args.shard_mb)
    work = tempfile.mkdtemp(prefix="bench-s3-")
    server = SeaweedFS(work)
    server.start()
    try:
        opts = server.storage_options
        bucket = server.new_bucket("bench")
        url = f"s3://{bucket}/tokens"
        _upload(local, url, opts)
        rows: dict[str, list[dict]] = {"local": [], "s3_cold": [], "s3_warm": []}
        for _ in range(args.repeat):
            cache = tempfile.mkdtemp(prefix="bench-cache-")
            for mode, src, o in (("local", local, None), ("s3_cold", url, opts),
                                 ("s3_warm", url, opts)):
                r = _read(src, args, cache, o)
                r.update(mode=mode, samples_per_s=r["n"] / r["seconds"],
                         mb_per_s=nbytes / 1e6 / r["seconds"])
                rows[mode].append(r)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in r.items()}), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
        med = {m: {k: statistics.median(r[k] for r in rs) for k in
                   ("samples_per_s", "mb_per_s", "first_batch_s", "steady_samples_per_s",
                    "construct_s")}
               for m, rs in rows.items()}
        summary = {"n": args.n, "dataset_mb": round(nbytes / 1e6, 1), "shard_mb": args.shard_mb,
                   "shuffle": args.shuffle, "workers": args.workers, "batch": args.batch,
                   "median": {m: {k: round(v, 3) for k, v in d.items()} for m, d in med.items()}}
        for m in ("s3_cold", "s3_warm"):
            summary[f"{m}_vs_local_samples_per_s"] = round(
                med[m]["samples_per_s"] / med["local"]["samples_per_s"], 3)
            summary[f"{m}_first_batch_vs_local"] = round(
                med[m]["first_batch_s"] / med["local"]["first_batch_s"], 3)
        print(json.dumps({"summary": summary}), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
