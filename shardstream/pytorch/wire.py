"""Batches across the process boundary: DataLoader worker -> main process.

:func:`to_wire` turns a collated batch into numpy (in a worker: into one slot of a
per-worker ring of shared-memory buffers; only the layout goes through the pipe);
:func:`from_wire` makes tensors of it in the main process without copying. The
comment above the ring gives its lifetime rules."""

from __future__ import annotations

import os
import weakref
from multiprocessing.reduction import DupFd
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from shardstream.pytorch.collation import Ragged

__all__ = ["to_wire", "from_wire", "forget_workers"]


def to_wire(batch: Any) -> Any:
    """Tensors -> numpy (recursively), for the trip from a DataLoader worker.

    Sharing a tensor with the main process costs a shared-memory segment (about
    0.4 ms each) and piping a pickled array costs a copy through the kernel and
    a read in the main process. Inside a DataLoader worker the numeric arrays
    of a batch are instead written into one slot of a small per-worker ring of
    shared-memory buffers (created once, handed over once); only the layout
    travels through the pipe. :func:`from_wire` undoes it in the main process.
    """
    tree = _numpy_tree(batch)
    if _SHM_ENABLED and _in_worker():
        msg = _worker_ring().pack(tree)
        if msg is not None:
            return msg
    return tree


def _numpy_tree(batch: Any) -> Any:
    t = type(batch)
    if t is torch.Tensor:
        return batch.numpy() if batch.device.type == "cpu" and not batch.requires_grad else batch
    if t is dict:
        return {k: _numpy_tree(v) for k, v in batch.items()}
    if t is list and not _NESTED.isdisjoint(map(type, batch)):  # not for lists of str
        return [_numpy_tree(v) for v in batch]
    return batch


_NESTED = frozenset((torch.Tensor, dict, list))


def from_wire(batch: Any) -> Any:
    """numpy arrays -> tensors (zero-copy), recursively through dicts and lists."""
    t = type(batch)
    if t is np.ndarray:
        return torch.from_numpy(batch) if batch.dtype.kind in "biuf" else batch
    if t is Ragged:
        return batch.pad()
    if t is dict:
        return {k: from_wire(v) for k, v in batch.items()}
    if t is list and batch and type(batch[0]) is np.ndarray:
        return [from_wire(v) for v in batch]
    if t is _Wire:  # not unpickled (same process): resolve it here
        return from_wire(_rebuild(*batch.__reduce__()[1]))
    return batch


_SHM_ENABLED = os.environ.get("SHARDSTREAM_SHM", "1") != "0"
_SHM_MIN_BYTES = 16 << 10  # smaller batches are cheaper to pipe
_SHM_MAX_SLOTS = 8  # per worker (below 256: a slot number is one byte in the return pipe)
_SHM_MAX_BYTES = 512 << 20  # per worker, all slots together
_HEADER = 64
_ALIGN = 64

# tests/debugging: a list here records the hand-over as (worker pid, slot, event): "take"
# (worker fills it), "free" (main process lets go), "back" (worker gets it back); None: off
_trace: list | None = None


_pid = os.getpid()  # this process's, kept current across forks (no syscall per batch)


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _in_worker() -> bool:
    return get_worker_info() is not None


class _Ref:
    """Where one array of a batch lies in its slot."""

    __slots__ = ("offset", "dtype", "shape")

    def __init__(self, offset: int, dtype: str, shape: tuple) -> None:
        self.offset, self.dtype, self.shape = offset, dtype, shape

    def __reduce__(self) -> tuple:
        return (_Ref, (self.offset, self.dtype, self.shape))


class _Wire:
    """A batch whose arrays wait in a worker's shared slot (see above)."""

    __slots__ = ("key", "slot", "tree", "back")

    def __init__(self, key: tuple, slot: torch.Tensor | None, tree: Any,
                 back: _BackEnd | None = None) -> None:
        self.key, self.slot, self.tree, self.back = key, slot, tree, back

    def __reduce__(self) -> tuple:
        return (_rebuild, (self.key, self.slot, self.tree, self.back))


class _BackEnd:
    """Worker side: the write end of the ring's return pipe, as it travels (its
    descriptor is passed to the main process when the _Wire is pickled)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple:
        return (_returns_from, (DupFd(self.fd),))


class _Returns:
    """Main process: where freed slot numbers of one worker go (the pipe's write end).

    Kept alive by the finalizers of the batches still held, so the descriptor
    outlives ``forget_workers`` until the last of them is gone."""

    __slots__ = ("fd", "pid", "owner")

    def __init__(self, fd: int, pid: int) -> None:
        self.fd, self.pid, self.owner = fd, pid, _pid

    def give(self, i: int) -> None:
        """Hand slot ``i`` back to the worker (a no-op once it is gone)."""
        if _trace is not None:
            _trace.append((self.pid, i, "free"))
        try:
            os.write(self.fd, bytes((i,)))
        except OSError:  # the worker exited (EPIPE): nothing to hand back to
            pass

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _returns_from(fd: Any) -> _Returns:
    """Unpickling a _BackEnd (in the main process); the worker's pid follows in _rebuild."""
    return _Returns(fd.detach(), 0)


class _Ring:
    """A worker's slots: [tensor, uint8 numpy view, int64 state view, sent?, owned?]."""

    def __init__(self) -> None:
        self.pid = _pid
        self.slots: list[list] = []
        self.next = 0
        self.disabled = False
        self.back_sent = False
        try:
            self.rfd, self.wfd = os.pipe()
        except OSError:  # out of descriptors: pipe every batch
            self.rfd = self.wfd = -1
            self.disabled = True
            return
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)  # the main process never waits on a full pipe

    def __del__(self) -> None:
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _layout(self, tree: Any, arrays: list) -> Any:
        t = type(tree)
        if t is np.ndarray and tree.dtype.kind in "biuf":
            arrays.append(tree)
            return _Ref(0, tree.dtype.str, tree.shape)
        if t is dict:
            return {k: self._layout(v, arrays) for k, v in tree.items()}
        if t is list and tree and type(tree[0]) is np.ndarray:
            return [self._layout(v, arrays) for v in tree]
        return tree

    def pack(self, tree: Any) -> _Wire | None:
        if self.disabled:
            return None
        arrays: list[np.ndarray] = []
        skeleton = self._layout(tree, arrays)
        if not arrays:
            return None
        offsets, end = [], _HEADER
        for a in arrays:
            offsets.append(end)
            end += -(-a.nbytes // _ALIGN) * _ALIGN
        refs: list[_Ref] = []
        _collect_refs(skeleton, refs)
        if end - _HEADER < _SHM_MIN_BYTES:
            return None
        i = self._slot(end)
        if i is None:
            return None
        slot = self.slots[i]
        slot[4] = False  # the main process's until its number comes back
        if _trace is not None:
            _trace.append((self.pid, i, "take"))
        buf = slot[1]
        for a, off, ref in zip(arrays, offsets, refs):
            np.ndarray(a.shape, a.dtype, buffer=buf, offset=off)[...] = a
            ref.offset = off
        slot[2][0] = 1
        first = not slot[3]
        slot[3] = True
        back = None
        if not self.back_sent:
            back, self.back_sent = _BackEnd(self.wfd), True
        return _Wire((self.pid, i), slot[0] if first else None, skeleton, back)

    def _drain(self) -> None:
        """Take back the slots whose numbers the main process wrote into the return pipe."""
        while True:
            try:
                data = os.read(self.rfd, 256)
            except BlockingIOError:
                return
            for i in data:
                if i < len(self.slots) and not self.slots[i][4]:  # else a stray number
                    self.slots[i][4] = True
                    if _trace is not None:
                        _trace.append((self.pid, i, "back"))
            if len(data) < 256:
                return

    def _slot(self, size: int) -> int | None:
        """A slot this worker owns with room for ``size`` bytes, or None (pipe the batch).

        The return pipe is read only when no owned slot is left (one syscall, not one
        per batch); a new slot is made only when none came back either."""
        i = self._owned(size)
        if i is None:
            self._drain()
            i = self._owned(size)
        n = len(self.slots)
        if i is None and n < _SHM_MAX_SLOTS and self._grow(n, size):
            self.next, i = 0, n
        return i

    def _owned(self, size: int) -> int | None:
        n = len(self.slots)
        for k in range(n):
            i = (self.next + k) % n
            s = self.slots[i]
            if s[4]:
                if len(s[1]) < size and not self._grow(i, size):
                    continue
                self.next = (i + 1) % n
                return i
        return None

    def _grow(self, i: int, size: int) -> bool:
        """(Re)allocate slot ``i`` (owned by this worker) with room for ``size`` bytes."""
        cap = -(-(size + size // 8) // 65536) * 65536
        have = sum(len(s[1]) for k, s in enumerate(self.slots) if k != i)
        if have + cap > _SHM_MAX_BYTES:
            return False
        try:
            t = torch.empty(cap, dtype=torch.uint8).share_memory_()
        except (RuntimeError, OSError):  # no shared memory to be had: pipe from now on
            self.disabled = True
            return False
        buf = t.numpy()
        state = buf[:8].view(np.int64)
        state[0] = 0
        entry = [t, buf, state, False, True]
        if i == len(self.slots):
            self.slots.append(entry)
        else:
            self.slots[i] = entry
        return True


_ring: _Ring | None = None


def _worker_ring() -> _Ring:
    global _ring
    if _ring is None or _ring.pid != _pid:
        _ring = _Ring()
    return _ring


_REF_OR_ARRAY = (_Ref, np.ndarray)


def _collect_refs(skeleton: Any, out: list) -> None:
    """The _Refs of a skeleton in the order _Ring._layout met their arrays."""
    t = type(skeleton)
    if t is _Ref:
        out.append(skeleton)
    elif t is dict:
        for v in skeleton.values():
            _collect_refs(v, out)
    elif t is list and skeleton and type(skeleton[0]) in _REF_OR_ARRAY:
        for v in skeleton:
            _collect_refs(v, out)


# main process: each worker's return pipe, by pid, and the slots received so far,
# (worker pid, slot) -> (tensor, state view, return pipe)
_returns: dict[int, _Returns] = {}
_slots: dict[tuple[int, int], tuple[torch.Tensor, np.ndarray, _Returns]] = {}


def _release(state: np.ndarray, returns: _Returns, i: int) -> None:
    """The finalizer of a batch's views: its slot goes back to the worker."""
    if _pid == returns.owner:  # not a fork of this process dropping an inherited batch
        state[0] = 0
        returns.give(i)


def _rebuild(key: tuple, slot: torch.Tensor | None, tree: Any,
             back: _Returns | _BackEnd | None = None) -> Any:
    """Unpickling a _Wire: numpy views on the slot, handed back together."""
    pid, i = key
    if back is not None:
        if type(back) is _BackEnd:  # not unpickled (same process)
            back = _Returns(os.dup(back.fd), pid)
        back.pid = pid
        if pid not in _returns:
            _prune()
        _returns[pid] = back
    if slot is not None:
        returns = _returns.get(pid)
        if returns is None:
            raise RuntimeError(f"batch from worker {pid} brought shared slot {i} but not the "
                               "worker's return pipe, which this process never received (or "
                               "forgot); set SHARDSTREAM_SHM=0 to send batches through the pipe")
        _slots[key] = entry = (slot, slot.numpy()[:8].view(np.int64), returns)
    else:
        entry = _slots.get(key)
        if entry is None:
            raise RuntimeError(f"batch from worker {pid} refers to shared slot {i}, which this "
                               "process never received (or forgot); set SHARDSTREAM_SHM=0 to "
                               "send batches through the pipe")
    base = entry[0].numpy()  # the one base every view of this batch keeps alive
    weakref.finalize(base, _release, entry[1], entry[2], i).atexit = False
    return _views(tree, base)


def _views(tree: Any, base: np.ndarray) -> Any:
    t = type(tree)
    if t is _Ref:
        return np.ndarray(tree.shape, tree.dtype, buffer=base, offset=tree.offset)
    if t is dict:
        return {k: _views(v, base) for k, v in tree.items()}
    if t is list and tree and type(tree[0]) in _REF_OR_ARRAY:
        return [_views(v, base) for v in tree]
    return tree


def _prune() -> None:
    """Forget the slots of workers that have exited."""
    for pid in list(_returns):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            forget_workers([pid])
        except OSError:
            pass


def forget_workers(pids: Any) -> None:
    """Drop this process's handles on the slots of workers ``pids`` (batches still
    held keep their own slot, and the pipe to hand it back, alive)."""
    gone = set(pids)
    for k in [k for k in _slots if k[0] in gone]:
        del _slots[k]
    for pid in gone:
        _returns.pop(pid, None)
