"""The state a stream shares with its DataLoader workers: epoch, resume point, skips.

One small shared-memory array created with the stream, so ``set_epoch`` and
``load_state_dict`` called in the main process reach the workers -- persistent
ones included -- at their next ``iter()``, and the workers' skip counts reach the
main process.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import get_spawning_popen
from typing import Any

from torch.utils.data import get_worker_info

__all__ = ["SharedState", "MAX_WORKERS", "MAX_CHAIN", "STATS"]

#: DataLoader workers with their own skip counter (more share the last one)
MAX_WORKERS = 256
#: node-count changes one resumed epoch can carry (see shardstream.read.nodes)
MAX_CHAIN = 16
_EPOCH, _START, _SKIP0 = 0, 1, 2  # slots of the array; skips: _SKIP0 + worker + 1
_CHAIN = _SKIP0 + MAX_WORKERS + 1  # chain length, then (nodes, consumed) pairs
#: node-cache counters (see RemoteCache.stats), one row of them per process
STATS = ("bytes_downloaded", "shards_downloaded", "indexes_downloaded", "shard_hits",
         "index_hits")
_STATS = _CHAIN + 1 + 2 * MAX_CHAIN
_SIZE = _STATS + len(STATS) * (MAX_WORKERS + 1)
_KINDS = {"shard_download": (0, 1), "index_download": (0, 2), "shard_hit": (None, 3),
          "index_hit": (None, 4)}  # kind -> (bytes counter, count counter)


class SharedState:
    """(epoch, G offset to start from, samples skipped per process) in shared memory."""

    def __init__(self) -> None:
        self._array = mp.RawArray("q", _SIZE)

    def __getstate__(self) -> dict[str, Any]:
        """Plain pickling/deepcopy gets a private copy; starting a worker process
        (spawn) keeps the shared memory itself."""
        if get_spawning_popen() is None:
            return {"values": list(self._array)}
        return {"array": self._array}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "array" in state:
            self._array = state["array"]
        else:
            self._array = mp.RawArray("q", len(state["values"]))
            self._array[:] = state["values"]

    @property
    def epoch(self) -> int:
        return int(self._array[_EPOCH])

    @property
    def start(self) -> int:
        return int(self._array[_START])

    def set(self, epoch: int, start: int, chain: tuple[tuple[int, int], ...] = ()) -> None:
        """Read ``epoch`` from ``start`` next; ``chain``: the (nodes, consumed) parts of
        it read on other numbers of nodes before (a resize), oldest first."""
        if len(chain) > MAX_CHAIN:
            raise ValueError(f"an epoch resumed on {len(chain) + 1} different node counts; "
                             f"at most {MAX_CHAIN + 1} are kept: finish the epoch first")
        a = self._array
        a[_CHAIN] = len(chain)
        for k, (nodes, consumed) in enumerate(chain):
            a[_CHAIN + 1 + 2 * k], a[_CHAIN + 2 + 2 * k] = nodes, consumed
        a[_EPOCH], a[_START] = epoch, start

    @property
    def chain(self) -> tuple[tuple[int, int], ...]:
        a = self._array
        return tuple((int(a[_CHAIN + 1 + 2 * k]), int(a[_CHAIN + 2 + 2 * k]))
                     for k in range(int(a[_CHAIN])))

    @property
    def skipped(self) -> int:
        return int(sum(self._array[_SKIP0:_CHAIN]))

    def count(self, kind: str, nbytes: int) -> None:
        """Count a node-cache event of this process (a :class:`CacheStats`)."""
        row = _STATS + len(STATS) * _process_slot()
        size_at, count_at = _KINDS[kind]
        if size_at is not None:
            self._array[row + size_at] += nbytes
        self._array[row + count_at] += 1

    @property
    def cache_stats(self) -> dict[str, int]:
        """The node-cache counters, summed over this process and its workers."""
        rows = len(STATS)
        return {name: int(sum(self._array[_STATS + k:_SIZE:rows]))
                for k, name in enumerate(STATS)}

    def count_skip(self, n: int) -> None:
        """Add ``n`` skipped samples to this process's counter."""
        self._array[_SKIP0 + _process_slot()] += n


def _process_slot() -> int:
    """0 for the main process, 1 + its id for a DataLoader worker (the last slot is
    shared by workers past MAX_WORKERS)."""
    info = get_worker_info()
    return min(info.id + 1, MAX_WORKERS) if info is not None else 0
