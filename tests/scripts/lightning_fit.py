"""Lightning DDP (2 CPU ranks) over shardstream.loader: log every sample id seen.

usage: python lightning_fit.py DATASET OUTDIR fresh STOP_EPOCH STOP_BATCH
       python lightning_fit.py DATASET OUTDIR resume

``fresh`` trains until batch STOP_BATCH of epoch STOP_EPOCH, saves OUTDIR/mid.ckpt
there (the loader state travels in it) and stops, as a crash would; ``resume`` runs
``fit(ckpt_path=OUTDIR/mid.ckpt)`` to the end of 3 epochs. Each rank appends one
JSON line per batch to OUTDIR/ids-<mode>-rank<r>.jsonl: {"epoch", "batch", "ids"}.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch

import shardstream

BATCH = 64


class Model(pl.LightningModule):
    def __init__(self, path: str, out: str, mode: str, stop: tuple[int, int] | None) -> None:
        super().__init__()
        self.path, self.out, self.mode, self.stop = path, out, mode, stop
        self.layer = torch.nn.Linear(1, 1)
        self._log = None

    def train_dataloader(self):
        stream = shardstream.ShardStream(self.path, batch_size=BATCH, shuffle=True, seed=5,
                                         shuffle_buffer=512)
        return shardstream.loader(stream, num_workers=2)

    def training_step(self, batch, batch_idx):
        if self._log is None:
            name = f"ids-{self.mode}-rank{self.global_rank}.jsonl"
            self._log = open(os.path.join(self.out, name), "a")
        self._log.write(json.dumps({"epoch": self.current_epoch, "batch": batch_idx,
                                    "ids": batch["id"].tolist()}) + "\n")
        self._log.flush()
        return self.layer(batch["f"].float().unsqueeze(1)).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.stop == (self.current_epoch, batch_idx):
            self.trainer.save_checkpoint(os.path.join(self.out, "mid.ckpt"))
            self.trainer.should_stop = True  # leave after this batch, as if killed

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def main() -> None:
    path, out, mode = sys.argv[1:4]
    stop = (int(sys.argv[4]), int(sys.argv[5])) if mode == "fresh" else None
    torch.set_num_threads(1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False)
    model = Model(path, out, mode, stop)
    ckpt = os.path.join(out, "mid.ckpt") if mode == "resume" else None
    trainer.fit(model, ckpt_path=ckpt)


if __name__ == "__main__":
    main()
