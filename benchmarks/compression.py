"""Compressed vs uncompressed shards: size on disk, streaming and random-access speed.

    python benchmarks/compression.py [--dir /tmp/ss-bench/compression] [--n 100000]
                                     [--level 3] [--repeat 2]

Everything in one run, JSON lines on stdout:

- ``size``: bytes on disk (shards + indexes) of ``tokens`` (the shared
  workload: ids uniform in [0, 50000)) written raw, then converted with
  ``shardstream convert`` to zstd; and the same for ``tokens_zipf`` (ids drawn
  from a Zipf law, like real token frequencies) and per field (ids / text);
- ``stream``: one epoch of ``ShardStream(batch_size=256)`` through
  ``shardstream.dataloader.loader(num_workers=2)``, each in a fresh process,
  raw and zstd alternated ``--repeat`` times, best kept;
- ``getitem``: 20,000 random ``ds[i]`` (``default_rng(1)``), warm, best of 3;
- ``dictionary``: what a trained zstd dictionary would gain per block size.
"""

from __future__ import annotations

import argparse
import json
import os
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
    from shardstream.manifest import load_manifest
    return load_manifest(path).total_bytes


def write(path: str, samples, **kw) -> float:
    from shardstream.writer import ShardWriter
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
    from shardstream.random_access import ShardDataset
    ds = ShardDataset(path)
    idx = np.random.default_rng(1).integers(0, len(ds), 20000).tolist()
    return best_getitem_rate(ds, idx)


def dictionary_gain(n: int = 4000) -> None:
    """Ratio of zstd per block with and without a dictionary trained on other blocks."""
    import zstandard as zstd
    from workloads import tokens

    from shardstream.codec import encode_sample
    enc = [encode_sample(s) for s in tokens(n, seed=1)]
    for block_bytes in (4096, 16384, 65536):
        blocks, cur = [], b""
        for e in enc:
            if cur and len(cur) + len(e) > block_bytes:
                blocks.append(cur)
                cur = b""
            cur += e
        blocks.append(cur)
        train, test = blocks[: len(blocks) // 2], blocks[len(blocks) // 2:]
        d = zstd.train_dictionary(110 * 1024, train)
        plain = zstd.ZstdCompressor(level=3)
        with_dict = zstd.ZstdCompressor(level=3, dict_data=d)
        raw = sum(map(len, test))
        emit({"mode": "dictionary", "block_bytes": block_bytes,
              "ratio_plain": round(raw / sum(len(plain.compress(b)) for b in test), 3),
              "ratio_dict": round(raw / sum(len(with_dict.compress(b)) for b in test), 3)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/ss-bench/compression")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    from workloads import tokens

    from shardstream.convert import convert
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
    for name, (raw, zst) in paths.items():
        best: dict[str, dict] = {}
        for _ in range(a.repeat):  # alternate: a busy neighbour hurts both alike
            for kind, p in (("raw", raw), ("zstd", zst)):
                r = stream_rate(p)
                if kind not in best or r["samples_per_s"] > best[kind]["samples_per_s"]:
                    best[kind] = r
        emit({"mode": "stream", "workload": name, "workers": 2, "batch": 256,
              "raw_samples_per_s": round(best["raw"]["samples_per_s"]),
              "zstd_samples_per_s": round(best["zstd"]["samples_per_s"]),
              "relative": round(best["zstd"]["samples_per_s"] / best["raw"]["samples_per_s"], 3)})
        gr, gz = getitem_rate(raw), getitem_rate(zst)
        emit({"mode": "getitem", "workload": name, "raw_per_s": round(gr),
              "zstd_per_s": round(gz), "relative": round(gz / gr, 3)})
    raw = paths["tokens"][0]
    for block_bytes in (16384, 4096):  # smaller blocks: cheaper ds[i], lower ratio
        small = os.path.join(a.dir, f"tokens-zstd-{block_bytes}")
        convert(raw, small, compression=spec, block_bytes=block_bytes, overwrite=True,
                fsync=False)
        gr, gz = getitem_rate(raw), getitem_rate(small)
        emit({"mode": "getitem", "workload": "tokens", "block_bytes": block_bytes,
              "ratio": round(disk_bytes(raw) / disk_bytes(small), 3), "raw_per_s": round(gr),
              "zstd_per_s": round(gz), "relative": round(gz / gr, 3)})
    dictionary_gain()


if __name__ == "__main__":
    main()
