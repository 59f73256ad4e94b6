"""shardstream end to end: pack dicts -> stream batches -> train a tiny model.

    python examples/quickstart.py [--out DIR] [--epochs 3] [--workers 2]

Uses the sample data that ships with the repo (examples/data/reviews.jsonl,
2,000 product reviews). Runs on a CPU in seconds; on a GPU the batches are
copied ahead of the model by shardstream's CUDA prefetcher.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

import shardstream

HERE = os.path.dirname(os.path.abspath(__file__))


def load_reviews() -> list[dict]:
    """The kind of data people have: a list of dicts (token ids as numpy arrays)."""
    with open(os.path.join(HERE, "data", "reviews.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        r["input_ids"] = np.asarray(r["input_ids"], dtype=np.int32)
    return rows


class BagOfWords(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        summed = self.embed(ids).sum(dim=1)
        return self.head(summed / lengths.clamp(min=1).unsqueeze(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="dataset directory (default: a temp dir)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="shardstream-"), "reviews")

    # 1. pack: dicts -> tar shards + indexes + manifest.json
    t = time.perf_counter()
    manifest = shardstream.write_shards(load_reviews(), out, workers=2, max_samples=500,
                                        overwrite=True)
    print(f"packed {manifest.num_samples} samples into {len(manifest.shards)} shards "
          f"({manifest.total_bytes / 1e3:.0f} kB) at {out} in {time.perf_counter() - t:.2f} s")

    # 2. random access: the same shards, memory-mapped, as a map-style dataset
    ds = shardstream.ShardDataset(out)
    print(f"ShardDataset: len={len(ds)}, ds[7]['text']={ds[7]['text'][:40]!r}...")

    # 3. stream: shuffled, collated batches of tensors (exact epochs, DDP-ready)
    stream = shardstream.ShardStream(out, batch_size=args.batch_size, shuffle=True, seed=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loader = shardstream.loader(stream, num_workers=args.workers, device=device)

    # 4. train a few steps
    torch.manual_seed(0)
    model = BagOfWords().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        t, seen, correct, total_loss = time.perf_counter(), 0, 0, 0.0
        for batch in loader:
            ids, lengths = batch["input_ids"].long(), batch["input_ids_lengths"]
            labels = batch["label"]
            logits = model(ids, lengths)
            loss = nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            total_loss += loss.item() * len(labels)
        print(f"epoch {epoch}: {seen} samples, {len(loader)} steps, loss "
              f"{total_loss / seen:.3f}, accuracy {correct / seen:.1%}, "
              f"{seen / (time.perf_counter() - t):,.0f} samples/s")
    if correct / seen < 0.9:
        raise SystemExit("the model did not learn: something is wrong with the data path")
    print("done")


if __name__ == "__main__":
    main()
