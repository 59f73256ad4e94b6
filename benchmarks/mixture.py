"""Mixture read benchmark: 3 weighted sources vs one source of the same size, same run.

usage: python benchmarks/mixture.py [--out DIR] [--workers 2] [--batch 256]
                                    [--shuffle] [--repeat 3]

Writes the ``tokens`` workload (peer harness ``workloads.py``) once as one
100k-sample dataset and once as three sources of 50k / 30k / 20k (other
seeds), unless already there. Each run reads one epoch of 100k samples in a
fresh process through ``shardstream.loader`` (then ``--epochs - 1`` more with
the same persistent workers): ``single`` (the one dataset)
or ``mixture`` (weights 0.5/0.3/0.2, ``epoch_size=100000``, so every source
is read exactly once, with ``source_field``). Runs alternate to share the
machine's noise; one JSON line per run (``samples_per_s``: first epoch, start-up
included; ``steady_samples_per_s``: the later epochs), then a summary: median
first-epoch rates, ``ratio`` = mixture / single of those, and ``steady_ratio``
= median over run pairs of mixture / single steady rates (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(HERE, "..", "..", "shared", "bench"))
PARTS = {"tokens-a": (50_000, 1), "tokens-b": (30_000, 2), "tokens-c": (20_000, 3)}
WEIGHTS = [0.5, 0.3, 0.2]

WRITE = r"""
import sys, time, json
sys.path.insert(0, {bench!r})
from workloads import tokens
from shardstream.write.writer import ShardWriter
t = time.perf_counter()
with ShardWriter({out!r}, overwrite=True, fsync=False) as w:
    for s in tokens({n}, seed={seed}):
        w.write(s)
print(json.dumps({{"mode": "write", "out": {out!r}, "n": {n},
                  "seconds": round(time.perf_counter() - t, 3)}}))
"""

READ = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {here!r})
from common import epoch
import shardstream.pytorch.loader as L
from shardstream.pytorch.stream import ShardStream
kind = {kind!r}
if kind == "single":
    ds = ShardStream({single!r}, batch_size={batch}, shuffle={shuffle})
else:
    ds = ShardStream({parts!r}, weights={weights!r}, epoch_size=100_000, batch_size={batch},
                     shuffle={shuffle}, source_field="__source__")
dl = L.loader(ds, num_workers={workers})
r = epoch(dl, t0)
n, dt, first = r["n"], r["seconds"], r["first_batch_s"]
t1, n1 = time.perf_counter(), 0
for _ in range({epochs} - 1):  # later epochs: persistent workers, steady state
    for b in dl:
        n1 += len(b["id"])
dt1 = time.perf_counter() - t1
print(json.dumps({{"mode": "read", "system": "shardstream", "kind": kind, "workload": "tokens",
                  "n": n, "workers": {workers}, "batch": {batch}, "shuffle": {shuffle},
                  "seconds": round(dt, 3), "first_batch_s": round(first, 3),
                  "samples_per_s": round(n / dt),
                  "steady_samples_per_s": round(n1 / dt1) if n1 else None}}))
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return proc.stdout.strip().splitlines()[-1]


def ensure_written(out: str, n: int, seed: int) -> None:
    manifest = os.path.join(out, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            if json.load(f).get("num_samples") == n:
                return
    print(_run(WRITE.format(bench=os.path.abspath(BENCH), out=out, n=n, seed=seed)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/shardstream-bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    single = os.path.join(args.out, "tokens")
    ensure_written(single, 100_000, 0)
    parts = []
    for name, (n, seed) in PARTS.items():
        parts.append(os.path.join(args.out, name))
        ensure_written(parts[-1], n, seed)
    rates: dict[str, list[int]] = {"single": [], "mixture": []}
    steady: dict[str, list[int]] = {"single": [], "mixture": []}
    for _ in range(args.repeat):
        for kind in rates:
            line = _run(READ.format(kind=kind, single=single, parts=parts, weights=WEIGHTS,
                                    batch=args.batch, shuffle=args.shuffle,
                                    workers=args.workers, epochs=args.epochs, here=HERE))
            print(line, flush=True)
            rates[kind].append(json.loads(line)["samples_per_s"])
            steady[kind].append(json.loads(line)["steady_samples_per_s"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    pair = [m / s for m, s in zip(steady["mixture"], steady["single"]) if m and s]
    print(json.dumps({"mode": "summary", "workload": "tokens", "shuffle": args.shuffle,
                      "workers": args.workers, "batch": args.batch, "runs": args.repeat,
                      "single_samples_per_s": med["single"],
                      "mixture_samples_per_s": med["mixture"],
                      "ratio": round(med["mixture"] / med["single"], 3),
                      "steady_ratio": round(statistics.median(pair), 3) if pair else None}),
          flush=True)


if __name__ == "__main__":
    main()
