"""A ShardStream's layout and resume state: which layout a rank reads, what a state
holds, and how a state moves the stream (to another node count too).

Version 1 states hold one offset of the global sequence (one node); version 2
states, of node-local epochs (:mod:`shardstream.read.nodes`), hold the node count and
the chain of earlier node counts of the epoch. Both load on any topology.
"""

from __future__ import annotations

from typing import Any

from shardstream.read.modes import DatasetMode, MixtureMode, Placement
from shardstream.read.nodes import left_after, node_length
from shardstream.read.order import Layout
from shardstream.read.world import World

#: a ShardStream (not imported: it imports this module)
Stream = Any

__all__ = ["STATE_VERSION", "fingerprint", "check_state", "plan", "layout_nodes", "resume_state",
           "seek_to", "state_nodes"]

#: resume states: 1, one global sequence (one node); 2, node-local (shardstream.read.nodes)
STATE_VERSION = 2
_STATE_VERSIONS = (1, 2)


def fingerprint(stream: Stream) -> dict[str, Any]:
    """What a resume state must match: the order's parameters and the sample count."""
    o = stream.options
    return {"seed": o.seed, "shuffle": o.shuffle, "shuffle_buffer": o.window,
            "block_shuffle": o.block_shuffle and o.shuffle, "node_shares": o.node_shares,
            "num_samples": stream.num_samples, **stream.mode.fingerprint()}


def plan(stream: Stream, world: World, start: int) -> tuple[Layout, int, Placement]:
    """The layout this rank reads, its index in it, and where its node sits.

    One dataset or a mixture on several nodes (or an epoch resumed after a change of
    node count) is laid out per node (:mod:`shardstream.read.nodes`); anything else as one global
    sequence dealt to all ranks."""
    unit, n = stream.batch_size or 1, stream.mode.num_samples
    chain = stream.shared.chain
    nodes = layout_nodes(stream, world, chain)
    if nodes > 1 or (chain and isinstance(stream.mode, (DatasetMode, MixtureMode))):
        place = Placement(nodes, world.node if nodes > 1 else 0, chain)
        return (Layout(node_length(left_after(n, chain), nodes, stream.remainder), start,
                       world.world_size // nodes, unit, stream.drop_last, stream.remainder),
                world.local_rank if nodes > 1 else world.rank, place)
    return (Layout(n, start, world.world_size, unit, stream.drop_last, stream.remainder),
            world.rank, Placement())


def layout_nodes(stream: Stream, world: World, chain: tuple[tuple[int, int], ...]) -> int:
    """The node count an epoch (after ``chain``) is laid out on: the world's for one
    dataset, unless fewer samples are left than nodes (a cut needs a sample per node;
    then all ranks read them as one node); 1 for anything else."""
    if not isinstance(stream.mode, (DatasetMode, MixtureMode)):
        return 1
    return world.nodes if left_after(stream.mode.num_samples, chain) >= world.nodes else 1


def state_nodes(place: Placement) -> int | None:
    """The node count a state laid out by ``place`` records (None: version 1)."""
    return place.nodes if place.node_local else None


def resume_state(stream: Stream, epoch: int, consumed: int | None, place: Placement,
           **extra: Any) -> dict[str, Any]:
    """A resume state: version 1 for one global sequence, 2 (with the node count and
    the chain of earlier node counts of this epoch) for node-local epochs."""
    if consumed is None:  # the epoch is done: the next one starts fresh
        epoch, consumed, place = epoch + 1, 0, Placement(place.nodes, place.node)
    state = {"version": 2 if place.node_local else 1, "epoch": epoch, "consumed": consumed,
             **extra, **fingerprint(stream)}
    if place.node_local:
        state.update(nodes=place.nodes, chain=[list(c) for c in place.chain])
    else:
        del state["node_shares"]
    return state


def seek_to(stream: Stream, state: dict[str, Any]) -> None:
    """Seek to ``state``: on the node count it was saved on, from its offset; on another,
    the rest of its epoch is cut anew for this node count (its chain grows by one)."""
    chain = tuple((int(a), int(b)) for a, b in state.get("chain", ()))
    saved = int(state.get("nodes", 1))
    epoch, consumed = int(state["epoch"]), int(state["consumed"])
    if saved == layout_nodes(stream, stream.world(), chain):
        stream.seek(epoch, consumed, chain)
    else:
        stream.seek(epoch, 0, chain + ((saved, consumed),))


def check_state(state: dict[str, Any], mine: dict[str, Any]) -> None:
    if state.get("version") not in _STATE_VERSIONS:
        raise ValueError(f"unsupported state version {state.get('version')!r} (this "
                         f"shardstream reads versions {_STATE_VERSIONS}); resume with the "
                         "shardstream that saved it, or restart the epoch")
    if state.get("version") == 1:  # one global sequence: shares do not apply
        mine = {k: v for k, v in mine.items() if k != "node_shares"}
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
        raise ValueError(f"state does not fit this stream (saved vs now: {diff}); resume "
                         "with the same dataset, seed and shuffle settings")
