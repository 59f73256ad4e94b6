"""One leg of a StatefulDataLoader run over a ShardStream, in its own process.

usage: python torchdata_resume.py DATASET STATE OUT.json head K   # K batches, save state
       python torchdata_resume.py DATASET STATE OUT.json tail     # load state, read the rest
Writes the ids this process saw to OUT.json.
"""

import json
import sys

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from shardstream import ShardStream


def main() -> None:
    path, state_path, out, leg = sys.argv[1:5]
    ds = ShardStream(path, batch_size=32, shuffle=True, seed=11, shuffle_buffer=256)
    ds.set_epoch(2)
    dl = StatefulDataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    ids = []
    if leg == "head":
        it = iter(dl)
        for _ in range(int(sys.argv[5])):
            ids += next(it)["id"].tolist()
        torch.save(dl.state_dict(), state_path)
    else:
        dl.load_state_dict(torch.load(state_path, weights_only=False))
        ids = [i for b in dl for i in b["id"].tolist()]
    with open(out, "w") as f:
        json.dump(ids, f)


if __name__ == "__main__":
    main()
