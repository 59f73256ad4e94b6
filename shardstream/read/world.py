"""Where this reader sits: distributed rank, node and DataLoader worker.

Rank discovery order: explicit arguments, an initialised ``torch.distributed``
process group, the ``RANK``/``WORLD_SIZE`` environment variables that
``torchrun`` sets, else a single process. A node is the ranks sharing a host:
``local_world_size`` of them, from an explicit argument, else torchrun's
``LOCAL_WORLD_SIZE``, else all ranks (one node); ranks ``node * local_world_size``
onwards form node ``node`` (torchrun's numbering). Worker discovery uses
``torch.utils.data.get_worker_info()``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

__all__ = ["World", "get_rank", "get_worker", "get_world", "get_local_world_size"]


@dataclass(frozen=True)
class World:
    """One reader's position: ``rank`` of ``world_size``, ``worker`` of ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    #: ranks per node (None: all of them, one node)
    local_world_size: int | None = None

    @property
    def nodes(self) -> int:
        return self.world_size // (self.local_world_size or self.world_size)

    @property
    def node(self) -> int:
        return self.rank // (self.local_world_size or self.world_size)

    @property
    def local_rank(self) -> int:
        return self.rank % (self.local_world_size or self.world_size)

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


def get_local_world_size(world_size: int, local_world_size: int | None = None) -> int:
    """Ranks per node: explicit, else ``$LOCAL_WORLD_SIZE`` (torchrun), else all ranks.

    A ``world_size`` that is not a multiple of it is a ``ValueError``."""
    explicit = local_world_size is not None
    if local_world_size is None:
        local_world_size = _env_int("LOCAL_WORLD_SIZE") or world_size
    if local_world_size < 1 or world_size % local_world_size:
        where = "local_world_size" if explicit else "$LOCAL_WORLD_SIZE"
        raise ValueError(f"world_size {world_size} is not a multiple of {where}="
                         f"{local_world_size}: every node must run as many ranks")
    return local_world_size


def get_world(rank: int | None = None, world_size: int | None = None,
              local_world_size: int | None = None) -> World:
    """The full picture for the calling process (rank, node and worker)."""
    r, w = get_rank(rank, world_size)
    worker, num_workers = get_worker()
    return World(r, w, worker, num_workers, get_local_world_size(w, local_world_size))
