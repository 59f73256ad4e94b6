"""Run under torchrun: each rank reads a ShardStream through 2 workers, writes JSON.

usage: torchrun --nproc_per_node=2 ddp_stream.py DATASET OUTDIR REMAINDER
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream


def main() -> None:
    path, out, remainder = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ds = ShardStream(path, batch_size=16, shuffle=True, seed=7, remainder=remainder,
                     shuffle_buffer=256)
    dl = loader(ds, num_workers=2)
    result = {"rank": rank, "world": dist.get_world_size(), "len": len(dl), "epochs": []}
    for epoch in (0, 1):
        dl.set_epoch(epoch)
        ids = []
        for batch in dl:
            ids.append(batch["id"].tolist())
            t = torch.ones(1)
            dist.all_reduce(t)  # a DDP step: hangs if ranks disagree on the batch count
        result["epochs"].append(ids)
    again = loader(ShardStream(path, batch_size=16, shuffle=True, seed=7, remainder=remainder,
                               shuffle_buffer=256), num_workers=2)
    result["again"] = [batch["id"].tolist() for batch in again]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
