"""Packing a Hugging Face dataset: shardstream vs HF's own ``save_to_disk``, same run.

usage: python benchmarks/hf_pack.py [--n 100000] [--rounds 3] [--workers 1,2] [--json FILE]

The data is tokens-like: ``input_ids`` (list of 96-160 int32, 128 on average), ``label``
(int) and ``text`` (str, 40 words), in a ``datasets.Dataset`` built from one Arrow table.
Every configuration runs once per round, into a fresh folder (its removal and an
``os.sync()`` before it untimed), the order rotated each round so that none always
follows the same one; the best round counts. Rates are rows/s; ratios are against save_to_disk of
the same in-memory dataset. shardstream fsyncs every shard by default and save_to_disk
does not: both shardstream rates are shown. ``write_shards(iter(ds))`` (the dicts HF
gives, the path before Arrow batches) runs in the first round only: it is slow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards "
         "quietly hex jolly frogs near big vexed zebras").split()


def tokens_table(n: int, seed: int = 0) -> Any:
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lens = rng.integers(96, 161, n)
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ids = rng.integers(0, 50_000, int(offs[-1]), dtype=np.int32)
    words = np.array(WORDS)
    text = [" ".join(words[ids[offs[i]:offs[i] + 40] % len(WORDS)]) for i in range(n)]
    return pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offs), pa.array(ids)),
                     "label": pa.array((ids[offs[:-1]] % 7).astype(np.int64)),
                     "text": pa.array(text)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="comma-separated write_shards workers")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import datasets

    import shardstream
    from shardstream.cli.commands import write_main
    from shardstream.write.parquet import arrow_source

    datasets.disable_progress_bars()
    n = args.n
    ds = datasets.Dataset(tokens_table(n))
    tmp = tempfile.mkdtemp(prefix="hf_pack-", dir=args.tmp)
    saved = os.path.join(tmp, "saved")
    ds.save_to_disk(saved)
    mapped = datasets.load_from_disk(saved)  # memory-mapped, as users usually hold one
    mb = sum(os.path.getsize(os.path.join(saved, f)) for f in os.listdir(saved)) / 1e6

    def ours(src: Any, **kw: Any) -> Callable[[str], Any]:
        return lambda out: shardstream.write_shards(src, out, **kw)

    runs: dict[str, Callable[[str], Any]] = {"HF save_to_disk": lambda out: ds.save_to_disk(out)}
    for w in map(int, args.workers.split(",")):
        runs[f"write_shards(ds) workers={w}"] = ours(ds, workers=w)
        runs[f"write_shards(ds) workers={w} fsync=False"] = ours(ds, workers=w, fsync=False)
    runs["write_shards(load_from_disk ds)"] = ours(mapped)
    runs["shardstream-write DIR"] = lambda out: write_main([saved, "-o", out, "-q"])
    runs["Arrow batches as dicts (no encoder)"] = lambda out: shardstream.write_shards(
        arrow_source(ds).items(0, n, encode=False), out)
    once = {"write_shards(iter(ds)) (HF's dicts)":
            lambda out: shardstream.write_shards(iter(ds), out)}

    best: dict[str, float] = {}
    for r in range(args.rounds):
        todo = list(dict(runs, **(once if r == 0 else {})).items())
        k = r % len(runs)  # each configuration in every position in turn
        for name, run in todo[k:len(runs)] + todo[:k] + todo[len(runs):]:
            out = os.path.join(tmp, f"out-{r}")
            os.sync()  # the last run's dirty pages are not written back during this one
            t = time.perf_counter()
            run(out)
            seconds = time.perf_counter() - t
            best[name] = min(best.get(name, seconds), seconds)
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)

    base = n / best["HF save_to_disk"]
    print(f"{n:,} rows, {mb:.1f} MB as Arrow; best of {args.rounds} rounds; "
          f"{os.cpu_count()} CPUs")
    print(f"{'configuration':44s} {'rows/s':>12s} {'vs save_to_disk':>16s}")
    results = {}
    for name, seconds in best.items():
        rate = n / seconds
        results[name] = {"seconds": seconds, "rows_per_s": rate, "ratio": rate / base}
        print(f"{name:44s} {rate:12,.0f} {rate / base:15.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "arrow_mb": mb, "rounds": args.rounds, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
