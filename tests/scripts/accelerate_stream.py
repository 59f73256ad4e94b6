"""Run under torchrun (2 CPU ranks): accelerate with shardstream, right and wrong.

usage: torchrun --nproc_per_node=2 accelerate_stream.py DATASET OUTDIR STOP_BATCH

Right: ``prepare(model, opt, shardstream.loader(...))`` + ``register_for_checkpointing``:
epoch 0 whole, epoch 1 up to STOP_BATCH, ``save_state``; then brand-new stream, loader,
model and ``load_state`` (from disk) finish epoch 1 and run epoch 2. Wrong:
``prepare(DataLoader(stream))`` with dispatch (the default) and without. Each rank
writes OUTDIR/rank<r>.json: {"epochs": {epoch: [ids...]}, "batches": {...}, "wrong": {...}}.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

import shardstream

BATCH = 64


def make(path: str, accelerator: Accelerator):
    stream = shardstream.ShardStream(path, batch_size=BATCH, shuffle=True, seed=9,
                                     shuffle_buffer=512)
    dl = shardstream.loader(stream, num_workers=2, device=accelerator.device)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model, opt, dl = accelerator.prepare(model, opt, dl)
    return model, opt, dl


def step(accelerator: Accelerator, model, opt, batch) -> None:
    loss = model(batch["f"].float().unsqueeze(1)).pow(2).mean()
    accelerator.backward(loss)  # DDP all-reduce: hangs if ranks disagree on batch counts
    opt.step()
    opt.zero_grad()


def wrong(path: str, accelerator: Accelerator) -> dict:
    out = {}
    for name, kw in (("dispatch", None), ("no_dispatch", False)):
        stream = shardstream.ShardStream(path, batch_size=BATCH)
        dl = DataLoader(stream, batch_size=None)
        dl = accelerator.prepare(dl) if kw is None else prepare_data_loader(
            dl, dispatch_batches=False)
        try:
            n = sum(1 for _ in dl)
            out[name] = f"no error, {n} batches"
        except shardstream.errors.UsageError as exc:
            out[name] = f"UsageError: {exc}"
    return out


def main() -> None:
    path, outdir, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    epochs: dict[int, list[int]] = {}
    model, opt, dl = make(path, accelerator)
    accelerator.register_for_checkpointing(dl)
    ckpt = os.path.join(outdir, "state")
    for epoch in (0, 1):
        for i, batch in enumerate(dl):
            epochs.setdefault(epoch, []).extend(batch["id"].tolist())
            step(accelerator, model, opt, batch)
            if epoch == 1 and i == stop:
                break
    accelerator.save_state(ckpt)
    accelerator.wait_for_everyone()
    del model, opt, dl
    accelerator.free_memory()
    accelerator._custom_objects.clear()  # the "restarted" run registers its own loader
    model, opt, dl = make(path, accelerator)
    accelerator.register_for_checkpointing(dl)
    accelerator.load_state(ckpt)
    resumed_epoch = dl.epoch
    for epoch in (1, 2):
        for batch in dl:
            epochs.setdefault(epoch, []).extend(batch["id"].tolist())
            step(accelerator, model, opt, batch)
    result = {"rank": rank, "len": len(dl), "resumed_epoch": resumed_epoch,
              "epochs": epochs, "wrong": wrong(path, accelerator)}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
