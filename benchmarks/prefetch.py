"""Benchmark CUDAPrefetcher: copy bandwidth, overlap with compute, memory.

    python benchmarks/prefetch.py [--batch-mb 64] [--steps 200] [--depth 2] [--json OUT]

(a) raw pinned ``copy_(non_blocking=True)`` loop into preallocated device
    buffers: the host-to-device bandwidth ceiling;
(b) the same batches through CUDAPrefetcher (ratio b/a, target >= 0.90);
(c) a synthetic model step (matmuls on the current stream, calibrated to ~2x
    the copy time of one batch): share of wall time spent waiting for data,
    for a naive synchronous ``.to(device)`` loop, ``non_blocking`` copies on the
    compute stream, and CUDAPrefetcher (target <= 5%);
(d) ``torch.cuda.memory_allocated`` at start/end of the prefetcher run, and its peak.

Without a CUDA device it prints "no CUDA device; skipping" and exits with 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    from shardstream.pytorch.prefetch import CUDAPrefetcher, to_device
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from shardstream.pytorch.prefetch import CUDAPrefetcher, to_device

MB = 1 << 20


def host_batches(batch_bytes: int, count: int, pin: bool = True) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct (pinned) batches: uint8 images, float32 features, int64 labels."""
    n_img = batch_bytes // 2
    n_feat = (batch_bytes * 2 // 5) // 4
    n_lab = max(1, (batch_bytes - n_img - 4 * n_feat) // 8)
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        out.append({
            "image": torch.empty(n_img, dtype=torch.uint8, pin_memory=pin).random_(0, 256, generator=g),
            "features": torch.empty(n_feat, dtype=torch.float32, pin_memory=pin).normal_(generator=g),
            "labels": torch.empty(n_lab, dtype=torch.int64, pin_memory=pin).random_(0, 1000, generator=g),
        })
    return out


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn`` including all GPU work it queued."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run(dev: torch.device, batch_bytes: int, steps: int, depth: int) -> dict[str, Any]:
    """Run measurements (a)-(d) on ``dev``; returns the results as a JSON-able dict."""
    host = host_batches(batch_bytes, 4 if batch_bytes <= 256 * MB else 2, pin=dev.type == "cuda")
    nbytes = sum(t.nbytes for t in host[0].values())

    def source(n: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(n):
            yield host[i % len(host)]

    # (a) raw pinned copy_ loop into preallocated device buffers
    dst = {k: torch.empty_like(v, device=dev) for k, v in host[0].items()}

    def raw(n: int) -> None:
        for i in range(n):
            for k, v in host[i % len(host)].items():
                dst[k].copy_(v, non_blocking=True)

    raw(5)
    t_raw = timed(lambda: raw(steps), dev)
    bw_raw = steps * nbytes / t_raw / 1e9
    del dst

    # (b) the same batches through CUDAPrefetcher, nothing else on the GPU
    def drain(n: int) -> CUDAPrefetcher:
        p = CUDAPrefetcher(source(n), dev, depth=depth)
        for _ in p:
            pass
        return p

    drain(5)
    drained: list[CUDAPrefetcher] = []
    t_pf = timed(lambda: drained.append(drain(steps)), dev)
    bw_pf = steps * nbytes / t_pf / 1e9
    stats_b = drained[0].stats

    # (c) a synthetic model step of ~2x the copy time of one batch
    a = torch.randn(2048, 2048, device=dev)
    c = torch.empty_like(a)
    acc = torch.zeros((), device=dev)
    torch.mm(a, a, out=c)
    t_mm = timed(lambda: [torch.mm(a, a, out=c) for _ in range(20)], dev) / 20
    t_copy = nbytes / (bw_raw * 1e9)
    k = max(1, round(2 * t_copy / t_mm))

    def model_step(batch: dict[str, torch.Tensor]) -> None:
        for _ in range(k):
            torch.mm(a, a, out=c)
        acc.add_(batch["features"].sum())  # the step depends on the batch

    def compute_only() -> None:
        for _ in range(steps):
            model_step(resident)

    def naive(n: int = steps) -> None:
        for b in source(n):
            model_step(to_device(b, dev))

    def same_stream() -> None:
        for b in source(steps):
            model_step(to_device(b, dev, non_blocking=True))

    mem: dict[str, float] = {}

    def prefetched() -> None:
        mem["start_mb"] = torch.cuda.memory_allocated(dev) / MB
        torch.cuda.reset_peak_memory_stats(dev)
        with CUDAPrefetcher(source(steps), dev, depth=depth) as p:
            for b in p:
                model_step(b)
            del b
        torch.cuda.synchronize(dev)
        mem["end_mb"] = torch.cuda.memory_allocated(dev) / MB
        mem["peak_mb"] = torch.cuda.max_memory_allocated(dev) / MB

    resident = to_device(host[0], dev)
    model_step(resident)
    t_step = timed(lambda: [model_step(resident) for _ in range(10)], dev) / 10
    t_compute = timed(compute_only, dev)
    del resident
    naive(3)  # warm the allocator for the baselines (the prefetcher's stream was warmed in (b))
    loops = {"compute only (no data)": {"wall_s": t_compute, "data_wait_fraction": 0.0}}
    for name, fn in (("naive .to(device)", naive), ("non_blocking, one stream", same_stream),
                     ("CUDAPrefetcher", prefetched)):
        t = timed(fn, dev)
        loops[name] = {"wall_s": t, "data_wait_fraction": max(0.0, t - t_compute) / t}

    ratio = bw_pf / bw_raw
    wait_pf = loops["CUDAPrefetcher"]["data_wait_fraction"]
    return {
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
        "batch_bytes": nbytes, "steps": steps, "depth": depth,
        "raw_copy_gbps": bw_raw, "prefetcher_gbps": bw_pf, "ratio": ratio,
        "prefetcher_stats": dataclasses.asdict(stats_b), "prefetcher_stats_str": str(stats_b),
        "model_step_s": t_step, "matmul_s": t_mm, "matmuls_per_step": k, "copy_one_batch_s": t_copy,
        "loops": loops, "memory_mb": mem,
        "targets_met": {"ratio>=0.90": ratio >= 0.9, "wait<=5%": wait_pf <= 0.05},
    }


def report(r: dict[str, Any]) -> None:
    ok = r["targets_met"]
    mem = r["memory_mb"]
    print(f"CUDAPrefetcher benchmark on {r['device']} (torch {r['torch']})")
    print(f"batch {r['batch_bytes'] / MB:.1f} MB (3 pinned tensors), {r['steps']} steps, depth {r['depth']}\n")
    print(f"(a) raw pinned copy_ loop     {r['raw_copy_gbps']:8.2f} GB/s")
    print(f"(b) through CUDAPrefetcher    {r['prefetcher_gbps']:8.2f} GB/s   ratio {r['ratio']:.3f} "
          f"(target >= 0.90: {'ok' if ok['ratio>=0.90'] else 'MISS'})")
    print(f"    stats: {r['prefetcher_stats_str']}")
    print(f"\n(c) model step {r['model_step_s'] * 1e3:.2f} ms = {r['matmuls_per_step']} x matmul 2048^2 "
          f"({r['matmul_s'] * 1e3:.2f} ms each); copy of one batch {r['copy_one_batch_s'] * 1e3:.2f} ms")
    print(f"    {'loop':<28}{'wall s':>9}{'data wait':>11}")
    for name, row in r["loops"].items():
        print(f"    {name:<28}{row['wall_s']:9.3f}{row['data_wait_fraction'] * 100:10.1f}%")
    print(f"    CUDAPrefetcher target <= 5%: {'ok' if ok['wait<=5%'] else 'MISS'}")
    peak_batches = (mem["peak_mb"] - mem["start_mb"]) * MB / r["batch_bytes"]
    print(f"\n(d) memory_allocated: start {mem['start_mb']:.1f} MB, end {mem['end_mb']:.1f} MB, "
          f"peak {mem['peak_mb']:.1f} MB (+{peak_batches:.2f} batches)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--batch-mb", type=float, default=64.0, help="MB per batch (default 64)")
    ap.add_argument("--steps", type=int, default=200, help="batches per measurement (default 200)")
    ap.add_argument("--depth", type=int, default=2, help="CUDAPrefetcher depth (default 2)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = ap.parse_args(argv)
    if args.batch_mb <= 0 or args.steps < 1 or args.depth < 1:
        ap.error("--batch-mb must be > 0, --steps and --depth >= 1")
    if not torch.cuda.is_available():
        print("no CUDA device; skipping")
        return 0
    dev = torch.device("cuda", torch.cuda.current_device())
    results = run(dev, int(args.batch_mb * MB), args.steps, args.depth)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
