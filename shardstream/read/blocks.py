"""BlockReader: samples by (shard, shard-local ordinal), a run of a block at a time.

The stage under every exact reader (:class:`~shardstream.pytorch.stream.ShardStream`,
mixtures, indexed webdataset tars): blocks read with ``pread``, checked against
their checksums, decompressed, cached, and their samples decoded in runs. The epoch
order that decides which samples to read is :mod:`shardstream.read.order`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from xxhash import xxh3_64_intdigest as xxh3

from shardstream.errors import CorruptShardError, DecodeError, ShardNotFoundError, StorageError
from shardstream.format.codec import decode_sample, iter_samples
from shardstream.format.index import verify_blocks_default
from shardstream.read.dataset import damage_detail
from shardstream.read.shards import OpenShard, ShardRef, open_local, open_remote
from shardstream.storage.cache import RemoteCache
from shardstream.storage.readahead import Prefetcher
from shardstream.storage.urls import is_remote

__all__ = ["BlockReader"]


log = logging.getLogger("shardstream")


class BlockReader:
    """Reads samples by (shard, shard-local ordinal) through each shard's index.

    Runs of consecutive samples in one block are decoded with one msgpack
    Unpacker; blocks are read with ``pread`` and kept in a small LRU cache.
    ``on_error="raise"`` raises errors naming the shard, the sample and its
    byte offset; ``"warn"`` logs the same text, skips the rest of that shard
    and reports skipped samples through ``on_skip``.

    Remote shards (URLs) are fetched whole into ``remote``'s node-local cache
    (a default :class:`~shardstream.storage.cache.RemoteCache` when None) and then
    read like local ones; :meth:`prefetch` downloads the next ones ahead.
    Storage errors count as damage in warn mode, except authentication errors.

    ``verify_blocks`` (default: on, unless ``$SHARDSTREAM_VERIFY_BLOCKS=0``):
    compare every block read from disk with its checksum (index v4; cached blocks
    are not hashed again); a mismatch is a :class:`CorruptShardError` handled
    like any other damage.
    """

    def __init__(self, shards: Sequence[ShardRef], *, on_error: str = "raise",
                 cache_bytes: int = 64 << 20, on_skip: Callable[[int], None] | None = None,
                 remote: RemoteCache | None = None, verify_blocks: bool | None = None) -> None:
        self.shards = shards
        self.on_error = on_error
        self.verify_blocks = verify_blocks_default() if verify_blocks is None else verify_blocks
        self.cache_bytes = cache_bytes
        self.on_skip = on_skip
        self.remote = remote
        self._prefetcher: Prefetcher | None = None
        #: shard id -> steps until this reader's schedule needs it again (see advance)
        self.next_use: Callable[[int], float] | None = None
        self._released_at, self.release_every = 0, 1024  # positions between two looks
        self._first_read = threading.Event()
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cached = 0
        self._open: dict[int, OpenShard] = {}  # shard id -> this reader's open state

    def prefetch(self, order: Iterable[Any], depth: int = 2, positioned: bool = False) -> None:
        """Download remote shards ``order`` (shard ids, first use first; ``positioned``:
        ``(shard id, position of first use)`` of the node's schedule, see
        :class:`~shardstream.storage.readahead.Prefetcher`) in the background."""
        store = self._store()

        def fetch(s: int) -> str | None:
            """Download shard ``s``; None: not ours (local, cached, another process has it)."""
            ref = self.shards[s]
            if not is_remote(ref.path) or ref.bytes is not None and store.has_shard(
                    ref.path, size=ref.bytes, sha256=ref.sha256):
                return None
            return store.shard_path(ref.path, size=ref.bytes, sha256=ref.sha256, wait=False)
        # read-ahead starts once the reader has read its first batch: a download beside
        # the first shard (often another process's) would only slow that batch down
        self._first_read = threading.Event()
        if self._open:
            self._first_read.set()
        self._prefetcher = Prefetcher(fetch, order, depth=depth, after=self._first_read,
                                      positioned=positioned)

    def advance(self, position: int) -> None:
        """The reader is at ``position`` of the schedule :meth:`prefetch` walks; with
        :attr:`next_use`, now and then close the remote shards not needed in this step
        or the next, so that the cache may evict them."""
        if self._prefetcher is not None:
            self._prefetcher.advance(position)
        if self.next_use is not None and abs(position - self._released_at) >= self.release_every:
            self._released_at = position
            for s in [s for s, o in self._open.items() if o.fd >= 0 and is_remote(o.path)]:
                if self.next_use(s) > 1:
                    self._open.pop(s).close()

    def _store(self) -> RemoteCache:
        if self.remote is None:
            self.remote = RemoteCache()
        return self.remote

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        for shard in self._open.values():
            shard.close()
        self._open.clear()
        self._cache.clear()
        self._cached = 0

    # -- shards ---------------------------------------------------------------
    def block_firsts(self, s: int) -> np.ndarray:
        ref = self.open(s)
        if ref.block_of is None:  # unreadable shard: pretend one block
            return np.zeros(1, dtype=np.int64)
        return ref.block_first

    def open(self, s: int) -> OpenShard:
        """Shard ``s`` as this reader has it open (opened on first use; a shard that
        cannot be opened is raised, or in warn mode skipped from its first sample)."""
        shard = self._open.get(s)
        if shard is not None:
            return shard
        shard = self._open[s] = OpenShard(self.shards[s])
        try:
            if is_remote(shard.path):
                taken = self._prefetcher.take(s) if self._prefetcher is not None else None
                open_remote(shard, self._store(), self.verify_blocks, taken)
            else:
                open_local(shard, self.verify_blocks)
        except (CorruptShardError, ShardNotFoundError) as exc:
            shard.block_of = None
            self._fail(shard, 0, exc)
        except StorageError as exc:
            shard.block_of = None
            if getattr(exc, "kind", None) == "auth":
                raise  # every shard would fail the same way: no skipping
            self._fail(shard, 0, exc)
        return shard

    def _fail(self, ref: OpenShard, first: int, exc: Exception) -> None:
        """Raise, or (warn mode) log and skip ``ref`` from sample ``first`` on."""
        if self.on_error != "warn":
            raise exc
        if ref.bad_from is None or first < ref.bad_from:
            log.warning("%s; skipping the rest of the shard from shard-local sample %d",
                        exc, first)
            ref.bad_from = first

    # -- samples --------------------------------------------------------------
    def read(self, shards: np.ndarray, local: np.ndarray, narrow: bool = False) -> list[Any]:
        """Decode the samples at (shards[k], local[k]); ``None`` where skipped.

        ``narrow``: packed integer arrays stay narrow (see :mod:`shardstream.format.codec`);
        the caller widens them (e.g. while collating).
        """
        n = len(local)
        out: list[Any] = [None] * n
        if n == 0:
            return out
        if shards[0] == shards[-1] and (n < 3 or not np.any(shards != shards[0])):
            ref = self.open(int(shards[0]))
            blocks = ref.block_of[local] if ref.block_of is not None else local
        else:
            blocks = np.empty(n, dtype=np.int64)
            for s in np.unique(shards).tolist():
                sel = shards == s
                ref = self.open(s)
                blocks[sel] = ref.block_of[local[sel]] if ref.block_of is not None else -1
        brk = np.flatnonzero((np.diff(local) != 1) | (np.diff(shards) != 0)
                             | (np.diff(blocks) != 0)) + 1
        starts = [0, *brk.tolist()]
        ends = [*brk.tolist(), n]
        sl, ll = shards.tolist(), local.tolist()
        skipped = 0
        for k0, k1 in zip(starts, ends):
            skipped += self._run(out, k0, sl[k0], ll[k0], ll[k0] + k1 - k0, narrow)
        if skipped and self.on_skip is not None:
            self.on_skip(skipped)
        self._first_read.set()
        return out

    def _run(self, out: list, k0: int, s: int, i0: int, i1: int,
             narrow: bool = False) -> int:
        """Decode shard ``s`` samples [i0, i1) (one block) into out[k0:]; returns skipped."""
        ref = self._open[s]
        stop = i1
        if ref.trunc_from is not None and stop > ref.trunc_from:
            first = max(i0, ref.trunc_from)
            b = int(ref.block_of[first])
            self._fail(ref, first, CorruptShardError(
                f"shard {ref.path} is truncated ({ref.size} of {ref.ref.bytes or '?'} bytes): "
                f"{ref.label(first)} at byte offset "
                f"{int(ref.block_offset[b] + ref.rel_start[first])} (block {b}) is missing; "
                "restore the shard or rewrite the dataset"))
        if ref.bad_from is not None:
            stop = min(stop, max(i0, ref.bad_from))
        if stop > i0:
            got = self._decode(ref, s, i0, stop, out, k0, narrow)
            if got < stop - i0:
                stop = i0 + got
        return i1 - stop

    def _decode(self, ref: OpenShard, s: int, i0: int, i1: int, out: list, k0: int,
                narrow: bool = False) -> int:
        b = int(ref.block_of[i0])
        try:
            data = self._block(ref, s, b)
        except CorruptShardError as exc:
            self._fail(ref, i0, exc)
            return 0
        if getattr(ref.codec, "foreign", False):  # members of a webdataset tar, not msgpack
            return ref.codec.decode_run(ref, b, data, i0, i1, out, k0,
                                        lambda j, e: self._fail(ref, j, e))
        view = memoryview(data)[ref.rel_start[i0]:ref.rel_end[i1 - 1]]
        got: list = []
        try:
            if i1 - i0 == 1:
                out[k0] = decode_sample(view, narrow and ref.codec is not None)
                return 1
            try:
                got.extend(iter_samples(view, narrow and ref.codec is not None))
            finally:
                out[k0:k0 + len(got)] = got
            if len(got) != i1 - i0:
                raise DecodeError(f"block {b} holds {len(got)} samples where the index "
                                  f"expects {i1 - i0}")
            return len(got)
        except DecodeError as exc:
            bad = min(i0 + len(got), i1 - 1)
            off = int(ref.block_offset[b] + ref.rel_start[bad])
            self._fail(ref, bad, CorruptShardError(
                f"shard {ref.path}: {ref.label(bad)} at byte offset {off} (block {b}) is "
                f"corrupt: {exc}; restore the shard or rewrite the dataset"))
            return bad - i0

    def _block(self, ref: OpenShard, s: int, b: int) -> bytes:
        key = (s, b)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        off, size = int(ref.block_offset[b]), int(ref.block_size[b])
        try:
            data = os.pread(ref.fd, size, off)
        except OSError as exc:
            raise StorageError(f"cannot read {ref.path}: {exc.strerror or exc}") from exc
        if len(data) != size:
            raise CorruptShardError(f"shard {ref.path}: block {b} at byte offset {off} is "
                                    f"truncated ({len(data)} of {size} bytes)")
        if ref.index is not None:
            self._check_block(ref, b, data)
        if ref.codec is not None:
            data = ref.codec.decode(b, data, ref.label(int(ref.block_first[b])))
        self._cache[key] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)
        return data

    @staticmethod
    def _check_block(ref: OpenShard, b: int, data: bytes) -> None:
        """Compare block ``b``'s stored bytes with its checksum (names the damaged frame
        of a framed block too)."""
        index = ref.index
        assert index is not None
        if xxh3(data) == int(index.block_checksum[b]):
            return
        msg = index.checksum_message(b, ref.path, xxh3(data), ref.label(int(ref.block_first[b])))
        detail = damage_detail(index, b, data, ref.path, label=ref.label, decoder=ref.codec)
        raise CorruptShardError(msg if detail is None else f"{msg}; {detail}")
