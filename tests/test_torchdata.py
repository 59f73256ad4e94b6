"""Resume through torchdata's StatefulDataLoader (workers keep their own state)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchdata.stateful_dataloader",
                    reason="torchdata is not installed (pip install torchdata)")

from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

from shardstream import ShardStream  # noqa: E402


def ids_of(batches) -> list[int]:
    return [int(i) for b in batches for i in b["id"]]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_stateful_dataloader_resumes_mid_epoch_without_loss_or_repeat(make_dataset, workers,
                                                                      shuffle):
    out = make_dataset(1000)

    def make_loader() -> StatefulDataLoader:
        ds = ShardStream(out, batch_size=16, shuffle=shuffle, seed=3)
        return StatefulDataLoader(ds, batch_size=None, num_workers=workers)

    full = ids_of(make_loader())
    assert sorted(full) == list(range(1000))  # one rank: every sample once, nothing padded

    dl = make_loader()
    it = iter(dl)
    head = [next(it) for _ in range(13)]
    state = dl.state_dict()
    del it, dl

    resumed = make_loader()
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert ids_of(head) + ids_of(tail) == full
