"""Train a tiny classifier with DDP from shardstream shards (CPU, gloo).

    torchrun --nproc_per_node=2 examples/train_ddp.py [DATASET_DIR] [--epochs 2]

Without a dataset directory it writes a small synthetic one first (rank 0,
the other ranks wait at a barrier), so it runs unattended. Every rank gets
the same number of batches (no DDP hang), the order changes per epoch, and
the loader's state_dict() is what a checkpoint needs to resume mid-epoch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import shardstream
from shardstream import ShardStream, ShardWriter


def make_data(out: str, n: int = 4000) -> None:
    """Points in 8-d space labelled by the sign of a fixed projection."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(8).astype(np.float32)
    with ShardWriter(out, max_samples=500, overwrite=True) as writer:
        for i in range(n):
            x = rng.standard_normal(8).astype(np.float32)
            writer.write({"id": i, "x": x, "label": int(x @ w > 0)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    # gloo on CPU; with GPUs: one per rank, NCCL, and batches prefetched to the GPU
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    data, created = args.data, False
    if data is None:  # rank 0 writes a sample dataset, everyone uses the same path
        box = [os.path.join(tempfile.gettempdir(), f"shardstream-ddp-example-{os.getppid()}")]
        dist.broadcast_object_list(box, src=0)
        data = box[0]
        if rank == 0 and not os.path.exists(os.path.join(data, "manifest.json")):
            make_data(data)
            created = True
        dist.barrier()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).to(device or "cpu")
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = ShardStream(data, batch_size=args.batch_size, shuffle=True, seed=0)
    loader = shardstream.loader(ds, num_workers=args.workers, device=device)  # CUDAPrefetcher

    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        total, correct, steps = 0.0, 0, 0
        for batch in loader:
            logits = model(batch["x"])
            loss = nn.functional.cross_entropy(logits, batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            correct += int((logits.argmax(1) == batch["label"]).sum())
            steps += 1
        stats = torch.tensor([total, correct, steps * args.batch_size], dtype=torch.float64,
                             device=device or "cpu")
        dist.all_reduce(stats)
        if rank == 0:
            print(f"epoch {epoch}: {steps} batches/rank, loss {stats[0] / steps / dist.get_world_size():.3f}, "
                  f"accuracy {stats[1] / stats[2]:.3f}, resume state {loader.state_dict()}",
                  flush=True)
    dist.barrier()
    if created:
        shutil.rmtree(data, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
