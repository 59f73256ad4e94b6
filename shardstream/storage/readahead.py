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

    ``depth`` counts fetched values the reader has not taken yet; a fetch that
    returns None (a shard another process downloads or downloaded) takes no place.

    With ``after``, the thread starts once that event is set. The reader calls
    :meth:`take` for a key when it needs it: it waits for that
    key's fetch if one was started (re-raising its error) and lets the thread
    move on; a key not fetched yet returns None (the reader fetches it itself).
    """

    def __init__(self, fetch: Callable[[Any], Any], order: Iterable[Hashable], *,
                 depth: int = 2, after: threading.Event | None = None) -> None:
        self._fetch, self._order, self.depth = fetch, iter(order), max(1, depth)
        self._after = after
        self._futures: dict[Hashable, Future] = {}
        self._taken: set[Hashable] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shardstream-prefetch",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._after is not None and not self._after.wait(0.05):
            if self._stop:
                return
        try:
            for key in self._order:
                with self._cond:
                    while len(self._futures) >= self.depth and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                    if key in self._futures or key in self._taken:
                        continue
                    fut: Future = Future()
                    self._futures[key] = fut
                try:
                    got = self._fetch(key)
                except BaseException as exc:  # handed to the reader by take()
                    fut.set_exception(exc)
                    continue
                fut.set_result(got)
                if got is None:  # not ours to fetch (another process has it, or local):
                    with self._cond:  # it holds no place in the read-ahead
                        if self._futures.get(key) is fut:
                            del self._futures[key]
        except Exception:  # noqa: BLE001 - a broken order: the reader fetches itself
            return

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
