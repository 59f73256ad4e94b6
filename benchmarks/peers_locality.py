"""MosaicML streaming's node schedule, from its own partition and shuffle code: run with
the peer venv's python (see ``../shared/bench/setup.sh``); called by ``locality.py``.

usage: PEERS_PY peers_locality.py --algo py1e --nodes 8 --ranks-per-node 4 --workers 2
         --shards 160 --per-shard 250 --batch 16 --seed 3 --epoch 1
Prints one JSON line: the most shards one node holds live at once (first use to last
use: the cache it needs to download each shard once per epoch) and MosaicML's own
minimum ``cache_limit`` rule (4 x the largest shard), in shards."""
import argparse
import json

import numpy as np
from streaming.base.partition import get_partitions
from streaming.base.shuffle import get_shuffle


def live_max(seq: np.ndarray) -> int:
    """Most shards live at once in ``seq`` (shard ids in time order, -1: padding)."""
    seq = seq[seq >= 0]
    _, first = np.unique(seq, return_index=True)
    _, last_rev = np.unique(seq[::-1], return_index=True)
    last = len(seq) - 1 - last_rev
    starts, ends = np.sort(first), np.sort(last)
    return int((np.arange(1, len(starts) + 1) - np.searchsorted(ends, starts, "left")).max())


ap = argparse.ArgumentParser()
for name, default in (("nodes", 8), ("ranks-per-node", 4), ("workers", 2), ("shards", 160),
                      ("per-shard", 250), ("batch", 16), ("seed", 3), ("epoch", 1)):
    ap.add_argument(f"--{name}", type=int, default=default)
ap.add_argument("--algo", default="py1e")
ap.add_argument("--block-size", type=int, default=1 << 18)
a = ap.parse_args()
sizes = np.full(a.shards, a.per_shard, np.int64)
perm = get_shuffle(a.algo, sizes, a.nodes, a.seed, a.epoch, a.block_size)
part = get_partitions("orig", int(sizes.sum()), a.nodes, a.nodes, a.ranks_per_node, a.workers,
                      a.batch)
ids = np.where(part >= 0, perm[np.where(part >= 0, part, 0)], -1)
shard = np.where(ids >= 0, ids // a.per_shard, -1)
# (nodes, ranks, batches, workers, bs) -> per node: steps (batch b of worker w) x ranks
steps = shard.transpose(0, 1, 3, 2, 4).reshape(a.nodes, a.ranks_per_node, -1, a.batch)
live = [live_max(steps[nd].transpose(1, 0, 2).reshape(-1)) for nd in range(a.nodes)]
print(json.dumps({"algo": a.algo, "live_shards_max": max(live), "cache_rule_shards": 4}))
