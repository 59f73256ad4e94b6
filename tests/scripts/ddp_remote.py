"""Run under torchrun: each rank streams a dataset from S3 through 2 workers, writes JSON.

usage: torchrun --nproc_per_node=2 ddp_remote.py URL OUTDIR CACHE_DIR
(the S3 endpoint and keys come from AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, as on a cluster; ``{node}`` in CACHE_DIR becomes torchrun's
GROUP_RANK, one cache per node)
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream


def main() -> None:
    url, out, cache = sys.argv[1:4]
    node = int(os.environ.get("GROUP_RANK", "0"))
    cache = cache.replace("{node}", str(node))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = ShardStream(url, batch_size=16, shuffle=True, seed=5, shuffle_buffer=256,
                     cache_dir=cache)  # the ranks of a node share one node-local cache
    dl = loader(ds, num_workers=2)
    batches = []
    for batch in dl:
        batches.append(batch["id"].tolist())
        t = torch.ones(1)
        dist.all_reduce(t)  # hangs if ranks disagree on the batch count
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "node": node, "len": len(dl), "batches": batches,
                   "stats": ds.cache_stats}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
