"""obstore's raw ranged GETs vs ``objstore.read_into`` into a file, same run.

usage: python benchmarks/obstore_get.py [--mb 256] [--streams 4] [--chunk-mb 8]
                                        [--piece-kb 1024] [--rounds 3] [--dest-dir DIR]

Starts SeaweedFS on 127.0.0.1 (``tests/servers.py``), uploads one ``--mb`` MB object
with ``objstore.put_file`` (multipart), then per round, alternating:

- ``raw``: ``obstore.get_range`` for each ``--chunk-mb`` range, ``--streams`` threads,
  into memory (the bytes are dropped);
- ``get_ranges``: one ``obstore.get_ranges`` call over the same ranges (obstore's own
  parallelism: up to 10 requests), into memory;
- ``read_into``: ``objstore.read_into`` for each range, ``--streams`` threads, each
  piece written with ``os.pwrite`` into one file (page cache; content checked);
- ``download``: the node cache's download (``storage.download.download``), in process;
- ``download_forked``: the same from a forked child, through the storage engine.

Prints one JSON line per measurement (``mb_per_s``) and a summary: medians and the
``read_into / raw`` ratio. The machine's cores are shared with SeaweedFS: compare the
ratio, not absolute numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import obstore

from shardstream.storage import download, objstore
from shardstream.storage.retry import DEFAULT_RETRY

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from servers import SeaweedFS  # noqa: E402


def _ranges(total: int, chunk: int) -> list[tuple[int, int]]:
    return [(lo, min(total, lo + chunk)) for lo in range(0, total, chunk)]


def raw(store, path: str, ranges, streams: int) -> int:
    with ThreadPoolExecutor(streams) as pool:
        sizes = pool.map(lambda r: len(obstore.get_range(store, path, start=r[0], end=r[1])),
                         ranges)
        return sum(sizes)


def get_ranges(store, path: str, ranges) -> int:
    parts = obstore.get_ranges(store, path, starts=[a for a, _ in ranges],
                               ends=[b for _, b in ranges], coalesce=0)
    return sum(len(p) for p in parts)


def read_into(url: str, opts: dict, ranges, streams: int, dest: str, piece: int) -> int:
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        with ThreadPoolExecutor(streams) as pool:
            return sum(pool.map(lambda r: objstore.read_into(url, opts, fd, r[0], r[1],
                                                             chunk_size=piece), ranges))
    finally:
        os.close(fd)


def engine_download(url: str, opts: dict, dest: str) -> int:
    """The node cache's download (``storage.download.download``: 8 MiB ranges, 4 in
    flight, written in place), in this process."""
    download.download(url, dest, opts, DEFAULT_RETRY, None)
    return os.path.getsize(dest)


def forked_download(url: str, opts: dict, dest: str) -> int:
    """The same from a forked child (a DataLoader worker): through the engine process."""
    pid = os.fork()
    if pid == 0:
        try:
            engine_download(url, opts, dest)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return os.path.getsize(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--chunk-mb", type=int, default=8)
    ap.add_argument("--piece-kb", type=int, default=objstore.READ_CHUNK >> 10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dest-dir", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="obstore-bench-")
    server = SeaweedFS(os.path.join(work, "weed"))
    server.start()
    try:
        bucket = server.new_bucket("bench")
        opts = server.storage_options
        url = f"s3://{bucket}/blob.bin"
        src = os.path.join(work, "blob.bin")
        with open(src, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        with open(src, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        t = time.perf_counter()
        objstore.put_file(src, url, opts)
        up = args.mb / (time.perf_counter() - t)
        os.unlink(src)
        total = objstore.size(url, opts)
        ranges = _ranges(total, args.chunk_mb << 20)
        store, path = objstore.store_for(url, opts)
        dest = os.path.join(args.dest_dir or work, f"obstore-bench-{os.getpid()}.bin")
        print(json.dumps({"upload_mb_per_s": round(up, 1), "mb": total / 2**20,
                          "ranges": len(ranges), "streams": args.streams,
                          "piece_kb": args.piece_kb}), flush=True)
        runs = {"raw": lambda: raw(store, path, ranges, args.streams),
                "get_ranges": lambda: get_ranges(store, path, ranges),
                "read_into": lambda: read_into(url, opts, ranges, args.streams, dest,
                                               args.piece_kb << 10),
                "download": lambda: engine_download(url, opts, dest + ".dl"),
                "download_forked": lambda: forked_download(url, opts, dest + ".fk")}
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for name, run in runs.items():  # warm-up: connections, server caches
            run()
        for r in range(args.rounds):
            for name, run in runs.items():
                t = time.perf_counter()
                n = run()
                seconds = time.perf_counter() - t
                assert n == total, (name, n, total)
                rates[name].append(total / 2**20 / seconds)
                print(json.dumps({"round": r, "what": name, "seconds": round(seconds, 3),
                                  "mb_per_s": round(rates[name][-1], 1)}), flush=True)
        with open(dest, "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == digest, "copy differs"
        os.unlink(dest)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(json.dumps({"summary": {k: round(v, 1) for k, v in med.items()},
                          "read_into_over_raw": round(med["read_into"] / med["raw"], 3),
                          "download_over_raw": round(med["download"] / med["raw"], 3),
                          "download_forked_over_raw": round(med["download_forked"] / med["raw"],
                                                            3),
                          "get_ranges_over_raw": round(med["get_ranges"] / med["raw"], 3)}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
