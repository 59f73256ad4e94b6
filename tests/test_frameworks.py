"""The loader under the training frameworks: Lightning, accelerate, torchdata.

Fast tests drive ``ShardLoader`` the way those frameworks do (exactly ``len()``
batches, a fresh ``iter()`` per epoch, a loaded state); the ``slow`` ones run the
real frameworks in subprocesses (scripts under tests/scripts/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice

import pytest
import torch
from test_distributed import torchrun

from shardstream import ShardStream
from shardstream.errors import UsageError
from shardstream.pytorch.loader import loader

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
N = 1000
BS = 16
LEN = -(-N // BS)  # 63 batches, the last one of 8


def ids_of(batches) -> list[int]:
    return [int(i) for b in batches for i in b["id"]]


def take(dl, n: int) -> list:
    """What Lightning's fetcher does: ``n`` batches from a fresh iterator, then drop it."""
    return list(islice(iter(dl), n))


@pytest.fixture
def path(make_dataset) -> str:
    return make_dataset(N)


def make_loader(path: str, workers: int):
    return loader(ShardStream(path, batch_size=BS, shuffle=True, seed=4, shuffle_buffer=128),
                  num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_len_batches_then_drop_iterator_advances_epochs(path, workers):
    dl = make_loader(path, workers)
    epochs = []
    for e in range(3):
        assert dl.state_dict()["epoch"] == e and dl.state_dict()["consumed"] == 0
        head = take(dl, 5) if e == 1 else []  # a partial pass: the next iter() restarts it
        assert dl.state_dict()["epoch"] == e and dl.state_dict()["consumed"] == 5 * BS * bool(head)
        batches = take(dl, len(dl))
        if head:
            assert ids_of(head) == ids_of(batches[:5])
        assert dl.epoch == e + 1  # the last batch is delivered: the next pass reads e + 1
        assert dl.state_dict()["epoch"] == e + 1 and dl.state_dict()["consumed"] == 0
        epochs.append(ids_of(batches))
    assert all(sorted(ids) == list(range(N)) for ids in epochs)
    assert len({tuple(ids) for ids in epochs}) == 3  # a new order every epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_then_len_consumer_sees_complete_epochs(path, workers):
    dl = make_loader(path, workers)
    dl.set_epoch(2)
    it = iter(dl)
    seen = ids_of(next(it) for _ in range(20))
    state = dl.state_dict()
    assert (state["epoch"], state["consumed"]) == (2, 20 * BS)
    del it, dl

    dl = make_loader(path, workers)  # a restart, as Lightning does it
    dl.load_state_dict(state)
    rest = ids_of(take(dl, len(dl) - 20))  # the fetcher counts the 20 it had
    assert sorted(seen + rest) == list(range(N))
    assert (dl.state_dict()["epoch"], dl.state_dict()["consumed"]) == (3, 0)
    for e in (3, 4):
        ids = ids_of(take(dl, len(dl)))
        assert sorted(ids) == list(range(N)), f"epoch {e} is short or repeats"
    ref = ShardStream(path, batch_size=BS, shuffle=True, seed=4, shuffle_buffer=128)
    ref.set_epoch(4)
    assert ids == ids_of(ref)  # the very order of an uninterrupted epoch 4


def test_new_iter_after_partial_resumed_pass_restarts_from_resume_point(path):
    dl = make_loader(path, 0)
    dl.load_state_dict({**dl.state_dict(), "epoch": 1, "consumed": 10 * BS})
    first = ids_of(take(dl, 3))
    assert dl.state_dict()["consumed"] == 13 * BS
    again = take(dl, len(dl))  # runs out after the rest of the epoch: 53 batches
    assert len(again) == LEN - 10 and ids_of(again[:3]) == first
    assert (dl.state_dict()["epoch"], dl.state_dict()["consumed"]) == (2, 0)


def test_explicit_set_epoch_after_complete_pass_wins(path):
    dl = make_loader(path, 0)
    dl.load_state_dict({**dl.state_dict(), "epoch": 1, "consumed": 10 * BS})
    take(dl, LEN - 10)
    dl.set_epoch(1)  # replay epoch 1: whole (the resume point was used up)
    assert len(take(dl, len(dl) + 1)) == LEN
    dl.dataset.set_epoch(7)  # on the stream itself, as the README loop does
    assert dl.epoch == 7 and dl.state_dict()["epoch"] == 7
    assert ids_of(take(dl, len(dl))) != ids_of(take(dl, len(dl)))  # 7, then 8


def test_accelerate_iterable_dataset_shard_is_refused(path):
    shard_mod = pytest.importorskip("accelerate.data_loader")
    stream = ShardStream(path, batch_size=BS, rank=0, world_size=2)
    shard = shard_mod.IterableDatasetShard(stream, batch_size=1, num_processes=2,
                                           process_index=0)
    with pytest.raises(UsageError, match="re-split by accelerate.*shardstream.loader"):
        next(iter(shard))
    with pytest.raises(UsageError, match=os.path.basename(path)):
        shard.set_epoch(1)
    alone = ShardStream(path, batch_size=BS)  # one process: nothing split, nothing refused
    assert len(list(shard_mod.IterableDatasetShard(alone, batch_size=1))) == LEN


# ---------------------------------------------------------------- real frameworks
BIG = 10007  # 11 shards of <= 997: uneven


@pytest.fixture
def big(make_dataset) -> str:
    return make_dataset(BIG, name="big", max_samples=997, block_bytes=4096)


def run_script(*args: str, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(SCRIPTS), os.path.dirname(
               os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode:
        out = proc.stdout + proc.stderr
        first = out.find("Traceback")
        raise AssertionError(out[first:first + 4000] if first >= 0 else out[-4000:])


def check_epoch(ids_per_rank: list[list[int]], batches_per_rank: list[int], n: int,
                world: int) -> None:
    """Equal batches per rank; every sample once, fewer than ``world`` repeated (padding)."""
    assert len(set(batches_per_rank)) == 1, batches_per_rank
    flat = [i for ids in ids_per_rank for i in ids]
    assert set(flat) == set(range(n)) and 0 <= len(flat) - n < world


@pytest.mark.slow
def test_lightning_ddp_epochs_and_mid_epoch_checkpoint(big, tmp_path):
    pytest.importorskip("lightning")
    script = os.path.join(SCRIPTS, "lightning_fit.py")
    out = tmp_path / "out"
    out.mkdir()
    run_script(script, big, str(out), "fresh", "1", "30")
    ckpt = torch.load(out / "mid.ckpt", weights_only=False)
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["consumed"]) == (1, 31 * 64 * 2)  # the loader's state
    run_script(script, big, str(out), "resume")
    rows = {(m, r): [json.loads(x) for x in open(out / f"ids-{m}-rank{r}.jsonl")]
            for m in ("fresh", "resume") for r in (0, 1)}
    per_rank_batches = -(-(-(-BIG // 2)) // 64)
    orders = []
    for epoch in range(3):
        ids = [[i for m in ("fresh", "resume") for x in rows[m, r] if x["epoch"] == epoch
                for i in x["ids"]] for r in (0, 1)]
        counts = [sum(x["epoch"] == epoch for m in ("fresh", "resume") for x in rows[m, r])
                  for r in (0, 1)]
        assert counts[0] == per_rank_batches
        check_epoch(ids, counts, BIG, 2)
        orders.append(ids[0])
    assert len({tuple(o) for o in orders}) == 3  # a new order every epoch, no user hook
    assert sum(x["epoch"] == 1 for x in rows["resume", 0]) == per_rank_batches - 31


@pytest.mark.slow
def test_accelerate_documented_pattern_exact_and_wrong_pattern_loud(big, tmp_path):
    pytest.importorskip("accelerate")
    torchrun(os.path.join(SCRIPTS, "accelerate_stream.py"), big, str(tmp_path), "20",
             timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1", "2"):
        ids = [r["epochs"][epoch] for r in ranks]
        check_epoch(ids, [len(i) for i in ids], BIG, 2)
    assert ranks[0]["epochs"]["0"] != ranks[0]["epochs"]["1"]
    for r in ranks:
        assert r["resumed_epoch"] == 1
        for how in ("dispatch", "no_dispatch"):
            assert r["wrong"][how].startswith("UsageError: "), r["wrong"][how]
            assert "shardstream.loader(stream" in r["wrong"][how]


@pytest.mark.slow
def test_torchdata_stateful_dataloader_resumes_across_process_restart(make_dataset, tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    path = make_dataset(3001, name="td", max_samples=301)
    script = os.path.join(SCRIPTS, "torchdata_resume.py")
    state, head, tail = (str(tmp_path / n) for n in ("state.pt", "head.json", "tail.json"))
    run_script(script, path, state, head, "head", "37")
    run_script(script, path, state, tail, "tail")
    ref = ShardStream(path, batch_size=32, shuffle=True, seed=11, shuffle_buffer=256)
    ref.set_epoch(2)
    got = json.load(open(head)) + json.load(open(tail))
    assert len(json.load(open(head))) == 37 * 32
    assert got == ids_of(ref)  # nothing lost or repeated, the uninterrupted order
