"""CPU-time A/B of two code states on one machine: ``ds[i]``, ShardWriter and the CLI.

usage: python benchmarks/cpu_ab.py --base REV [--rounds 2]

Wall-clock rates on a shared 2-core machine swing by +-40 %; CPU time spent per
sample swings much less. For each of ``getitem`` (random ``ds[i]``, 20k reads),
``write`` (ShardWriter, in memory -> shards) and ``cli`` (``shardstream-write`` from
JSONL, one process; its CPU time from ``getrusage``) on the ``tabular`` and
``tokens`` workloads of the peer harness, it runs base and head alternately, each in a
fresh process that imports only the public API of that tree (so the same script
measures both), and prints samples per CPU second (best of the runs in each process)
and the head/base ratio of the best rates. See also ``ab.py`` (wall clock, streaming).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(ROOT, "..", "shared", "bench"))
sys.path.insert(0, HERE)
from ab import export  # noqa: E402  (the same git-archive export as the wall-clock A/B)

SIZES = {"tabular": 100_000, "tokens": 30_000}


def worker(tree: str, what: str, name: str, data: str) -> float:
    """Samples per CPU second of ``what`` with the package in ``tree``."""
    sys.path[:0] = [tree, BENCH]
    import numpy as np

    import shardstream

    from workloads import WORKLOADS

    assert shardstream.__file__.startswith(tree), shardstream.__file__
    n = SIZES[name]
    d = os.path.join(data, f"{name}-{os.path.basename(tree)}")
    if not os.path.exists(d):
        with shardstream.ShardWriter(d, fsync=False) as w:
            for s in WORKLOADS[name](n):
                w.write(s)
    best = 0.0
    if what == "getitem":
        ds = shardstream.ShardDataset(d)
        idx = np.random.default_rng(1).integers(0, len(ds), 20000).tolist()
        ds[0]
        for _ in range(5):
            t = time.process_time()
            for i in idx:
                ds[i]
            best = max(best, len(idx) / (time.process_time() - t))
    elif what == "write":
        samples = list(WORKLOADS[name](n // 2))
        for _ in range(3):
            out = tempfile.mkdtemp(dir=data)
            t = time.process_time()
            with shardstream.ShardWriter(os.path.join(out, "x"), fsync=False) as w:
                for s in samples:
                    w.write(s)
            best = max(best, len(samples) / (time.process_time() - t))
            shutil.rmtree(out)
    else:
        src = os.path.join(data, f"{name}.jsonl")
        if not os.path.exists(src):
            sys.path.insert(0, HERE)
            from write import make_jsonl
            make_jsonl(name, n // 2, src)
        code = "import sys; from shardstream.cli import write_main; sys.exit(write_main())"
        for _ in range(3):
            out = tempfile.mkdtemp(dir=data)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-c", code, src, "-o", os.path.join(out, "x")],
                           check=True, capture_output=True, env={**os.environ, "PYTHONPATH": tree})
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            best = max(best, (n // 2) / cpu)
            shutil.rmtree(out)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", nargs=4, metavar=("TREE", "WHAT", "WORKLOAD", "DATA"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(worker(*a.worker))
        return
    if not a.base:
        ap.error("--base is required")
    with tempfile.TemporaryDirectory(prefix="ss-cpu-ab-") as tmp:
        base = os.path.join(tmp, "base")
        os.makedirs(base)
        trees = {"base": export(a.base, base), "head": ROOT}
        print(f"{'figure':18} {'base (samples per CPU s)':>26} {'head':>22} {'head/base':>9}")
        for name in SIZES:
            for what in ("getitem", "write", "cli"):
                got: dict[str, list[float]] = {"base": [], "head": []}
                for k in range(a.rounds):
                    for tree in (("base", "head") if k % 2 == 0 else ("head", "base")):
                        out = subprocess.run([sys.executable, __file__, "--worker",
                                              trees[tree], what, name, tmp], check=True,
                                             capture_output=True, text=True).stdout
                        got[tree].append(float(out.split()[-1]))
                b, h = max(got["base"]), max(got["head"])
                print(f"{what + ' ' + name:18} {' '.join(f'{v:.0f}' for v in got['base']):>26} "
                      f"{' '.join(f'{v:.0f}' for v in got['head']):>22} {h / b:9.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
