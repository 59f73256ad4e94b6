"""Run under torchrun: each rank reads a 3-source mixture through 2 workers, writes JSON.

usage: torchrun --nproc_per_node=2 ddp_mixture.py OUTDIR SRC_A SRC_B SRC_C

Per epoch (0, 1): the (source, id) pairs of every batch. Then epoch 2 read
half-way, its state saved, and the rest read by a fresh loader from that state.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream

KW = dict(weights=[0.7, 0.2, 0.1], epoch_size=4003, batch_size=16, shuffle=True, seed=3,
          shuffle_buffer=512, source_field="__source__", remainder="pad")


def pairs(batch) -> list:
    return [list(p) for p in zip(batch["__source__"].tolist(), batch["id"].tolist())]


def step() -> None:
    t = torch.ones(1)
    dist.all_reduce(t)  # a DDP step: hangs if ranks disagree on the batch count


def main() -> None:
    out, sources = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dl = loader(ShardStream(sources, **KW), num_workers=2)
    result = {"rank": rank, "len": len(dl), "epochs": [], "resumed": []}
    for epoch in (0, 1):
        dl.set_epoch(epoch)
        batches = []
        for batch in dl:
            batches.append(pairs(batch))
            step()
        result["epochs"].append(batches)
    dl.set_epoch(2)
    for i, batch in enumerate(dl):
        result["resumed"].append(pairs(batch))
        step()
        if i == 40:
            break
    state = dl.state_dict()
    again = loader(ShardStream(sources, **KW), num_workers=2)
    again.load_state_dict(state)
    for batch in again:
        result["resumed"].append(pairs(batch))
        step()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
