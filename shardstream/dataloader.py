"""``loader()``: a DataLoader set up for a ShardStream, with resumable state.

The stream builds whole batches in the workers, so the DataLoader runs with
``batch_size=None``. The returned :class:`ShardLoader` counts the batches it
delivered, which is all a resume needs (the epoch order is a pure function
of seed, epoch and world size): ``state_dict()`` / ``load_state_dict()``.
After a complete pass it advances the stream to the next epoch.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from .wire import forget_workers, from_wire
from .stream import ShardStream

__all__ = ["ShardLoader", "loader"]


def _identity(batch: Any) -> Any:
    return batch


def _worker_init(worker_id: int) -> None:
    """Keep each worker to one intra-op thread (the CPU belongs to the main process)."""
    torch.set_num_threads(1)


class ShardLoader:
    """Iterates a DataLoader over a :class:`ShardStream`, counting delivered batches."""

    def __init__(self, dataset: ShardStream, dataloader: DataLoader, *,
                 device: Any = None, prefetch_depth: int = 2, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.dataloader = dataloader
        self.device = device
        self.prefetch_depth = prefetch_depth
        self.pin_memory = pin_memory
        self._epoch = dataset.epoch
        self._start = 0
        self._units = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __del__(self) -> None:
        # let go of the workers' shared-memory slots (batches still held keep theirs)
        try:
            it = getattr(self.dataloader, "_iterator", None)
            pids = [w.pid for w in getattr(it, "_workers", None) or []]
            if pids:
                forget_workers(pids)
        except Exception:  # interpreter shutdown: nothing left to free
            pass

    @property
    def epoch(self) -> int:
        """The epoch the next (or current) pass reads."""
        return self.dataset.epoch

    @property
    def skipped(self) -> int:
        """Samples skipped after errors, over this rank's workers (see ShardStream.skipped)."""
        return self.dataset.skipped

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def _batches(self) -> Iterator[Any]:
        """Batches as tensors: workers send numpy (cheap to pass), made tensors here.

        Numeric arrays of big batches arrive in shared memory (see
        ``shardstream.wire.to_wire``): the tensors view a worker's slot,
        which goes back to the worker once nothing refers to the batch any more
        (pinning copies, so the slot is free at once)."""
        if self.dataloader.num_workers == 0:
            yield from self.dataloader
            return
        from torch.utils.data._utils.pin_memory import pin_memory

        it = iter(self.dataloader)
        pids = [w.pid for w in getattr(it, "_workers", None) or []]
        try:
            for batch in it:
                batch = from_wire(batch)
                yield pin_memory(batch) if self.pin_memory else batch
        finally:
            if not self.dataloader.persistent_workers:  # these workers are done
                forget_workers(pids)

    def _source(self) -> Any:
        if self.device is None or torch.device(self.device).type == "cpu":
            return self._batches()
        try:
            prefetch = importlib.import_module("shardstream.prefetch")
        except ImportError:
            return self.dataloader
        return prefetch.CUDAPrefetcher(self._batches(), device=self.device,
                                       depth=self.prefetch_depth)

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        self._epoch, self._units = ds.epoch, 0
        self._start = int(ds._shared[1]) if ds.exact else 0
        for batch in self._source():
            self._units += 1
            yield batch
        # a complete pass: move on to the next epoch (an explicit set_epoch still wins)
        ds.set_epoch(self._epoch + 1)
        self._units = 0
        self._start = 0
        self._epoch = ds.epoch

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: load it (on any rank, any world size) to continue."""
        return self.dataset.state_for(self._epoch, self._start, self._units)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._epoch, self._start, self._units = self.dataset.epoch, int(state["consumed"]), 0


def loader(dataset: ShardStream, *, num_workers: int = 2, pin_memory: bool | None = None,
           prefetch_factor: int | None = 4, persistent_workers: bool | None = None,
           device: Any = None, multiprocessing_context: Any = None,
           **dataloader_kwargs: Any) -> ShardLoader:
    """A DataLoader wrapper for ``dataset`` (batches are built by the stream).

    ``pin_memory`` defaults to whether CUDA is available; ``persistent_workers``
    to ``num_workers > 0``. ``device`` (not "cpu") wraps the loader in
    ``shardstream.prefetch.CUDAPrefetcher`` when that module is available (it pins).
    """
    if not isinstance(dataset, ShardStream):
        raise TypeError(f"loader() takes a ShardStream, got {type(dataset).__name__}")
    if "batch_size" in dataloader_kwargs:
        raise ValueError("pass batch_size to ShardStream (batches are built in the workers), "
                         "not to loader()")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    kwargs: dict[str, Any] = dict(batch_size=None, num_workers=num_workers,
                                  pin_memory=pin_memory and num_workers == 0, **dataloader_kwargs)
    if num_workers > 0:
        dataset._wire = True
        kwargs.setdefault("collate_fn", _identity)
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                      worker_init_fn=dataloader_kwargs.get("worker_init_fn", _worker_init),
                      multiprocessing_context=multiprocessing_context)
    # batches come from the workers as numpy; they are made tensors (and pinned, so the
    # prefetcher's copies are truly asynchronous) in this process
    return ShardLoader(dataset, DataLoader(dataset, **kwargs), device=device,
                       pin_memory=pin_memory and num_workers > 0)
