"""Cost of the per-block checksum check (index v4) on reads: on vs off, same run.

    python benchmarks/checksum.py [--out /tmp/shardstream-bench] [--n 100000]
                                  [--workers 2] [--repeat 5] [--compress none]

Writes the ``tokens`` workload (the peer harness's ``workloads.py``, as
benchmarks/stream.py does; ``--compress zstd`` for a compressed copy), then
streams one epoch of ``ShardStream(batch_size=256)`` through
``shardstream.dataloader.loader(num_workers=2)`` in a fresh process per run,
alternating ``SHARDSTREAM_VERIFY_BLOCKS=1`` and ``=0`` ``--repeat`` times, and
``ds[i]`` over 20,000 random indexes (fresh ``ShardDataset``: blocks are hashed on
first touch in the untimed warm-up pass; best of 3), and, in one process, the CPU
time (``process_time``, best of ``max(repeat, 3)``, on/off alternated) of a
``BlockReader`` reading every sample in order with a 1 MiB block cache: the
steadiest figure on a shared machine. Prints one JSON line per run, then a
summary: medians on/off and their ratio for the whole-epoch rate, the steady rate
after the first batch and the workers' CPU per batch, plus xxh3_64 throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from stream import BENCH, READ, _run  # noqa: E402

WRITE = r"""
import sys, time, json
sys.path.insert(0, {bench!r})
from workloads import WORKLOADS
from shardstream.write.writer import ShardWriter
t = time.perf_counter()
with ShardWriter({out!r}, overwrite=True, fsync=False, compression={comp!r}) as w:
    for s in WORKLOADS["tokens"]({n}, seed=0):
        w.write(s)
print(json.dumps({{"mode": "write", "n": {n}, "compression": {comp!r},
                  "seconds": round(time.perf_counter() - t, 3)}}))
"""

GETITEM = r"""
import json, sys
import numpy as np
sys.path.insert(0, {here!r})
from common import best_getitem_rate
from shardstream.pytorch.random_access import ShardDataset
ds = ShardDataset({out!r})
idx = np.random.default_rng(1).integers(0, len(ds), 20000).tolist()
print(json.dumps({{"mode": "getitem", "verify": ds.verify_blocks,
                  "samples_per_s": round(best_getitem_rate(ds, idx))}}))
"""


INPROC = r"""
import json, time
import numpy as np
from shardstream.read.blocks import BlockReader
from shardstream.read.shards import shard_refs
from shardstream.read.dataset import open_dataset
ds = open_dataset({out!r})
shards = np.concatenate([np.full(s.num_samples, k) for k, s in enumerate(ds.manifest.shards)])
local = np.concatenate([np.arange(s.num_samples) for s in ds.manifest.shards])
best = {{}}
for rnd in range({rounds}):
    for verify in ((True, False) if rnd % 2 == 0 else (False, True)):
        r = BlockReader(shard_refs(ds), verify_blocks=verify, cache_bytes=1 << 20)
        t = time.process_time()
        for a in range(0, len(local), 256):
            r.read(shards[a:a + 256], local[a:a + 256])
        best[verify] = min(best.get(verify, 1e9), time.process_time() - t)
        r.close()
from shardstream.pytorch.random_access import ShardDataset
idx = np.random.default_rng(1).integers(0, len(local), 20000).tolist()
get = {{}}
sets = {{v: ShardDataset({out!r}, verify_blocks=v) for v in (True, False)}}
for v, rd in sets.items():
    for i in idx:  # warm: pages, maps, and (on) every touched block hashed once
        rd[i]
for rnd in range({rounds}):
    for verify in ((True, False) if rnd % 2 == 0 else (False, True)):
        rd = sets[verify]
        t = time.process_time()
        for i in idx:
            rd[i]
        get[verify] = min(get.get(verify, 1e9), time.process_time() - t)
print(json.dumps({{"mode": "inproc", "read_cpu_s_on": round(best[True], 4),
                  "read_cpu_s_off": round(best[False], 4),
                  "read_on_over_off_throughput": round(best[False] / best[True], 4),
                  "getitem_us_on": round(get[True] / len(idx) * 1e6, 3),
                  "getitem_us_off": round(get[False] / len(idx) * 1e6, 3),
                  "getitem_on_over_off_throughput": round(get[False] / get[True], 4)}}))
"""


def ensure_written(out: str, n: int, comp: str | None) -> None:
    manifest = os.path.join(out, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            doc = json.load(f)
        if doc.get("num_samples") == n and doc.get("version", 0) >= 4 and \
                (doc.get("compression") or {}).get("codec") == comp:
            return
    print(_run(WRITE.format(bench=os.path.abspath(BENCH), out=out, n=n, comp=comp)), flush=True)


def run_with(verify: bool, code: str) -> dict:
    os.environ["SHARDSTREAM_VERIFY_BLOCKS"] = "1" if verify else "0"
    try:
        row = json.loads(_run(code))
    finally:
        del os.environ["SHARDSTREAM_VERIFY_BLOCKS"]
    row["verify"] = verify
    print(json.dumps(row), flush=True)
    return row


def xxh3_gb_per_s() -> float:
    import xxhash
    data = os.urandom(64 << 10)
    t = time.perf_counter()
    for _ in range(8000):
        xxhash.xxh3_64_intdigest(data)
    return round(8000 * len(data) / (time.perf_counter() - t) / 1e9, 2)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/shardstream-bench")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compress", default="none", choices=["none", "zstd"])
    args = ap.parse_args()
    comp = None if args.compress == "none" else args.compress
    out = os.path.join(args.out, f"checksum-tokens-{args.compress}-{args.n}")
    ensure_written(out, args.n, comp)
    read = READ.format(out=out, batch=256, shuffle=False, workers=args.workers, name="tokens")
    rows: dict[bool, list[dict]] = {True: [], False: []}
    gets: dict[bool, list[dict]] = {True: [], False: []}
    for k in range(args.repeat):
        for verify in ((True, False) if k % 2 == 0 else (False, True)):  # alternate the order
            rows[verify].append(run_with(verify, read))
    for k in range(2):
        for verify in ((True, False) if k % 2 == 0 else (False, True)):
            gets[verify].append(run_with(verify, GETITEM.format(here=HERE, out=out)))
    inproc = json.loads(_run(INPROC.format(out=out, rounds=max(args.repeat, 3))))
    print(json.dumps(inproc), flush=True)
    summary: dict = {"mode": "summary", "workload": "tokens", "n": args.n,
                     "compression": args.compress, "workers": args.workers,
                     "repeat": args.repeat, "xxh3_64_gb_per_s": xxh3_gb_per_s()}
    for key in ("samples_per_s", "steady_samples_per_s", "cpu_ms_per_batch_workers"):
        on, off = median(rows[True], key), median(rows[False], key)
        summary[key] = {"on": on, "off": off, "on_over_off": round(on / off, 4)}
    on, off = max(r["samples_per_s"] for r in gets[True]), \
        max(r["samples_per_s"] for r in gets[False])
    summary["getitem_samples_per_s"] = {"on": on, "off": off, "on_over_off": round(on / off, 4)}
    summary["inproc_read_cpu"] = inproc
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
