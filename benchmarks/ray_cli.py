"""The CLI's packing engines side by side: `--engine ray` vs the local `--workers 2`.

    python benchmarks/ray_cli.py [--n 100000] [--repeat 3]

Writes the harness's `tokens` workload as JSONL once, starts a local Ray
runtime (`ray.init(num_cpus=2)`, as a running cluster would be), then packs
the same file alternately with the local process pool and with Ray, both
through the CLI's own code path, and prints the median ratio local/ray
(target >= 0.70: Ray's overhead stays small).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(HERE, "..", "..", "shared", "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import ray
    import ray.data

    from shardstream.cli.commands import main as cli
    from shardstream.integrations.ray import write_inputs_with_ray

    root = tempfile.mkdtemp(prefix="ss-ray-cli-")
    src = os.path.join(root, "tokens.jsonl")
    sys.path.insert(0, BENCH)
    from workloads import WORKLOADS
    with open(src, "w") as f:
        for s in WORKLOADS["tokens"](args.n, seed=0):
            f.write(json.dumps({k: v.tolist() if hasattr(v, "tolist") else v
                                for k, v in s.items()}) + "\n")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    local, remote = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        cli(["write", src, "-o", os.path.join(root, "local"), "--overwrite", "--workers", "2",
             "-q"])
        local.append(time.perf_counter() - t)
        t = time.perf_counter()
        write_inputs_with_ray([src], os.path.join(root, "ray"), address=None,
                              allow_pickle=False, parts=2, overwrite=True)
        remote.append(time.perf_counter() - t)
    ratio = statistics.median(local) / statistics.median(remote)
    print(json.dumps({"n": args.n, "local_workers2_s": [round(x, 2) for x in local],
                      "ray_s": [round(x, 2) for x in remote],
                      "ratio_local_over_ray": round(ratio, 2)}))


if __name__ == "__main__":
    main()
