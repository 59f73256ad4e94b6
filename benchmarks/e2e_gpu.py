"""End to end on a GPU: shards -> ShardStream -> loader -> CUDAPrefetcher -> model.

    python benchmarks/e2e_gpu.py [--n 200000] [--workers 8] [--batch 256] [--json OUT]

Writes a tokens-like dataset (variable-length int32 ids, a label, some text),
then trains a small transformer classifier three ways in the same run and
reports step time against a compute-only loop on a batch already on the GPU:

- ``compute only``: the model step alone (the floor);
- ``loader + .to(device)``: the loader's batches copied synchronously;
- ``loader(device=...)``: the same loader with shardstream's CUDA prefetcher.

GPU utilisation is estimated as compute-only step time / measured step time.
Without CUDA it prints a note and exits 0.
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


def make_data(out: str, n: int) -> None:
    rng = np.random.default_rng(0)
    lens = rng.integers(32, 512, n)

    def gen():
        for i in range(n):
            ids = rng.integers(1, 32_000, lens[i], dtype=np.int32)
            yield {"id": i, "input_ids": ids, "label": int(ids[0] % 7), "text": f"doc {i}"}

    shardstream.write_shards(gen(), out, max_bytes=64 << 20, overwrite=True, fsync=False)


class Classifier(nn.Module):
    def __init__(self, vocab: int = 32_000, dim: int = 512, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(dim, 8, 4 * dim, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 7)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] >= lengths[:, None]
        h = self.encoder(self.embed(ids), src_key_padding_mask=mask)
        h = h.masked_fill(mask[..., None], 0).sum(1) / lengths[:, None].clamp(min=1)
        return self.head(h)


def train(batches, model, opt, device, steps: int, warmup: int = 10) -> tuple[float, int]:
    """Mean step time (s) after ``warmup`` steps, measured with a final synchronize."""
    n, t0 = 0, None
    for batch in batches:
        if n == warmup:
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        ids = batch["input_ids"].to(device, non_blocking=True).long()
        lengths = batch["input_ids_lengths"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(ids, lengths), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += 1
        if n == warmup + steps:
            break
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / (n - warmup), n - warmup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device; skipping")
        return
    device = torch.device("cuda")
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="ss-e2e-"), "tokens")
    t = time.perf_counter()
    make_data(out, args.n)
    print(f"wrote {args.n} samples in {time.perf_counter() - t:.1f} s")
    torch.manual_seed(0)
    model = Classifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "n": args.n, "batch": args.batch, "workers": args.workers}

    stream = shardstream.ShardStream(out, batch_size=args.batch, shuffle=True, seed=0)
    first = next(iter(shardstream.loader(stream, num_workers=0)))
    fixed = {k: v.to(device) for k, v in first.items() if isinstance(v, torch.Tensor)}

    def forever():
        while True:
            yield fixed

    step, n = train(forever(), model, opt, device, args.steps)
    results["compute_only_ms"] = step * 1e3
    print(f"compute only            {step * 1e3:7.2f} ms/step ({args.batch / step:,.0f} samples/s)")

    for name, dev in (("loader + .to(device)", None), ("loader(device=cuda)", device)):
        stream = shardstream.ShardStream(out, batch_size=args.batch, shuffle=True, seed=1)
        ld = shardstream.loader(stream, num_workers=args.workers, device=dev)
        step, n = train(iter(ld), model, opt, device, args.steps)
        util = results["compute_only_ms"] / (step * 1e3)
        key = "prefetcher" if dev is not None else "sync_copy"
        results[f"{key}_ms"] = step * 1e3
        results[f"{key}_gpu_util_est"] = util
        print(f"{name:<23} {step * 1e3:7.2f} ms/step ({args.batch / step:,.0f} samples/s), "
              f"estimated GPU utilisation {util:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
