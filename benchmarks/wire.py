"""Shared-memory hand-over benchmark: two versions of ``shardstream/wire.py``, same run.

usage: python benchmarks/wire.py --old PATH|REV [--new PATH] [--workload tokens]
                                 [--rounds 4] [--workers 2] [--batch 256] [--out DIR]
                                 [--micro 2000]

Writes the workload as ``benchmarks/stream.py`` does (into ``DIR/<workload>``
unless it is there), then reads one epoch per run through ``shardstream.loader``
in a fresh process whose ``shardstream.pytorch.wire`` is loaded from ``--old`` or
``--new`` (default: this checkout's), alternating old/new and which goes first,
``--rounds`` times. Prints one JSON line per run (as ``benchmarks/stream.py``)
and a summary line: the median of each variant and the ratio new/old of
``samples_per_s``, ``steady_samples_per_s`` and the CPU per batch of the main
process and of the workers (steadier than rates on a shared machine), and the
median over rounds of the ratio within a round (``paired_ratio_new_old``).

``--micro N`` also times the hand-over alone in one process: N batches of the
workload's shape packed into a slot, pickled as the result queue does, made
tensors and dropped (slot handed back); 20 windows of N, old and new
alternately; the minimum wall and CPU time per batch of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from stream import BENCH, READ, SIZES, ensure_written  # noqa: E402

# both variants load their wire.py the same way, before the clock starts
LOAD = r"""
import importlib.util, sys
import shardstream
spec = importlib.util.spec_from_file_location("shardstream.pytorch.wire", {path!r})
mod = importlib.util.module_from_spec(spec)
sys.modules["shardstream.pytorch.wire"] = mod
spec.loader.exec_module(mod)
"""

MICRO = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import numpy as np
import torch.multiprocessing  # registers the tensor reductions
from multiprocessing.reduction import ForkingPickler
from workloads import WORKLOADS
from shardstream.pytorch.collation import collate
mods = {{}}
for name, path in (("old", {old!r}), ("new", {new!r})):
    spec = importlib.util.spec_from_file_location("shardstream.pytorch.wire", path)
    mods[name] = mod = importlib.util.module_from_spec(spec)
    sys.modules["shardstream.pytorch.wire"] = mod
    spec.loader.exec_module(mod)
    mod._in_worker = lambda: True
samples = list(WORKLOADS[{name!r}]({batch}, seed=0))
tree = mods["new"]._numpy_tree(collate(samples))
def run(mod, n):
    sys.modules["shardstream.pytorch.wire"] = mod  # what the pickles name
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        b = mod.from_wire(ForkingPickler.loads(ForkingPickler.dumps(mod.to_wire(tree))))
        del b
    return (time.perf_counter() - t) / n * 1e6, (time.process_time() - c) / n * 1e6
wall = {{"old": [], "new": []}}
cpu = {{"old": [], "new": []}}
for name in ("old", "new"):
    run(mods[name], 50)
for r in range(20):  # many short windows, alternating: the quiet ones give the minimum
    for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
        w, c = run(mods[name], {n})
        wall[name].append(w)
        cpu[name].append(c)
print(json.dumps({{"mode": "micro", "workload": {name!r}, "batch": {batch}, "n": {n},
                  "windows": 20,
                  "us_per_batch_old": round(min(wall["old"]), 1),
                  "us_per_batch_new": round(min(wall["new"]), 1),
                  "ratio_new_old": round(min(wall["new"]) / min(wall["old"]), 3),
                  "cpu_us_per_batch_old": round(min(cpu["old"]), 1),
                  "cpu_us_per_batch_new": round(min(cpu["new"]), 1),
                  "cpu_ratio_new_old": round(min(cpu["new"]) / min(cpu["old"]), 3)}}))
"""

METRICS = ("samples_per_s", "steady_samples_per_s", "cpu_ms_per_batch_main",
           "cpu_ms_per_batch_workers")


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wire_file(old: str) -> str:
    """``old`` itself when it is a file, else ``shardstream/wire.py`` at that git revision."""
    if os.path.isfile(old):
        return os.path.abspath(old)
    src = subprocess.run(["git", "-C", HERE, "show", f"{old}:shardstream/wire.py"],
                         capture_output=True, text=True)
    if src.returncode:
        sys.exit(f"--old {old}: neither a file nor a git revision ({src.stderr.strip()})")
    fd, path = tempfile.mkstemp(prefix="wire-old-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(src.stdout)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True,
                    help="the wire.py to compare against: a path, or a git revision of this "
                         "checkout (e.g. 9b2b5be, the pipe-less flag hand-over)")
    ap.add_argument("--new", default=os.path.join(HERE, "..", "shardstream", "wire.py"))
    ap.add_argument("--workload", default="tokens")
    ap.add_argument("--out", default="/tmp/shardstream-bench")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--micro", type=int, default=0, help="batches per in-process timing")
    args = ap.parse_args()
    paths = {"old": _wire_file(args.old), "new": os.path.abspath(args.new)}
    if args.micro:
        print(json.dumps(_run("import importlib.util\n" + MICRO.format(
            bench=os.path.abspath(BENCH), old=paths["old"], new=paths["new"],
            name=args.workload, batch=args.batch, n=args.micro))), flush=True)
    out = os.path.join(args.out, args.workload)
    ensure_written(args.workload, SIZES[args.workload], out)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            res = _run(LOAD.format(path=paths[name]) + READ.format(
                out=out, batch=args.batch, shuffle=False, workers=args.workers,
                name=args.workload))
            res["wire"] = name
            runs[name].append(res)
            print(json.dumps(res), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in METRICS} for k, v in runs.items()}
    # the ratio within each round (old and new back to back), then its median: drift cancels
    paired = {m: statistics.median(n[m] / o[m] for o, n in zip(runs["old"], runs["new"]))
              for m in METRICS}
    print(json.dumps({"mode": "summary", "workload": args.workload, "workers": args.workers,
                      "rounds": args.rounds, "median_old": med["old"], "median_new": med["new"],
                      "ratio_new_old": {m: round(med["new"][m] / med["old"][m], 3)
                                        for m in METRICS},
                      "paired_ratio_new_old": {m: round(v, 3) for m, v in paired.items()}}),
          flush=True)


if __name__ == "__main__":
    main()
