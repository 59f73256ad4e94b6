"""Read-ahead: a background thread that fetches what a reader needs next, in order.

Used for the node cache (:class:`~shardstream.storage.cache.RemoteCache`): the shards
a reader will touch, in the order it first touches them, a few ahead of it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Iterable

__all__ = ["Prefetcher"]


class Prefetcher:
    """Runs ``fetch(key)`` in a background thread for keys in ``order``, ``depth`` ahead.

    Two ways to count "ahead":

    - plain keys: ``depth`` counts fetched values the reader has not taken yet; a fetch
      that returns None (a shard another process downloads or downloaded) takes no place.
    - ``positioned=True``: ``order`` yields ``(key, position of first use)`` of a
      schedule shared by several processes (a node's), and ``depth`` counts keys whose
      first use is still ahead of the reader's position (:meth:`advance`), whoever
      fetched them: every process of the node walks the same schedule, downloads what
      no other process has, and together they stay about ``depth`` shards ahead.

    With ``after``, the thread starts once that event is set. The reader calls
    :meth:`take` for a key when it needs it: it waits for that key's fetch if one was
    started (re-raising its error) and lets the thread move on; a key not fetched yet
    returns None (the reader fetches it itself).
    """

    def __init__(self, fetch: Callable[[Any], Any], order: Iterable[Any], *,
                 depth: int = 2, after: threading.Event | None = None,
                 positioned: bool = False) -> None:
        self._fetch, self._order, self.depth = fetch, iter(order), max(1, depth)
        self._after, self._positioned = after, positioned
        self._futures: dict[Hashable, Future] = {}
        self._ahead: dict[Hashable, int] = {}  # positioned: key -> first use
        self._position = -1
        self._taken: set[Hashable] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shardstream-prefetch",
                                        daemon=True)
        self._thread.start()

    def _full(self) -> bool:
        if not self._positioned:
            return len(self._futures) >= self.depth
        for key in [k for k, p in self._ahead.items() if p <= self._position]:
            del self._ahead[key]
        return len(self._ahead) >= self.depth

    def _run(self) -> None:
        while self._after is not None and not self._after.wait(0.05):
            if self._stop:
                return
        try:
            for item in self._order:
                key, pos = item if self._positioned else (item, 0)
                with self._cond:
                    while self._full() and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                    if key in self._futures or key in self._taken:
                        continue
                    if self._positioned:
                        if pos <= self._position:
                            continue  # the reader is there already: it fetches itself
                        self._ahead[key] = pos
                    fut: Future = Future()
                    self._futures[key] = fut
                try:
                    got = self._fetch(key)
                except BaseException as exc:  # handed to the reader by take()
                    fut.set_exception(exc)
                    continue
                fut.set_result(got)
                if got is None:  # not ours to fetch (another process has it, or local):
                    with self._cond:  # nothing for take() to wait for
                        if self._futures.get(key) is fut:
                            del self._futures[key]
        except Exception:  # noqa: BLE001 - a broken order: the reader fetches itself
            return

    def advance(self, position: int) -> None:
        """The reader is at ``position`` of the schedule (positioned mode)."""
        with self._cond:
            if position > self._position:
                self._position = position
                self._cond.notify_all()

    def take(self, key: Hashable) -> Any:
        """The fetched value of ``key``, or None when the thread has not started it."""
        with self._cond:
            fut = self._futures.get(key)
            self._taken.add(key)
        if fut is None:
            return None
        try:
            return fut.result()
        finally:
            with self._cond:
                self._futures.pop(key, None)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
