"""CUDAPrefetcher: copy batches to the GPU on a side stream while the model runs.

Batches are copied (and optionally transformed) on a side stream ``S``, up to
``depth`` in flight in a ring of slots, each ending with a ``ready`` event; on
hand-over the consumer's current stream ``C`` does ``C.wait_event(ready)``.

Why this is memory-safe without ``record_stream``: the caching allocator puts
a freed block back in the pool of the stream it was *allocated* on (whatever
stream is current at free time) and hands it to the next allocation on that
stream ignoring other streams. Outputs are allocated on ``S``; holding handed
out batches until the next hand-over (FFCV style) is not enough, since the user
often frees them later (loop variable, autograd saved inputs). So before
*every* batch of ``S`` work we record a ``fence`` on ``C`` and ``S.wait_event``
it. With one consuming thread: (1) a batch is freed on the host after the
kernels using it were queued on ``C`` and before the next call into us; (2)
the next ``S`` allocation happens in that call, after a fence recorded behind
those kernels, so any reuse runs after them; (3) blocks used only on ``S`` are
reused only by later, stream-ordered ``S`` work; (4) a slot's inputs stay
referenced until ``C`` waited on ``ready`` (``close()`` synchronises ``S``),
and pinned host blocks are guarded by PyTorch's pinned allocator events. The
fence keeps the overlap: batch ``n + depth`` is issued at hand-over of ``n``,
so its copy only waits for the compute of batch ``n - 1``. Tensors used on
another stream than the consumer's need ``record_stream``; sources must not
modify host tensors after yielding them. Details: docs/prefetch.md.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["CUDAPrefetcher", "PrefetchStats", "to_device"]


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor of a nested dict/list/tuple batch.

    Containers keep their type (namedtuples, dict subclasses); a container
    none of whose leaves changed is returned as the same object.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: _map_tensors(v, fn) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        if type(obj) is not dict:
            with contextlib.suppress(Exception):  # OrderedDict, defaultdict, ...
                out = copy.copy(obj)
                out.update(items)  # type: ignore[attr-defined]
                return out
        return items
    if isinstance(obj, (list, tuple)):
        seq = [_map_tensors(v, fn) for v in obj]
        if all(a is b for a, b in zip(seq, obj)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*seq)  # namedtuple
        with contextlib.suppress(Exception):
            return type(obj)(seq)
        return seq if isinstance(obj, list) else tuple(seq)
    return obj


def to_device(batch: Any, device: torch.device | str | int, non_blocking: bool = False) -> Any:
    """Recursively move the tensors of a nested batch to ``device``; other leaves,
    tensors already there and unchanged containers are returned as they are."""
    dev = torch.device(device)
    return _map_tensors(batch, lambda t: t.to(dev, non_blocking=non_blocking))


@dataclasses.dataclass(frozen=True)
class PrefetchStats:
    """Counters of a prefetcher, over all its passes."""

    batches: int = 0  # batches handed to the consumer
    bytes_copied: int = 0  # host -> device bytes for those batches
    copy_seconds: float = 0.0  # GPU time of those copies (CUDA events)
    copy_bandwidth_gbps: float = 0.0  # bytes_copied / copy_seconds / 1e9
    wait_seconds: float = 0.0  # host time the consumer spent blocked in next()
    pinned_on_the_fly: int = 0  # pageable tensors the prefetcher had to pin
    device: str = "cpu"

    def __str__(self) -> str:
        text = f"{self.batches} batches to {self.device}"
        if self.device != "cpu":
            text += (f": {self.bytes_copied / 1e9:.3f} GB copied in {self.copy_seconds:.3f} s"
                     f" ({self.copy_bandwidth_gbps:.1f} GB/s)")
        text += f", consumer waited {self.wait_seconds:.3f} s"
        return text + (f", {self.pinned_on_the_fly} tensors pinned on the fly" if self.pinned_on_the_fly else "")


def _resolve_device(device: Any) -> torch.device:
    cuda = torch.cuda.is_available()
    if device is None:
        rank = os.environ.get("LOCAL_RANK", "").strip()
        if not cuda or not rank:
            return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if not rank.isdigit():
            raise ValueError(f"LOCAL_RANK={rank!r} is not a device index; pass device= explicitly")
        device = int(rank)
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise ValueError(f"device must be a torch.device, str, int or None, got {device!r}")
    if isinstance(device, int) and device < 0:
        raise ValueError(f"device index must be >= 0, got {device}")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"CUDAPrefetcher supports 'cuda' and 'cpu' devices, got {str(dev)!r}")
    if dev.type == "cpu" or not cuda:
        return torch.device("cpu")  # without a GPU the same script still runs
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"cuda:{index} requested but only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device, shared by all prefetchers (safe: each fences
    first). A new pool stream per prefetcher would make the allocator keep a
    separate cache of batch-sized blocks for each of up to 32 pool streams."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@dataclasses.dataclass
class _Slot:
    out: Any = None  # what the consumer gets
    keep: Any = None  # kept alive until C waited on `ready`
    ready: Any = None  # torch.cuda.Event; None on the CPU path
    timing: tuple[Any, Any] | None = None  # (start, end) timing events of the copy
    nbytes: int = 0
    error: BaseException | None = None


class _Pass(Iterator):
    """One pass over the source: a ring of up to ``depth`` batches in flight."""

    def __init__(self, owner: CUDAPrefetcher) -> None:
        self._owner = owner
        self._source: Iterator[Any] | None = iter(owner.iterable)
        self._ring: collections.deque[_Slot] = collections.deque()
        self._done = False

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> Any:
        owner = self._owner
        ahead = owner.depth if owner.is_cuda else 1  # the CPU path does not read ahead
        t0 = time.perf_counter()
        try:
            if not self._ring:
                self._fill(ahead)
            if not self._ring:
                self.close()
                raise StopIteration
            slot = self._ring.popleft()
            if slot.error is not None:
                error, slot.error = slot.error, None
                self.close()
                raise error  # the same object, its traceback still shows the source's frames
            batch = owner._hand_over(slot)
            del slot  # drop host/input references only now that C waited on `ready`
            if owner.is_cuda:
                self._fill(ahead)  # issue batch n + depth now: overlaps the compute of batch n
            return batch
        finally:
            owner._wait_s += time.perf_counter() - t0

    def _fill(self, n: int) -> None:
        while not self._done and len(self._ring) < n:
            try:
                host = next(self._source)  # type: ignore[arg-type]
            except StopIteration:
                self._done = True
                return
            except Exception as exc:  # raised when the consumer reaches this batch
                self._done = True
                self._ring.append(_Slot(error=exc))
                return
            try:
                self._ring.append(self._owner._issue(host))
            except Exception as exc:
                self._done = True
                self._ring.append(_Slot(error=exc))

    def close(self) -> None:
        """Drop batches in flight and close the source iterator; idempotent."""
        self._done = True
        ring, self._ring = self._ring, collections.deque()
        stream = self._owner._stream
        if stream is not None and any(s.ready is not None for s in ring):
            stream.synchronize()  # nothing queued on S may still read what we free
        ring.clear()
        source, self._source = self._source, None
        close = getattr(source, "close", None)
        if callable(close):
            close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class CUDAPrefetcher:
    """Iterate ``iterable`` with every batch already on ``device``, copied ahead.

    Batches may be nested dicts/lists/tuples/namedtuples: tensors are copied
    from pinned memory on a side stream (``depth`` batches ahead), other leaves
    pass through. ``transform(batch)`` runs on the device, on the side stream.
    With ``device="cpu"`` or without CUDA, batches pass through unchanged (only
    ``transform`` applies). ``iter(p)`` starts a new pass over ``iterable``
    (closing the previous one); ``next(p)`` continues the current pass.
    Reading ``stats`` waits for the copies handed out so far to finish.
    """

    def __init__(self, iterable: Iterable[Any], device: torch.device | str | int | None = None, *,
                 depth: int = 2, transform: Callable[[Any], Any] | None = None,
                 non_blocking: bool = True, pin_memory: bool = True) -> None:
        if not (hasattr(type(iterable), "__iter__") or hasattr(type(iterable), "__getitem__")):
            raise ValueError(f"iterable must be iterable, got {type(iterable).__name__}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable or None, got {type(transform).__name__}")
        for name, value in (("non_blocking", non_blocking), ("pin_memory", pin_memory)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        self.iterable, self.device = iterable, _resolve_device(device)
        self.depth, self.transform = depth, transform
        self.non_blocking, self.pin_memory = non_blocking, pin_memory
        self._stream: torch.cuda.Stream | None = None
        self._pass: _Pass | None = None
        self._warned = False
        self._batches = self._bytes = self._pinned = 0
        self._copy_s = self._wait_s = 0.0
        self._timings: collections.deque[tuple[Any, Any]] = collections.deque()

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def __iter__(self) -> Iterator[Any]:
        self.close()
        self._pass = _Pass(self)
        return self._pass

    def __next__(self) -> Any:
        if self._pass is None:
            self._pass = _Pass(self)
        return next(self._pass)

    def __len__(self) -> int:
        try:
            return len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"len() of CUDAPrefetcher: source {type(self.iterable).__name__} has no len()") from None

    def __enter__(self) -> CUDAPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CUDAPrefetcher(device={str(self.device)!r}, depth={self.depth})"

    def close(self) -> None:
        """Stop the current pass: release batches in flight, close the source iterator."""
        if self._pass is not None:
            self._pass.close()

    @property
    def stats(self) -> PrefetchStats:
        self._fold_timings(block=True)
        bw = self._bytes / self._copy_s / 1e9 if self._copy_s > 0 else 0.0
        return PrefetchStats(self._batches, self._bytes, self._copy_s, bw, self._wait_s, self._pinned,
                             str(self.device))

    def _fold_timings(self, block: bool) -> None:
        while self._timings:  # S runs in order: its events complete front to back
            start, end = self._timings[0]
            if block:
                end.synchronize()
            elif not end.query():
                return
            self._copy_s += start.elapsed_time(end) / 1e3
            self._timings.popleft()

    def _copy_leaf(self, t: torch.Tensor, nbytes: list[int]) -> torch.Tensor:
        if t.device == self.device:
            return t
        if t.device.type == "cpu" and self.pin_memory and not t.is_pinned():
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "CUDAPrefetcher got a tensor in pageable (unpinned) memory and pins it on the fly, "
                    "an extra host copy; copies from pageable memory are synchronous even with "
                    "non_blocking=True. Use DataLoader(..., pin_memory=True) to get pinned batches.",
                    stacklevel=2,
                )
            t = t.pin_memory()
            self._pinned += 1
        nbytes[0] += t.nbytes
        return t.to(self.device, non_blocking=self.non_blocking)

    def _issue(self, host: Any) -> _Slot:
        """Start copying (and transforming) one batch; on the CPU path just map it."""
        if not self.is_cuda:
            out = to_device(host, self.device)
            return _Slot(out=self.transform(out) if self.transform is not None else out)
        if self._stream is None:
            self._stream = _side_stream(self.device)
        side = self._stream
        fence = torch.cuda.Event()  # all the consumer has queued so far ...
        fence.record(torch.cuda.current_stream(self.device))
        side.wait_event(fence)  # ... runs before any allocation or copy below (module docstring)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ready, nbytes = torch.cuda.Event(), [0]
        with torch.cuda.device(self.device), torch.cuda.stream(side):
            start.record(side)
            dev = _map_tensors(host, lambda t: self._copy_leaf(t, nbytes))
            end.record(side)
            out = self.transform(dev) if self.transform is not None else dev
            ready.record(side)
        return _Slot(out=out, keep=(host, dev), ready=ready, timing=(start, end), nbytes=nbytes[0])

    def _hand_over(self, slot: _Slot) -> Any:
        if slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
            self._bytes += slot.nbytes
            self._timings.append(slot.timing)
            self._fold_timings(block=False)  # keeps the list short, never blocks
        self._batches += 1
        return slot.out
