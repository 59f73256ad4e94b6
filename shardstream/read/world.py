"""Where this reader sits: distributed rank and DataLoader worker.

Rank discovery order: explicit arguments, an initialised ``torch.distributed``
process group, the ``RANK``/``WORLD_SIZE`` environment variables that
``torchrun`` sets, else a single process. Worker discovery uses
``torch.utils.data.get_worker_info()``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

__all__ = ["World", "get_rank", "get_worker", "get_world"]


@dataclass(frozen=True)
class World:
    """One reader's position: ``rank`` of ``world_size``, ``worker`` of ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def readers(self) -> int:
        """Readers in the whole job (ranks x workers)."""
        return self.world_size * self.num_workers


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def get_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) of this process; explicit values win."""
    if rank is None or world_size is None:
        r, w = _discover()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size={world_size})")
    return rank, world_size


def _discover() -> tuple[int, int]:
    torch = sys.modules.get("torch")  # a process group implies torch is imported
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        return rank, world
    return 0, 1


def get_worker() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker, else (0, 1)."""
    data = sys.modules.get("torch.utils.data")  # a DataLoader worker has imported it
    info = data.get_worker_info() if data is not None else None
    if info is None:
        return 0, 1
    return info.id, info.num_workers


def get_world(rank: int | None = None, world_size: int | None = None) -> World:
    """The full picture for the calling process (rank and worker)."""
    r, w = get_rank(rank, world_size)
    worker, num_workers = get_worker()
    return World(r, w, worker, num_workers)
