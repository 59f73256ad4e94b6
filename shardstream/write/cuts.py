"""Where a batch of encoded samples closes blocks and shards: :func:`next_cut`.

:class:`~shardstream.write.sink.ShardSink` places samples one at a time by three
rules, in this order for each sample: (1) the open block is written first if the
sample would take it past ``block_bytes``; (2) the shard is finished first if the
sample would take it past ``max_samples`` or, as a tar member, past ``max_bytes``
(a shard's first sample always fits); (3) the block is written once it reaches
``block_bytes``. Over a batch's cumulative offsets every rule is a monotone
threshold, so the first sample each one fires on is a binary search away.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import NamedTuple, Sequence

from shardstream.format.index import TAR_BLOCK, TAR_END

__all__ = ["Fill", "next_cut"]


class Fill(NamedTuple):
    """The open block and shard: samples and bytes in each."""

    block_count: int
    block_len: int
    shard_samples: int
    shard_bytes: int


#: what happens at the cut: samples ``[i, j)`` join the open block, then...
OPEN = "open"  # nothing: the batch ends inside the block
BLOCK = "block"  # the block is written (rule 1 or 3)
SHARD = "shard"  # the block is written and the shard finished (rule 2)


def next_cut(c: Sequence[int], i: int, fill: Fill, block_bytes: int, max_bytes: int,
             max_samples: int | None) -> tuple[str, int]:
    """``(what, j)`` for the samples from ``i`` of a batch cut at the offsets ``c``
    (``c[k]``: where sample ``k`` starts, ``c[-1]``: the end; a list: ``bisect`` on
    one is ten times numpy's ``searchsorted`` for one value), given ``fill``."""
    n, ci = len(c) - 1, c[i]
    filled = fill.shard_samples + fill.block_count
    # rules 1 and 3: the first sample taking the block to block_bytes or more
    m1 = bisect_left(c, block_bytes - fill.block_len + ci) - 1
    # rule 2: the first sample whose member (header, padded block) leaves no room for
    # the end of the archive; padded(x) > room  <=>  x > room rounded down to 512
    room = max_bytes - TAR_BLOCK - len(TAR_END) - fill.shard_bytes
    m2 = bisect_right(c, room // TAR_BLOCK * TAR_BLOCK - fill.block_len + ci) - 1
    m2 = max(m2, i if filled else i + 1)
    if max_samples is not None:
        m2 = min(m2, i + max_samples - filled)
    if m1 >= n and m2 >= n:
        return OPEN, n
    if m1 <= m2 and fill.block_count + m1 - i > 0 and \
            fill.block_len + c[m1 + 1] - ci > block_bytes:
        return BLOCK, m1  # rule 1: m1 would overflow the block, it starts the next
    if m1 < m2:
        return BLOCK, m1 + 1  # rule 3: m1 fills the block
    return SHARD, m2  # rule 2: m2 starts the next shard
