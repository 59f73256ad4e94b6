"""Compressed vs uncompressed shards: size on disk, streaming and random-access speed.

    python benchmarks/compression.py [--dir /tmp/ss-bench/compression] [--n 100000]
                                     [--stream-n 400000] [--level 3] [--repeat 3]

Everything in one run, JSON lines on stdout:

- ``size``: bytes on disk (shards + indexes) of ``tokens`` (the shared
  workload: ids uniform in [0, 50000)) written raw, then converted with
  ``shardstream convert`` to zstd; and the same for ``tokens_zipf`` (ids drawn
  from a Zipf law, like real token frequencies) and per field (ids / text);
- ``stream``: one epoch of ``ShardStream(batch_size=256)`` through
  ``shardstream.dataloader.loader(num_workers=2)``, each in a fresh process,
  raw and zstd alternated ``--repeat`` times, over ``--stream-n`` samples (the
  same workloads, written again when it differs from ``--n``: at 100k the
  steady part lasts ~0.3 s and is mostly noise): the best whole epoch (start-up
  included, as every stream benchmark here counts) and the median steady rate
  after the first batch (decoding cost alone);
- ``getitem``: 20,000 random ``ds[i]`` (``default_rng(1)``), warm, best of 3;
- ``frames``: size ratio and ``ds[i]`` for other ``frame_bytes`` (``tokens`` and
  the tiny-record ``tabular`` workload), and without the dictionary;
- ``write``: ShardWriter from the generator, raw vs zstd (dictionary training included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(HERE, "..", "..", "shared", "bench"))
sys.path.insert(0, BENCH)
sys.path.insert(0, HERE)
from common import best_getitem_rate  # noqa: E402


def tokens_zipf(n: int, seed: int = 0):
    """``tokens`` with Zipf-distributed ids (rank r has frequency ~ 1/r^1.1)."""
    from workloads import WORDS
    rng = np.random.default_rng(seed)
    perm = rng.permutation(50_000).astype(np.int32)  # frequent ids are not the small ones
    lens = rng.integers(32, 512, n)
    for i in range(n):
        ranks = np.minimum(rng.zipf(1.1, lens[i]), 50_000) - 1
        ids = perm[ranks]
        text = " ".join(WORDS[j % len(WORDS)] for j in ids[:40])
        yield {"id": i, "input_ids": ids, "label": int(ids[0] % 7), "text": text}


def disk_bytes(path: str) -> int:
    from shardstream.storage.io import load_manifest
    return load_manifest(path).total_bytes


def write(path: str, samples, **kw) -> float:
    from shardstream.write.writer import ShardWriter
    t = time.perf_counter()
    with ShardWriter(path, overwrite=True, fsync=False, **kw) as w:
        for s in samples:
            w.write(s)
    return time.perf_counter() - t


def emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


READ = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {here!r})
from common import epoch
import shardstream
dl = shardstream.loader(shardstream.ShardStream({path!r}, batch_size=256), num_workers=2)
r = epoch(dl, t0)
print(json.dumps({{"n": r["n"], "samples_per_s": r["samples_per_s"],
                  "steady": r["steady_samples_per_s"]}}))
"""


def stream_rate(path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", READ.format(path=path, here=HERE)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def getitem_rate(path: str) -> float:
    from shardstream.pytorch.random_access import ShardDataset
    ds = ShardDataset(path)
    idx = np.random.default_rng(1).integers(0, len(ds), 20000).tolist()
    return best_getitem_rate(ds, idx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/ss-bench/compression")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--stream-n", type=int, default=400_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from shardstream.write.convert import convert

    from workloads import tokens
    spec = f"zstd:{a.level}"
    paths = {}
    for name, gen in (("tokens", tokens), ("tokens_zipf", tokens_zipf)):
        raw, zst = os.path.join(a.dir, name), os.path.join(a.dir, name + "-zstd")
        secs = write(raw, gen(a.n))
        t = time.perf_counter()
        convert(raw, zst, compression=spec, overwrite=True, fsync=False)
        conv = time.perf_counter() - t
        rb, zb = disk_bytes(raw), disk_bytes(zst)
        emit({"mode": "size", "workload": name, "n": a.n, "compression": spec,
              "raw_bytes": rb, "zstd_bytes": zb, "ratio": round(rb / zb, 3),
              "write_raw_s": round(secs, 2), "convert_s": round(conv, 2)})
        paths[name] = (raw, zst)
    for field in ("input_ids", "text"):  # which part compresses (uniform ids)
        raw, zst = os.path.join(a.dir, field), os.path.join(a.dir, field + "-zstd")
        write(raw, ({"id": s["id"], field: s[field]} for s in tokens(a.n // 4)))
        convert(raw, zst, compression=spec, overwrite=True, fsync=False)
        emit({"mode": "size", "workload": f"tokens[{field}]", "n": a.n // 4,
              "compression": spec, "ratio": round(disk_bytes(raw) / disk_bytes(zst), 3)})
    streams = paths
    if a.stream_n != a.n:
        streams = {}
        for name, gen in (("tokens", tokens), ("tokens_zipf", tokens_zipf)):
            raw, zst = (os.path.join(a.dir, f"{name}-{a.stream_n}{sfx}") for sfx in ("", "-zstd"))
            write(raw, gen(a.stream_n))
            convert(raw, zst, compression=spec, overwrite=True, fsync=False)
            streams[name] = (raw, zst)
    for name, (raw, zst) in streams.items():
        runs: dict[str, list[dict]] = {"raw": [], "zstd": []}
        for _ in range(a.repeat):  # alternate: a busy neighbour hurts both alike
            for kind, p in (("raw", raw), ("zstd", zst)):
                runs[kind].append(stream_rate(p))
        best = {k: max(v, key=lambda r: r["samples_per_s"]) for k, v in runs.items()}
        steady = {k: statistics.median(r["steady"] for r in v) for k, v in runs.items()}
        emit({"mode": "stream", "workload": name, "n": a.stream_n, "workers": 2, "batch": 256,
              "raw_samples_per_s": round(best["raw"]["samples_per_s"]),
              "zstd_samples_per_s": round(best["zstd"]["samples_per_s"]),
              "relative": round(best["zstd"]["samples_per_s"] / best["raw"]["samples_per_s"], 3),
              "raw_steady_median": round(steady["raw"]), "zstd_steady_median": round(steady["zstd"]),
              "steady_relative": round(steady["zstd"] / steady["raw"], 3),
              # each zstd run against the raw run just before it (same neighbours)
              "steady_pair_ratios": [round(z["steady"] / r["steady"], 3)
                                     for r, z in zip(runs["raw"], runs["zstd"])]})
    for name, (raw, zst) in paths.items():
        gr, gz = getitem_rate(raw), getitem_rate(zst)
        emit({"mode": "getitem", "workload": name, "raw_per_s": round(gr),
              "zstd_per_s": round(gz), "relative": round(gz / gr, 3)})
    frame_variants(a, paths["tokens"][0], spec)


def frame_variants(a: argparse.Namespace, raw_tokens: str, spec: str) -> None:
    """The frame size trades ``ds[i]`` speed for size; the dictionary buys size."""
    from shardstream.format.compression import Compression, parse_compression
    from shardstream.write.convert import convert

    from workloads import tabular, tokens
    base = parse_compression(spec)
    raw_tab = os.path.join(a.dir, "tabular")
    write(raw_tab, tabular(a.n * 4))
    for name, raw in (("tokens", raw_tokens), ("tabular", raw_tab)):
        gr = getitem_rate(raw)
        variants = [(fb, base.dict_bytes) for fb in (256, 512, 1024, 4096)] + \
            [(base.frame_bytes, 0)]
        for fb, db in variants:
            out = os.path.join(a.dir, f"{name}-f{fb}-d{db}")
            convert(raw, out, compression=Compression(base.codec, base.level, fb, db),
                    overwrite=True, fsync=False)
            gz = getitem_rate(out)
            emit({"mode": "frames", "workload": name, "frame_bytes": fb, "dict_bytes": db,
                  "ratio": round(disk_bytes(raw) / disk_bytes(out), 3),
                  "raw_per_s": round(gr), "zstd_per_s": round(gz),
                  "getitem_relative": round(gz / gr, 3)})
    times = {}
    for kind in ("raw", "zstd", "raw", "zstd"):  # alternated, best kept
        t = write(os.path.join(a.dir, "write-" + kind), tokens(a.n),
                  **({"compression": spec} if kind == "zstd" else {}))
        times[kind] = min(times.get(kind, t), t)
    emit({"mode": "write", "workload": "tokens", "n": a.n,
          "raw_samples_per_s": round(a.n / times["raw"]),
          "zstd_samples_per_s": round(a.n / times["zstd"]),
          "relative": round(times["raw"] / times["zstd"], 3)})


if __name__ == "__main__":
    main()
