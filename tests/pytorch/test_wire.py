"""The shared-memory hand-over of batches (shardstream.pytorch.wire): slot ownership travels
through each worker's return pipe, never through a flag in shared memory."""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch

from shardstream.pytorch import wire as C
from shardstream.pytorch import wire as pytorch_wire
from shardstream.pytorch.collation import collate
from shardstream.pytorch.loader import loader
from shardstream.pytorch.stream import ShardStream


@pytest.fixture
def worker(monkeypatch):
    """This process plays both ends: to_wire as in a DataLoader worker (fresh ring),
    from_wire as the main process; the hand-over is recorded in ``C._trace``."""
    monkeypatch.setattr(C, "_in_worker", lambda: True)
    monkeypatch.setattr(C, "_ring", None)
    monkeypatch.setattr(C, "_SHM_MIN_BYTES", 0)
    monkeypatch.setattr(C, "_trace", [])
    return C


def ship(obj):
    """Pickle as the DataLoader's result queue does, and unpickle."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

    return ForkingPickler.loads(ForkingPickler.dumps(obj))


def batch(i: int, n: int = 300) -> dict:
    return collate([{"t": np.full(n + i % 7, i, dtype=np.int64), "s": str(i)},
                    {"t": np.ones(3, np.int64)}])


def same(got: dict, i: int) -> bool:
    exp = batch(i)
    return (torch.equal(got["t"], exp["t"]) and torch.equal(got["t_lengths"], exp["t_lengths"])
            and got["s"] == exp["s"])


def check_order(trace: list) -> None:
    """Every slot cycles take -> free -> back: the worker never takes a slot it did not own."""
    follows = {"take": "free", "free": "back", "back": "take"}
    state: dict = {}
    for n, (pid, i, event) in enumerate(trace):
        last = state.get((pid, i), "back")  # a new slot starts as the worker's
        assert event == follows[last], f"event {n}: slot {i} {event} after {last}"
        state[pid, i] = event


def test_slots_come_back_only_through_the_return_pipe(worker):
    """A seeded schedule of sends and drops: no slot is taken again before its number
    came back, and every held batch keeps its contents throughout."""
    rng = random.Random(0)
    held: dict[int, dict] = {}
    sent = 0
    for step in range(300):
        if held and (rng.random() < 0.5 or len(held) >= 10):
            del held[rng.choice(sorted(held))]  # the main process lets go of one batch
        else:
            wire = pytorch_wire.to_wire(batch(sent))
            held[sent] = pytorch_wire.from_wire(ship(wire))
            sent += 1
        assert all(same(b, i) for i, b in held.items()), f"step {step}"
    events = [e for _, _, e in pytorch_wire._trace]
    assert events.count("take") > 50 and events.count("back") > 40  # slots were reused
    assert len({i for _, i, _ in pytorch_wire._trace}) == pytorch_wire._SHM_MAX_SLOTS
    check_order(pytorch_wire._trace)


def test_a_freed_flag_seen_early_does_not_hand_the_slot_back(worker, monkeypatch):
    """On aarch64 a worker may see the main process's "free" store before its reads of
    the batch are done; here the slot's state word reads 0 while the batch is held."""
    monkeypatch.setattr(C, "_SHM_MAX_SLOTS", 1)
    held = pytorch_wire.from_wire(ship(pytorch_wire.to_wire(batch(1))))
    pytorch_wire._ring.slots[0][2][0] = 0  # what a reordered store would let the worker see
    again = pytorch_wire.to_wire(batch(2))
    assert type(again) is not pytorch_wire._Wire  # the only slot is still the main process's: piped
    assert same(held, 1) and same(pytorch_wire.from_wire(again), 2)
    del held
    gc.collect()
    assert type(pytorch_wire.to_wire(batch(3))) is pytorch_wire._Wire  # its number came back: in use again
    check_order(pytorch_wire._trace)


def test_a_fork_of_the_main_process_dropping_a_batch_keeps_its_slot_busy(worker, monkeypatch):
    """A child forked while the main process holds a batch (a new DataLoader worker,
    say) frees its copy of the batch: the slot must stay the main process's."""
    monkeypatch.setattr(C, "_SHM_MAX_SLOTS", 1)
    held = pytorch_wire.from_wire(ship(pytorch_wire.to_wire(batch(1))))
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            del held
            gc.collect()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    again = pytorch_wire.to_wire(batch(2))
    assert type(again) is not pytorch_wire._Wire and same(held, 1)
    assert [e for _, _, e in pytorch_wire._trace] == ["take"]


def test_dropping_a_batch_after_its_worker_exited_is_silent(worker, monkeypatch):
    """The return pipe's reader is gone (EPIPE): the batch is dropped without a word."""
    held = pytorch_wire.from_wire(ship(pytorch_wire.to_wire(batch(1))))
    ring = pytorch_wire._ring
    os.close(ring.rfd)  # the worker is gone: nobody reads its return pipe
    ring.rfd = os.open(os.devnull, os.O_RDONLY)  # (for the ring's own cleanup)
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    pytorch_wire.forget_workers([ring.pid])
    assert same(held, 1)
    del held
    gc.collect()
    assert not unraisable and pytorch_wire._trace[-1][2] == "free"


def test_return_pipe_sent_once_per_worker(worker):
    """The first batch brings the slot and the return pipe; later ones neither."""
    first = pytorch_wire.to_wire(batch(1))
    assert first.slot is not None and first.back is not None
    a = pytorch_wire.from_wire(ship(first))
    second = pytorch_wire.to_wire(batch(2))  # slot 0 still held: a new slot, no new pipe
    assert second.slot is not None and second.back is None and second.key[1] == 1
    b = pytorch_wire.from_wire(ship(second))
    del a
    gc.collect()
    third = pytorch_wire.to_wire(batch(3))
    assert third.key[1] == 0 and third.slot is None and third.back is None
    assert same(b, 2) and same(pytorch_wire.from_wire(ship(third)), 3)


# ------------------------------------------------------------ through real workers
def make_big(i: int) -> dict:
    return {"id": i, "t": np.full(40 + i % 50, i, dtype=np.int64), "s": str(i)}


@pytest.fixture
def big(make_dataset):
    path = make_dataset(1200, name="big", make=make_big, max_samples=300, block_bytes=65536)
    return path, list(ShardStream(path, batch_size=64))


def equal(b: dict, r: dict) -> bool:
    return (torch.equal(b["t"], r["t"]) and torch.equal(b["t_lengths"], r["t_lengths"])
            and torch.equal(b["id"], r["id"]) and b["s"] == r["s"])


def mapped(pids) -> list[str]:
    """This process's mappings and /dev/shm names of the workers ``pids``' slots."""
    tags = tuple(f"torch_{p}_" for p in pids)
    with open("/proc/self/maps") as f:
        maps = [ln for ln in f if any(t in ln for t in tags)]
    return maps + [n for n in os.listdir("/dev/shm") if n.startswith(tags)]


def return_pipes(pids) -> list:
    """The main process's ends of the workers ``pids``' return pipes still open."""
    return [o for o in gc.get_objects() if type(o) is pytorch_wire._Returns and o.pid in pids]


@pytest.mark.parametrize("context, workers", [("fork", 2), ("spawn", 1)])
def test_loader_held_batches_intact_and_nothing_left_after_delete(big, context, workers):
    """Every batch of the first epoch held while the workers go on (fork and spawn);
    deleting the loader and the batches leaves no slot mapped, no pipe open."""
    path, ref = big
    dl = loader(ShardStream(path, batch_size=64), num_workers=workers,
                multiprocessing_context=context)
    kept = list(dl)  # all held: each ring fills up, the rest is piped
    pids = [w.pid for w in dl.dataloader._iterator._workers]
    assert {k[0] for k in pytorch_wire._slots} >= set(pids) and set(pytorch_wire._returns) >= set(pids)
    assert all(equal(b, r) for b, r in zip(dl, ref))  # epoch 2: slots reused as dropped
    assert len(kept) == len(ref) and all(equal(b, r) for b, r in zip(kept, ref))
    del dl
    gc.collect()
    assert all(equal(b, r) for b, r in zip(kept, ref))  # still valid after the workers left
    assert mapped(pids) and return_pipes(pids)  # (the held batches keep their slots)
    del kept
    gc.collect()
    assert not mapped(pids) and not return_pipes(pids) and not set(pytorch_wire._returns) & set(pids)


def test_loader_worker_killed_then_new_workers(big):
    """A worker killed mid-epoch: the loader says so, batches already held stay intact
    and can be dropped quietly, and the next epoch's new workers hand over as before."""
    path, ref = big
    dl = loader(ShardStream(path, batch_size=64), num_workers=2, persistent_workers=False)
    before = {p.pid for p in multiprocessing.active_children()}
    it = iter(dl)
    kept = [next(it) for _ in range(4)]  # two from each worker, in shared memory
    victim = min({p.pid for p in multiprocessing.active_children()} - before)
    assert (victim, 0) in pytorch_wire._slots
    with pytest.raises(RuntimeError, match=f"pid {victim}"):  # torch's SIGCHLD handler
        os.kill(victim, signal.SIGKILL)
        os.waitid(os.P_PID, victim, os.WEXITED | os.WNOWAIT)  # dead (torch reaps it)
        kept.extend(it)
    assert all(equal(b, r) for b, r in zip(kept, ref))
    unraisable: list = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        del it, kept
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not unraisable and victim not in pytorch_wire._returns
    dl.set_epoch(0)
    got = list(dl)
    assert len(got) == len(ref) and all(equal(b, r) for b, r in zip(got, ref))
