"""What constructing a stream over ``s3://`` costs beyond a local directory.

usage: python benchmarks/startup_remote.py [--rounds 5]

Starts SeaweedFS on 127.0.0.1 (``tests/servers.py``), writes one small dataset locally
and to S3, then per round, each in a fresh process with ``shardstream`` and torch
already imported: time ``ShardStream(local)`` and ``ShardStream("s3://...")`` (the
manifest request and obstore's import and client included). Prints the medians and
the difference in milliseconds.
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
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from shardstream.write.writer import ShardWriter  # noqa: E402

from servers import SeaweedFS  # noqa: E402

CHILD = r"""
import json, sys, time
import torch, shardstream
from shardstream import ShardStream
src, opts = sys.argv[1], json.loads(sys.argv[2])
t = time.perf_counter()
ShardStream(src, storage_options=opts or None, batch_size=32)
print(json.dumps({"ms": (time.perf_counter() - t) * 1000}))
"""


def _time(src: str, opts: dict, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, src, json.dumps(opts)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])["ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="startup-bench-")
    server = SeaweedFS(os.path.join(work, "weed"))
    server.start()
    try:
        opts = server.storage_options
        url = f"s3://{server.new_bucket('startup')}/ds"
        local = os.path.join(work, "ds")
        for out, o in ((local, None), (url, opts)):
            with ShardWriter(out, max_samples=1000, fsync=False, storage_options=o) as w:
                for i in range(20_000):
                    w.write({"id": i, "x": list(range(i % 7))})
        env = dict(os.environ)
        got: dict[str, list[float]] = {"local": [], "s3": []}
        for _ in range(a.rounds):
            got["local"].append(_time(local, {}, env))
            got["s3"].append(_time(url, opts, env))
        med = {k: round(statistics.median(v), 1) for k, v in got.items()}
        print(json.dumps({"rounds": got, "median_ms": med,
                          "s3_minus_local_ms": round(med["s3"] - med["local"], 1)}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
