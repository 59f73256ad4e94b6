"""ShardStream: exact epochs, len(), set_epoch, resume, errors, manifest-less sources."""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter

import numpy as np
import pytest
import torch

from shardstream.errors import CorruptShardError, IndexMismatchError, ShardNotFoundError
from shardstream.pytorch import wire
from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream

N = 1000


def ids_of(batches) -> list[int]:
    out: list[int] = []
    for b in batches:
        out += b["id"].tolist() if isinstance(b["id"], torch.Tensor) else [b["id"]]
    return out


def per_rank(path, world, **kw) -> list[list[int]]:
    return [ids_of(ShardStream(path, rank=r, world_size=world, **kw)) for r in range(world)]


@pytest.fixture
def ds_path(make_dataset):
    return make_dataset(N)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("bs", [None, 16])
@pytest.mark.parametrize("shuffle", [False, True])
def test_exact_epoch_drop(ds_path, world, bs, shuffle):
    ranks = per_rank(ds_path, world, batch_size=bs, shuffle=shuffle, remainder="drop",
                     shuffle_buffer=100)
    lens = {len(ShardStream(ds_path, rank=r, world_size=world, batch_size=bs,
                            remainder="drop")) for r in range(world)}
    assert len(lens) == 1
    counts = [len(r) for r in ranks]
    assert len(set(counts)) == 1 and counts[0] == N // world
    flat = [i for r in ranks for i in r]
    assert len(set(flat)) == len(flat) == (N // world) * world


@pytest.mark.parametrize("bs,drop_last", [(16, False), (16, True), (None, False)])
def test_exact_epoch_pad(ds_path, bs, drop_last):
    world = 3
    streams = [ShardStream(ds_path, rank=r, world_size=world, batch_size=bs, remainder="pad",
                           drop_last=drop_last, shuffle=True) for r in range(world)]
    batches = [list(s) for s in streams]
    assert [len(b) for b in batches] == [len(s) for s in streams]
    assert len({len(b) for b in batches}) == 1
    flat = ids_of(b for r in batches for b in r)
    if not drop_last:
        assert set(flat) == set(range(N))
        assert len(flat) == world * -(-N // world)  # 1002: two samples repeated
    else:
        assert len(flat) == len(set(flat)) + (len(flat) - len(set(flat)))
        assert all(len(b["id"]) == bs for r in batches for b in r)


def test_len_counts_batches_and_samples(ds_path):
    assert len(ShardStream(ds_path)) == N
    assert len(ShardStream(ds_path, batch_size=64)) == -(-N // 64)
    assert len(ShardStream(ds_path, batch_size=64, drop_last=True)) == N // 64
    assert len(ShardStream(ds_path, batch_size=64, rank=1, world_size=4)) == 4  # 250 -> 4
    assert len(ShardStream(ds_path, batch_size=10, rank=0, world_size=3,
                           remainder="drop")) == 34  # 333 -> 34


def test_set_epoch_determinism(ds_path):
    def order(epoch, seed=0):
        ds = ShardStream(ds_path, batch_size=32, shuffle=True, seed=seed)
        ds.set_epoch(epoch)
        return ids_of(ds)

    a, b = order(0), order(0)
    assert a == b and sorted(a) == list(range(N))
    assert order(1) != a and sorted(order(1)) == list(range(N))
    assert order(0, seed=1) != a
    assert ids_of(ShardStream(ds_path, batch_size=32)) == list(range(N))  # no shuffle


def test_order_independent_of_workers(ds_path):
    ds = ShardStream(ds_path, batch_size=32, shuffle=True)
    single = ids_of(ds)
    with_workers = ids_of(loader(ShardStream(ds_path, batch_size=32, shuffle=True),
                                 num_workers=2))
    assert single == with_workers


def test_loader_epochs_and_len(ds_path):
    ds = ShardStream(ds_path, batch_size=50, shuffle=True)
    dl = loader(ds, num_workers=2)
    assert len(dl) == 20
    e0 = ids_of(dl)
    assert ds.epoch == 1  # a full pass advances the epoch
    e1 = ids_of(dl)
    assert sorted(e0) == sorted(e1) == list(range(N)) and e0 != e1
    dl.set_epoch(0)
    assert ids_of(dl) == e0


def test_batches_are_collated_tensors(ds_path):
    b = next(iter(ShardStream(ds_path, batch_size=8)))
    assert b["id"].dtype == torch.int64 and b["f"].dtype == torch.float32
    assert b["x"].dtype == torch.int32 and b["x_lengths"].tolist() == [1, 2, 3, 4, 5, 1, 2, 3]
    assert b["meta"]["even"].dtype == torch.bool and b["s"][:2] == ["s0", "s1"]


def test_transform(ds_path):
    ds = ShardStream(ds_path, batch_size=10, transform=lambda s: {"id": s["id"] * 2})
    b = next(iter(ds))
    assert list(b) == ["id"] and b["id"].tolist() == list(range(0, 20, 2))


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_mid_epoch_two_workers(ds_path, shuffle):
    kw = dict(batch_size=16, shuffle=shuffle, shuffle_buffer=128)
    dl = loader(ShardStream(ds_path, **kw), num_workers=2)
    dl.set_epoch(3)
    seen = []
    for i, b in enumerate(dl):
        seen += b["id"].tolist()
        if i == 24:
            break
    state = dl.state_dict()
    assert state["epoch"] == 3 and state["consumed"] == 25 * 16
    # a simulated restart: fresh stream and loader
    dl2 = loader(ShardStream(ds_path, **kw), num_workers=2)
    dl2.load_state_dict(state)
    rest = ids_of(dl2)
    assert len(seen) + len(rest) == N
    assert sorted(seen + rest) == list(range(N))
    full = ShardStream(ds_path, **kw)
    full.set_epoch(3)
    assert seen + rest == ids_of(full)  # the very same order as an uninterrupted epoch
    assert dl2.epoch == 4 and dl2.state_dict()["consumed"] == 0


def test_resume_single_process_state_dict(ds_path):
    ds = ShardStream(ds_path, batch_size=10, shuffle=True)
    it = iter(ds)
    seen = ids_of(next(it) for _ in range(7))
    state = ds.state_dict()
    ds2 = ShardStream(ds_path, batch_size=10, shuffle=True)
    ds2.load_state_dict(state)
    assert sorted(seen + ids_of(ds2)) == list(range(N))


def test_resume_with_other_world_size(ds_path):
    """State saved by 2 ranks in lockstep continues on 3 ranks: no loss, no repeat."""
    kw = dict(batch_size=16, shuffle=True, remainder="drop")
    streams = [ShardStream(ds_path, rank=r, world_size=2, **kw) for r in range(2)]
    its = [iter(s) for s in streams]
    seen = ids_of(next(it) for _ in range(10) for it in its)
    state = streams[0].state_dict()
    assert state == streams[1].state_dict() and state["consumed"] == 320
    rest = []
    for r in range(3):
        s = ShardStream(ds_path, rank=r, world_size=3, **kw)
        s.load_state_dict(state)
        rest += ids_of(s)
    assert len(set(seen + rest)) == len(seen + rest) == 320 + (N - 320) // 3 * 3


def test_resume_rejects_other_settings(ds_path):
    state = ShardStream(ds_path, batch_size=8, shuffle=True).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardStream(ds_path, batch_size=8, shuffle=True, seed=5).load_state_dict(state)


def test_resume_after_full_epoch_starts_next(ds_path):
    dl = loader(ShardStream(ds_path, batch_size=100), num_workers=0)
    ids_of(dl)
    assert dl.state_dict()["epoch"] == 1 and dl.state_dict()["consumed"] == 0


# ---------------------------------------------------------------- errors
def _shards(path):
    return sorted(glob.glob(os.path.join(path, "*.tar")))


def test_truncated_shard_names_shard_and_sample(ds_path):
    shard = _shards(ds_path)[2]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CorruptShardError) as exc:
        list(ShardStream(ds_path, batch_size=32))
    msg = str(exc.value)
    assert os.path.basename(shard) in msg and "truncated" in msg
    assert "sample 00000" in msg and "byte offset" in msg


def test_corrupt_block_names_shard_and_sample(ds_path, caplog):
    shard = _shards(ds_path)[1]
    with open(shard, "r+b") as f:  # clobber the middle of the first block's data
        f.seek(512 + 300)
        f.write(b"\xc1" * 16)  # 0xc1 is never valid msgpack
    with pytest.raises(CorruptShardError) as exc:
        list(ShardStream(ds_path, batch_size=32))
    msg = str(exc.value)
    assert os.path.basename(shard) in msg and "byte offset" in msg and "sample 0000001" in msg
    ds = ShardStream(ds_path, batch_size=32, on_error="warn")
    with caplog.at_level(logging.WARNING, logger="shardstream"):
        batches = list(ds)
    assert len(batches) == len(ds) and all(len(b["id"]) == 32 for b in batches[:-1])
    assert 0 < ds.skipped <= 97  # the rest of shard 1 (97 samples) only; block 0 is damaged
    assert os.path.basename(shard) in caplog.text and "skipping the rest" in caplog.text
    ids = ids_of(batches)
    assert len(ids) == N and len(set(ids)) == N - ds.skipped  # skipped slots are repeats


def test_warn_counts_across_workers(ds_path):
    shard = _shards(ds_path)[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 1024 - 200)  # tar end + 200 bytes of data
    ds = ShardStream(ds_path, batch_size=16, on_error="warn")
    dl = loader(ds, num_workers=2)
    assert len(list(dl)) == len(ds)
    assert ds.skipped > 0 and dl.skipped == ds.skipped


def test_missing_shard_and_index(ds_path):
    shard = _shards(ds_path)[3]
    os.remove(shard + ".idx")
    with pytest.raises(ShardNotFoundError, match="shardstream index"):
        list(ShardStream(ds_path, batch_size=100))
    os.remove(shard)
    with pytest.raises(ShardNotFoundError, match=os.path.basename(shard)):
        list(ShardStream(ds_path, batch_size=100))
    ds = ShardStream(ds_path, batch_size=100, on_error="warn")
    assert len(list(ds)) == 10 and ds.skipped == 97


def test_replaced_shard_is_an_index_mismatch(ds_path):
    shard = _shards(ds_path)[0]
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(IndexMismatchError, match="rebuild"):
        list(ShardStream(ds_path, batch_size=100))


def test_bad_arguments(ds_path):
    for kw in ({"remainder": "keep"}, {"on_error": "ignore"}, {"batch_size": 0},
               {"resampled": True}):
        with pytest.raises(ValueError):
            ShardStream(ds_path, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        loader(ShardStream(ds_path), batch_size=4)


# ---------------------------------------------------------------- without a manifest
def test_own_shards_without_manifest(ds_path):
    pattern = os.path.join(ds_path, "shard-{000000..000010}.tar")
    got = []
    for r in range(2):
        ds = ShardStream(pattern, batch_size=10, rank=r, world_size=2)
        with pytest.raises(TypeError, match="manifest"):
            len(ds)
        got += ids_of(ds)
    assert sorted(got) == list(range(N))
    with_workers = ids_of(loader(ShardStream(pattern, batch_size=10, shuffle=True),
                                 num_workers=2))
    assert sorted(with_workers) == list(range(N))


def test_resampled_epoch_size(ds_path):
    urls = _shards(ds_path)
    ds = ShardStream(urls, batch_size=10, resampled=True, epoch_size=300, rank=0, world_size=2,
                     shuffle=True)
    assert len(ds) == 15
    dl = loader(ds, num_workers=2)
    batches = list(dl)
    assert len(batches) == 15 and all(len(b["id"]) == 10 for b in batches)
    assert Counter(ids_of(batches)).most_common(1)[0][1] >= 1


def test_loader_device_cpu_and_pin_passthrough(ds_path):
    dl = loader(ShardStream(ds_path, batch_size=100), num_workers=2, device="cpu",
                pin_memory=False)
    batches = list(dl)
    assert len(batches) == 10 and isinstance(batches[0]["x"], torch.Tensor)
    assert isinstance(batches[0]["meta"]["even"], torch.Tensor)


def test_pickle_and_deepcopy_keep_settings(ds_path):
    import copy
    import pickle

    ds = ShardStream(ds_path, batch_size=10, shuffle=True)
    ds.set_epoch(4)
    for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert clone.epoch == 4 and ids_of(clone) == ids_of(ds)
        clone.set_epoch(5)
        assert ds.epoch == 4  # a copy, not shared


def test_loader_shared_memory_batches_kept_and_bounded(make_dataset):
    """Batches big enough to travel in shared memory: every kept batch stays intact
    while the workers reuse their slots, and the main process lets go of the slots."""
    import gc

    

    def make(i):
        return {"id": i, "t": np.full(50 + i % 200, i, dtype=np.int64), "s": str(i)}

    path = make_dataset(3000, name="big", make=make, max_samples=500, block_bytes=65536)
    ref = list(ShardStream(path, batch_size=64, shuffle=True))
    ds = ShardStream(path, batch_size=64, shuffle=True)
    dl = loader(ds, num_workers=2)
    kept = list(dl)  # every batch held: the rings fill up, the rest is piped
    pids = {w.pid for w in dl.dataloader._iterator._workers}
    mine = lambda: [k for k in wire._slots if k[0] in pids]  # noqa: E731
    assert mine()
    for e in range(3):  # batches dropped at once: slots are reused
        ds.set_epoch(0)
        for b, r in zip(dl, ref):
            assert torch.equal(b["t"], r["t"]) and b["s"] == r["s"]
    assert len(kept) == len(ref)
    for b, r in zip(kept, ref):
        assert torch.equal(b["t"], r["t"]) and torch.equal(b["t_lengths"], r["t_lengths"])
        assert torch.equal(b["id"], r["id"]) and b["s"] == r["s"]
    assert len(mine()) <= 2 * wire._SHM_MAX_SLOTS
    del dl
    gc.collect()
    assert not mine()
    assert torch.equal(kept[-1]["t"], ref[-1]["t"])  # still valid after the workers left


def test_missing_local_source_fails_at_construction(tmp_path):
    from shardstream.errors import ShardNotFoundError

    with pytest.raises(ShardNotFoundError, match="nope does not exist"):
        ShardStream(str(tmp_path / "nope"))
    with pytest.raises(ShardNotFoundError, match=r"a-0\.tar \(and 2 more\) does not exist"):
        ShardStream(str(tmp_path / "a-{0..2}.tar"))
