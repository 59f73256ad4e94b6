"""Random access and map-style DataLoader throughput of ShardDataset.

    python benchmarks/random_access.py [--dir DIR] [--workload tokens] [--n 100000]

Writes the workload from /work/shared/bench/workloads.py into DIR (reused
when DIR already holds it), then prints JSON lines:

- ``getitem``: ``ds[i]`` for 20,000 random i (the same draws as
  /work/shared/bench/random_access.py: ``default_rng(1).integers(0, n, 20000)``),
  one process, page cache warm (one untimed pass first);
- ``dataloader``: one epoch of ``DataLoader(ShardDataset, shuffle=True,
  num_workers=2, batch_size=256)``, steady-state samples/s counted like the
  peer harness: (n - batch) / (seconds - first_batch_s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(HERE, "..", "..", "shared", "bench"))
sys.path.insert(0, HERE)
from common import best_getitem_rate  # noqa: E402


def write(directory: str, workload: str, n: int) -> None:
    from shardstream.storage.io import load_manifest
    from shardstream.write.writer import ShardWriter
    try:
        if load_manifest(directory).num_samples == n:
            return
    except Exception:
        pass
    sys.path.insert(0, BENCH)
    from workloads import WORKLOADS
    t = time.perf_counter()
    with ShardWriter(directory, overwrite=True, fsync=False) as w:
        for s in WORKLOADS[workload](n):
            w.write(s)
    print(json.dumps({"mode": "write", "workload": workload, "n": n,
                      "seconds": round(time.perf_counter() - t, 3)}), flush=True)


def pad_collate(samples: list[dict]) -> dict:
    """Dicts -> dict of tensors; var-length 1-d arrays right-padded (as the peers)."""
    import torch
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        v0 = vals[0]
        if isinstance(v0, (bytes, str)):
            out[k] = vals
        elif isinstance(v0, int):
            out[k] = torch.tensor(vals, dtype=torch.int64)
        elif isinstance(v0, float):
            out[k] = torch.tensor(vals, dtype=torch.float64)
        elif all(a.shape == v0.shape for a in vals):
            out[k] = torch.from_numpy(np.stack(vals))
        else:
            buf = np.zeros((len(vals), max(len(a) for a in vals)), dtype=v0.dtype)
            for i, a in enumerate(vals):
                buf[i, :len(a)] = a
            out[k] = torch.from_numpy(buf)
    return out


def bench_getitem(directory: str, workload: str) -> dict:
    from shardstream.pytorch.random_access import ShardDataset
    t = time.perf_counter()
    ds = ShardDataset(directory)
    n = len(ds)
    idx = np.random.default_rng(1).integers(0, n, 20000).tolist()
    ds[0]
    open_s = time.perf_counter() - t
    best = best_getitem_rate(ds, idx)
    return {"mode": "getitem", "system": "shardstream", "workload": workload, "n": n,
            "random_getitem_per_s": round(best), "open_s": round(open_s, 4),
            "index_bytes_per_sample": round(ds.index_nbytes() / n, 2)}


def bench_dataloader(directory: str, workload: str, batch: int, workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from shardstream.pytorch.random_access import ShardDataset
    try:
        from shardstream.pytorch.collation import collate  # type: ignore[attr-defined]
        which = "shardstream.collate"
    except ImportError:
        collate, which = pad_collate, "local pad_collate"
    torch.manual_seed(0)
    ds = ShardDataset(directory)
    n = len(ds)
    t = time.perf_counter()
    first = None
    seen = 0
    for b in DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        collate_fn=collate, persistent_workers=False):
        if first is None:
            first = time.perf_counter() - t
        seen += len(next(iter(b.values())))
    secs = time.perf_counter() - t
    if seen != n:
        raise RuntimeError(f"saw {seen} samples of {n}")
    return {"mode": "dataloader", "system": "shardstream", "workload": workload, "n": n,
            "workers": workers, "batch": batch, "collate": which, "seconds": round(secs, 3),
            "first_batch_s": round(first or 0.0, 3), "samples_per_s": round(n / secs),
            "steady_samples_per_s": round((n - batch) / (secs - (first or 0.0)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/ss-bench/tokens")
    ap.add_argument("--workload", default="tokens")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    write(a.dir, a.workload, a.n)
    print(json.dumps(bench_getitem(a.dir, a.workload)), flush=True)
    print(json.dumps(bench_dataloader(a.dir, a.workload, a.batch, a.workers)), flush=True)


if __name__ == "__main__":
    main()
