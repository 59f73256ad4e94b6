"""``loader()``: a DataLoader set up for a ShardStream, with resumable state.

The stream builds whole batches in the workers, so the DataLoader runs with
``batch_size=None``. The returned :class:`ShardLoader` counts the batches it
delivered, which is all a resume needs (the epoch order is a pure function
of seed, epoch and world size): ``state_dict()`` / ``load_state_dict()``.
After a complete pass (its last batch handed over) the next ``iter()`` reads
the next epoch; see :class:`ShardLoader` and docs/frameworks.md.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from shardstream.pytorch.stream import ShardStream
from shardstream.pytorch.wire import forget_workers, from_wire

__all__ = ["ShardLoader", "loader"]


def _identity(batch: Any) -> Any:
    return batch


def _worker_init(worker_id: int) -> None:
    """Keep each worker to one intra-op thread (the CPU belongs to the main process)."""
    torch.set_num_threads(1)


class ShardLoader:
    """Iterates a DataLoader over a :class:`ShardStream`, counting delivered batches.

    Epochs: once the last batch of a pass has been handed over, the next ``iter()``
    reads the next epoch -- also when the consumer stops after exactly ``len()``
    batches without exhausting the iterator (Lightning, ``islice``, ``zip``). A new
    ``iter()`` after a partial pass starts that pass again from where it began (the
    epoch's start, or a loaded resume point), like a DataLoader over a sampler. An
    explicit ``set_epoch`` / ``load_state_dict`` (on the loader or the stream) wins.
    """

    def __init__(self, dataset: ShardStream, dataloader: DataLoader, *,
                 device: Any = None, prefetch_depth: int = 2, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.dataloader = dataloader
        self.device = device
        self.prefetch_depth = prefetch_depth
        self.pin_memory = pin_memory
        self._sync()
        self._ended_at: int | None = None  # stream moves when a complete pass ended

    def _sync(self) -> None:
        """Take the stream's position as the start of the next pass (nothing delivered)."""
        ds = self.dataset
        self._epoch, self._start = ds.position
        if not ds.exact:
            self._start = 0
        self._units = 0
        self._moves_at = ds.moves

    _fetch_started = False  # start_fetch() runs once, before the first pass's workers

    def _complete(self) -> bool:
        """A pass was fully delivered and nobody moved the stream since."""
        return self._ended_at is not None and self._ended_at == self.dataset.moves

    def _settle(self) -> None:
        """After a complete pass the stream moves on to the next epoch, from its start."""
        if self._complete():
            self.dataset.seek(self._epoch + 1, 0)
        self._ended_at = None

    def _pass_units(self) -> int | None:
        """Batches the pass starting now delivers (None: unknown, a plain shard list)."""
        ds = self.dataset
        if ds.exact:
            return ds.layout(start=self._start).num_units
        return len(ds) if ds.epoch_size is not None else None

    def __len__(self) -> int:
        """Batches in one full epoch (a resumed pass delivers the rest of it)."""
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
        return self._epoch + 1 if self._complete() else self.dataset.epoch

    @property
    def skipped(self) -> int:
        """Samples skipped after errors, over this rank's workers (see ShardStream.skipped)."""
        return self.dataset.skipped

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next (after a complete pass: from its start)."""
        if self._complete():
            self.dataset.seek(epoch, 0)  # the pass used up any resume point
        else:
            self.dataset.set_epoch(epoch)
        self._ended_at = None

    def _batches(self) -> Iterator[Any]:
        """Batches as tensors: workers send numpy (cheap to pass), made tensors here.

        Numeric arrays of big batches arrive in shared memory (see
        ``shardstream.pytorch.wire.to_wire``): the tensors view a worker's slot,
        which goes back to the worker once nothing refers to the batch any more
        (pinning copies, so the slot is free at once)."""
        if not self._fetch_started:  # the first shards download while the workers start
            self._fetch_started = True
            self.dataset.start_fetch()
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
            prefetch = importlib.import_module("shardstream.pytorch.prefetch")
        except ImportError:
            return self.dataloader
        return prefetch.CUDAPrefetcher(self._batches(), device=self.device,
                                       depth=self.prefetch_depth)

    def __iter__(self) -> Iterator[Any]:
        self._settle()
        self._sync()
        total = self._pass_units()
        for batch in self._source():
            self._units += 1
            if self._units == total:  # complete once handed over: the consumer may stop here
                self._ended_at = self._moves_at
            yield batch
        if self._ended_at is None:  # exhausted (a shard list has no known length): complete
            self._ended_at = self._moves_at
        self._settle()  # every worker is done: move on now

    def state_dict(self) -> dict[str, Any]:
        """What the stream reads next: load it (on any rank, any world size) to continue.

        After ``k`` batches of a pass: that epoch, ``k`` batches on; after its last
        batch: the next epoch, nothing consumed."""
        ds = self.dataset
        if ds.moves != self._moves_at and not self._complete():  # moved since: read there
            epoch, start = ds.position
            return ds.state_for(epoch, start, 0)
        return ds.state_for(self._epoch, self._start, self._units)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._ended_at = None
        self._sync()


def loader(dataset: ShardStream, *, num_workers: int = 2, pin_memory: bool | None = None,
           prefetch_factor: int | None = 4, persistent_workers: bool | None = None,
           device: Any = None, multiprocessing_context: Any = None,
           **dataloader_kwargs: Any) -> ShardLoader:
    """A DataLoader wrapper for ``dataset`` (batches are built by the stream).

    ``pin_memory`` defaults to whether CUDA is available; ``persistent_workers``
    to ``num_workers > 0``. ``device`` (not "cpu") wraps the loader in
    ``shardstream.pytorch.prefetch.CUDAPrefetcher`` when that module is available (it pins).
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
        dataset.wire = True
        kwargs.setdefault("collate_fn", _identity)
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                      worker_init_fn=dataloader_kwargs.get("worker_init_fn", _worker_init),
                      multiprocessing_context=multiprocessing_context)
    # batches come from the workers as numpy; they are made tensors (and pinned, so the
    # prefetcher's copies are truly asynchronous) in this process
    return ShardLoader(dataset, DataLoader(dataset, **kwargs), device=device,
                       pin_memory=pin_memory and num_workers > 0)
