"""Epoch locality and mixing, computed from the layouts alone (no data is read).

usage: python benchmarks/locality.py [--peers PEERS_PY] [--geometries 2x4,8x4,64x8,128x8]
                                     [--per-shard 250] [--batch 16] [--workers 2]

For each geometry (nodes x ranks per node) it lays out one shuffled epoch of a
dataset of equal shards three ways and reports, per way:

- ``node_fraction_max``: the largest fraction of the dataset's shards one node
  touches in the epoch (what it must read, or download from object storage);
- ``distinct_shards_per_global_batch``: median distinct shards among the samples of
  one global batch (every rank's batch of one step: what a DDP gradient averages);
- ``distinct_shards_per_rank_batch``: the same for one rank's batch;
- ``live_shards_max``: the most shards one node has live at once (between a shard's
  first and last use in the epoch): the node cache, in shards, it needs to download
  each shard once per epoch (MosaicML's own ``cache_limit`` check asks for 4 shards);
- per geometry, the fraction of a node's epoch-2 shards it read in epoch 1 as well,
  with ``node_shares="fixed"`` and ``"epoch"`` (cache reuse across epochs).

The ways: shardstream's global layout (``EpochOrder`` + ``Layout`` from
:mod:`shardstream.read.order`: what ``ShardStream`` reads on one node, and read on
every node count before node-local epochs), its node-local layout
(:mod:`shardstream.read.nodes`, what it reads on several nodes), both with the default
``shuffle_buffer`` and block shuffle, blocks of ``--block-samples``; a true global shuffle (a random permutation
dealt the same way); and, with ``--peers`` (the peer venv's python, see
``../shared/bench/setup.sh``), MosaicML streaming's ``py1e`` and ``py1br`` computed by
its own partition and shuffle code (``../shared/bench/mds_locality.py``).
The dataset has ``--shards-per-rank`` shards per rank (at least 160).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import numpy as np

from shardstream.read.nodes import NodeOrder, node_length, node_shares
from shardstream.read.order import EpochOrder, Layout

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(HERE, "..", "..", "shared", "bench"))


def live_max(seq: np.ndarray) -> int:
    """Most shards live at once in ``seq`` (shard ids in time order): from a shard's first
    use to its last, the node cache must hold it to download it once per epoch. (The
    peers' script computes the same in their venv: it cannot import this one.)"""
    _, first = np.unique(seq, return_index=True)
    _, last_rev = np.unique(seq[::-1], return_index=True)
    starts, ends = np.sort(first), np.sort(len(seq) - 1 - last_rev)
    return int((np.arange(1, len(starts) + 1) - np.searchsorted(ends, starts, "left")).max())


def _stats(shard_of_rank_batches: np.ndarray, valid: np.ndarray, nodes: int,
           per_node: int, num_shards: int) -> dict:
    """(ranks, steps, batch) shard ids -> the figures."""
    ranks, steps, _ = shard_of_rank_batches.shape
    touched, live = [], []
    for nd in range(nodes):
        block = shard_of_rank_batches[nd * per_node:(nd + 1) * per_node]
        ok = valid[nd * per_node:(nd + 1) * per_node]
        touched.append(len(np.unique(block[ok])))
        seq = block.transpose(1, 0, 2).reshape(-1)  # the node's samples in step order
        live.append(live_max(seq[ok.transpose(1, 0, 2).reshape(-1)]))
    glob = [len(np.unique(shard_of_rank_batches[:, j][valid[:, j]])) for j in range(steps)]
    rank = [len(np.unique(shard_of_rank_batches[r, j][valid[r, j]]))
            for r in range(0, ranks, max(1, ranks // 64)) for j in range(steps)]
    return {"node_fraction_max": round(max(touched) / num_shards, 4),
            "distinct_shards_per_global_batch": int(np.median(glob)),
            "distinct_shards_per_rank_batch": int(np.median(rank)),
            "live_shards_max": max(live)}


def _rank_shards(order, layout: Layout, r: int, row: np.ndarray) -> None:
    """Fill ``row`` (steps, batch) with the shard ids of rank ``r``'s units."""
    spans = [layout.span(r, j) for j in range(layout.num_units)]
    s, _ = order.locate(np.concatenate([np.arange(a, a + n, dtype=np.int64)
                                        for a, n in spans]))
    at = 0
    for j, (_, n) in enumerate(spans):
        row[j, :n] = s[at:at + n]
        at += n


def shardstream_layout(nodes: int, per_node: int, shards: int, per_shard: int, batch: int,
                       block_samples: int, shuffle_buffer: int, seed: int, epoch: int) -> dict:
    """The global layout: what ShardStream reads on one node (positions only)."""
    world = nodes * per_node
    counts = [per_shard] * shards
    firsts = np.arange(0, per_shard, block_samples, dtype=np.int64)
    order = EpochOrder(counts, seed=seed, epoch=epoch, shuffle=True, block_shuffle=True,
                       window=shuffle_buffer, block_firsts=lambda s: firsts)
    layout = Layout(sum(counts), 0, world, batch, False, "pad")
    shard = np.full((world, layout.num_units, batch), -1, dtype=np.int64)
    for r in range(world):
        _rank_shards(order, layout, r, shard[r])
    return _stats(shard, shard >= 0, nodes, per_node, shards)


def node_local_layout(nodes: int, per_node: int, shards: int, per_shard: int, batch: int,
                      shuffle_buffer: int, seed: int, epoch: int) -> dict:
    """The node-local layout ShardStream reads on ``nodes`` nodes (shardstream.read.nodes)."""
    counts = [per_shard] * shards
    shares = node_shares(counts, nodes, seed=seed, epoch=epoch, shuffle=True)
    layout = Layout(node_length(sum(counts), nodes, "pad"), 0, per_node, batch, False, "pad")
    shard = np.full((nodes * per_node, layout.num_units, batch), -1, dtype=np.int64)
    for k, pieces in enumerate(shares):
        order = NodeOrder(pieces, seed=seed, epoch=epoch, node=k, shuffle=True,
                          window=shuffle_buffer)
        for r in range(per_node):
            _rank_shards(order, layout, r, shard[k * per_node + r])
    return _stats(shard, shard >= 0, nodes, per_node, shards)


def global_shuffle(nodes: int, per_node: int, shards: int, per_shard: int, batch: int,
                   seed: int) -> dict:
    """A true global shuffle of all samples, dealt round-robin by batch."""
    world = nodes * per_node
    n = shards * per_shard
    perm = np.random.default_rng(seed).permutation(n)
    steps = -(-n // (world * batch))
    ids = np.resize(perm, steps * world * batch).reshape(steps, world, batch)
    shard = (ids // per_shard).transpose(1, 0, 2)
    return _stats(shard, np.ones_like(shard, dtype=bool), nodes, per_node, shards)


def _peer_json(peers: str, script: str, algo: str, nodes: int, per_node: int, workers: int,
               shards: int, per_shard: int, batch: int, seed: int, epoch: int) -> dict:
    """The last JSON line ``script`` prints when run with the peers' python."""
    out = subprocess.run([peers, script, "--algo", algo,
                          "--nodes", str(nodes), "--ranks-per-node", str(per_node),
                          "--workers", str(workers), "--shards", str(shards),
                          "--per-shard", str(per_shard), "--batch", str(batch),
                          "--seed", str(seed), "--epoch", str(epoch)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def mosaic(peers: str, algo: str, nodes: int, per_node: int, workers: int, shards: int,
           per_shard: int, batch: int, seed: int, epoch: int) -> dict:
    args = (algo, nodes, per_node, workers, shards, per_shard, batch, seed, epoch)
    r = _peer_json(peers, os.path.join(BENCH, "mds_locality.py"), *args)
    live = _peer_json(peers, os.path.join(HERE, "peers_locality.py"), *args)
    return {"node_fraction_max": round(r["node_fraction_max"], 4),
            "distinct_shards_per_global_batch": r["distinct_shards_per_global_batch_median"],
            "distinct_shards_per_rank_batch": r["distinct_shards_per_rank_batch_median"],
            "live_shards_max": live["live_shards_max"]}


def reuse(nodes: int, shards: int, per_shard: int, seed: int) -> dict:
    """Fraction of a node's shards of epoch 2 it read in epoch 1 too (what a node cache
    that holds its share serves without a download), for each ``node_shares``."""
    counts = [per_shard] * shards
    out = {}
    for mode in ("fixed", "epoch"):
        a, b = (node_shares(counts, nodes, seed=seed, epoch=e, shuffle=True, shares=mode)
                for e in (1, 2))
        out[mode] = round(float(np.mean([np.isin(b[n][0], a[n][0]).mean()
                                         for n in range(nodes)])), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometries", default="2x4,8x4,64x8,128x8")
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--shards-per-rank", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-samples", type=int, default=32)
    ap.add_argument("--shuffle-buffer", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--epoch", type=int, default=1)
    ap.add_argument("--peers", default=None, help="python of the peer venv (MosaicML)")
    a = ap.parse_args()
    rows = []
    for geo in a.geometries.split(","):
        nodes, per_node = (int(x) for x in geo.split("x"))
        shards = max(160, a.shards_per_rank * nodes * per_node)
        base = {"geometry": geo, "shards": shards, "per_shard": a.per_shard, "batch": a.batch}
        ways = {"shardstream (global, before)": shardstream_layout(nodes, per_node, shards, a.per_shard,
                                                  a.batch, a.block_samples, a.shuffle_buffer,
                                                  a.seed, a.epoch),
                "shardstream node-local": node_local_layout(
                    nodes, per_node, shards, a.per_shard, a.batch, a.shuffle_buffer, a.seed,
                    a.epoch),
                "global shuffle": global_shuffle(nodes, per_node, shards, a.per_shard,
                                                 a.batch, a.seed)}
        if a.peers:
            for algo in ("py1e", "py1br"):
                ways[f"mosaicml {algo}"] = mosaic(a.peers, algo, nodes, per_node, a.workers,
                                                  shards, a.per_shard, a.batch, a.seed,
                                                  a.epoch)
        for way, got in ways.items():
            row = {**base, "layout": way, **got}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps({**base, "epoch 2 shards already read in epoch 1":
                          reuse(nodes, shards, a.per_shard, a.seed)}), flush=True)
    print("\n| geometry | shards | layout | node fraction (max) | shards per global batch "
          "| shards per rank batch | live shards per node (max) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['geometry']} | {r['shards']} | {r['layout']} | {r['node_fraction_max']} "
              f"| {r['distinct_shards_per_global_batch']} | {r['distinct_shards_per_rank_batch']} "
              f"| {r['live_shards_max']} |")


if __name__ == "__main__":
    main()
