"""Packing benchmark: throughput, size on disk, worker scaling, writer memory.

usage: python benchmarks/write.py [--workloads tabular,tokens,vectors] [--n N]
                                  [--out DIR] [--peers /tmp/peers-venv/bin/python]
                                  [--memory] [--json FILE]

Each measurement runs in a fresh process. Workloads come from
``$SHARDSTREAM_BENCH`` (default ``../shared/bench``, the peer harness), so
the same dicts go through every system. With ``--peers``, HF datasets
``from_generator + save_to_disk`` (the peer to beat for packing) runs in the
same session through the harness's ``peers.py``. Compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("SHARDSTREAM_BENCH",
                       os.path.join(HERE, "..", "..", "shared", "bench"))

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {bench!r})
from workloads import WORKLOADS
import shardstream
mode, name, n, out, workers = {mode!r}, {name!r}, {n}, {out!r}, {workers}
gen = WORKLOADS[name](n, seed=0)
if mode == "raw":
    from shardstream.format.encode import encode_sample
    t = time.perf_counter()
    nbytes = sum(len(encode_sample(s)) for s in gen)
    print(json.dumps({{"raw_msgpack_bytes": nbytes, "encode_s": time.perf_counter() - t}}))
    sys.exit()
if mode == "cli":
    # the CLI path: workers read their own byte range of a JSONL file
    from shardstream.cli.commands import main
    t = time.perf_counter()
    rc = main(["write", {src!r}, "-o", out, "--workers", str(workers), "-q", "--overwrite"])
    dt = time.perf_counter() - t
else:
    data = list(gen) if mode == "list" else gen   # "gen": generation timed too, as for HF
    t = time.perf_counter()
    shardstream.write_shards(data, out, workers=workers, overwrite=True)
    dt = time.perf_counter() - t
size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": dt, "samples_per_s": n / dt, "bytes": size, "peak_rss": rss}}))
"""


def child(mode: str, name: str, n: int, out: str, workers: int = 1, src: str = "") -> dict:
    code = CHILD.format(bench=BENCH, mode=mode, name=name, n=n, out=out, workers=workers,
                        src=src)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def peer_write(py: str, system: str, name: str, n: int, out: str) -> dict:
    """One peer write in its own process; HF gets an empty cache (from_generator would
    otherwise return a dataset cached by an earlier run without generating anything)."""
    shutil.rmtree(out, ignore_errors=True)
    cache = tempfile.mkdtemp(prefix="ss-bench-hf-cache-")
    env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_HOME=cache)
    try:
        r = subprocess.run([py, os.path.join(BENCH, "peers.py"), "write", system, name, str(n),
                            out], capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if not lines:
        return {"error": r.stderr[-500:]}
    return json.loads(lines[-1])


def make_jsonl(name: str, n: int, path: str) -> None:
    """The same workload as JSONL (arrays as lists) for the CLI path."""
    sys.path.insert(0, BENCH)
    from workloads import WORKLOADS
    with open(path, "w") as f:
        for s in WORKLOADS[name](n, seed=0):
            f.write(json.dumps({k: v.tolist() if hasattr(v, "tolist") else v
                                for k, v in s.items()}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="tabular,tokens")
    ap.add_argument("--n", type=int, default=None, help="samples (default: harness sizes)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--peers", default=None, help="python of the peers venv")
    ap.add_argument("--memory", action="store_true", help="peak RSS at 100k vs 1M tabular")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, BENCH)
    from workloads import SIZES

    root = args.out or tempfile.mkdtemp(prefix="ss-bench-")
    results = []

    def emit(row: dict) -> None:
        results.append(row)
        print(json.dumps(row), flush=True)

    for name in args.workloads.split(","):
        n = args.n or SIZES[name]
        out = os.path.join(root, f"ss-{name}")
        raw = child("raw", name, n, out)
        one = child("gen", name, n, out, 1)
        l1 = child("list", name, n, out, 1)
        l2 = child("list", name, n, out, 2)
        emit({"workload": name, "n": n, "raw_msgpack_bytes": raw["raw_msgpack_bytes"],
              "bytes": one["bytes"], "size_ratio": round(one["bytes"] / raw["raw_msgpack_bytes"], 4),
              "generator_w1_samples_per_s": round(one["samples_per_s"]),
              "list_w1_samples_per_s": round(l1["samples_per_s"]),
              "list_w2_samples_per_s": round(l2["samples_per_s"]),
              "w2_over_w1": round(l2["samples_per_s"] / l1["samples_per_s"], 2)})
        src = os.path.join(root, f"{name}.jsonl")
        if not os.path.exists(src):
            make_jsonl(name, n, src)
        c1 = child("cli", name, n, out, 1, src)
        c2 = child("cli", name, n, out, 2, src)
        emit({"workload": name, "path": "cli jsonl", "w1_samples_per_s": round(c1["samples_per_s"]),
              "w2_samples_per_s": round(c2["samples_per_s"]),
              "w2_over_w1": round(c2["samples_per_s"] / c1["samples_per_s"], 2)})
        if args.peers:
            hf = peer_write(args.peers, "hf", name, n, os.path.join(root, f"hf-{name}"))
            if "samples_per_s" in hf:
                emit({"workload": name, "peer": "hf from_generator+save_to_disk",
                      "samples_per_s": hf["samples_per_s"], "bytes": hf["bytes"],
                      "shardstream_over_hf": round(one["samples_per_s"] / hf["samples_per_s"], 2)})
    if args.memory:
        for n in (100_000, 1_000_000):
            r = child("gen", "tabular", n, os.path.join(root, "mem"), 1)
            emit({"memory": "tabular", "n": n, "peak_rss_mb": round(r["peak_rss"] / 2**20, 1)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
