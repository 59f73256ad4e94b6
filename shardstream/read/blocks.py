"""Pipeline stages: the exact epoch layout and order, and shard-level stages.

Exact mode (a manifest gives every count up front)
---------------------------------------------------
An epoch is one global sequence ``G`` of the dataset's ``N`` samples:

1. shards in an order permuted by ``(seed, epoch)``, laid end to end;
2. inside each shard, blocks in an order permuted by ``(seed, epoch, shard)``
   (``block_shuffle``; cheap decorrelation, whole blocks stay contiguous);
3. positions permuted inside fixed windows of ``shuffle_buffer`` positions
   by ``(seed, epoch, window)`` -- a resumable stand-in for a shuffle buffer.

``G`` does not depend on world size or worker count. :class:`Layout` cuts
``G[start:]`` into *units* (a batch, or one sample) dealt round-robin: global
unit ``g`` goes to rank ``g % world_size`` as its unit ``g // world_size``,
and rank unit ``j`` is produced by worker ``j % num_workers`` -- exactly the
order in which a DataLoader collects from its workers. So every rank yields
the same count, every sample appears once (minus the dropped / plus the
padded remainder), and after each rank consumed ``k`` units the consumed
samples are the prefix ``G[:start + k * world_size * unit]``: the resume
state is one integer, valid for any world size or worker count.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from xxhash import xxh3_64_intdigest as xxh3

from shardstream.errors import (CorruptShardError, DecodeError, IndexMismatchError,
                                ShardNotFoundError, StorageError)
from shardstream.format.codec import decode_sample, iter_samples
from shardstream.format.index import ShardIndex, read_index_file, verify_blocks_default
from shardstream.read.dataset import check_index_entry, damage_detail
from shardstream.storage.cache import Prefetcher, RemoteCache
from shardstream.storage.urls import is_remote

__all__ = ["ShardRef", "BlockReader", "shard_refs"]


log = logging.getLogger("shardstream")


# ---------------------------------------------------------------- reading by index
class ShardRef:
    """One shard a reader may touch: its paths, expected size and global ordinal base.

    ``bad_from`` is the first shard-local ordinal skipped after an error
    (``on_error="warn"``); ``trunc_from`` the first sample a truncated file lacks.
    ``path`` may be a URL (``s3://``, ``http://``...): see :mod:`shardstream.storage.cache`;
    ``sha256``/``index_sha256`` (from the manifest) then name the cached copies.
    The manifest's values (when given) must match the index: sample count, shard
    size and sha256, index size and sha256 (:func:`~shardstream.read.dataset.check_index_entry`).
    """

    __slots__ = ("path", "index_path", "expected_bytes", "expected_samples", "base", "opened",
                 "fd", "block_first", "block_of", "block_offset", "block_size", "rel_start", "rel_end",
                 "bad_from", "trunc_from", "size", "codec", "sha256", "index_sha256",
                 "expected_index_bytes", "index")

    def __init__(self, path: str, index_path: str, *, expected_bytes: int | None = None,
                 expected_samples: int | None = None, base: int | None = None,
                 sha256: str | None = None, index_sha256: str | None = None,
                 index_bytes: int | None = None) -> None:
        self.path, self.index_path = path, index_path
        self.expected_bytes, self.expected_samples, self.base = expected_bytes, expected_samples, base
        self.sha256, self.index_sha256 = sha256, index_sha256
        self.expected_index_bytes = index_bytes
        self.index: ShardIndex | None = None
        self.opened = False
        self.fd = -1
        self.bad_from: int | None = None
        self.trunc_from: int | None = None
        self.size = 0

    def label(self, i: int) -> str:
        """How errors name sample ``i``: its dataset key (global ordinal) if known."""
        if self.base is None:
            return f"shard-local sample {i}"
        return f"sample {self.base + i:09d} (global ordinal; shard-local {i})"

    @property
    def num_samples(self) -> int | None:  # the manifest entry, for check_index_entry
        return self.expected_samples

    @property
    def bytes(self) -> int | None:
        return self.expected_bytes

    @property
    def index_bytes(self) -> int | None:
        return self.expected_index_bytes


def shard_refs(dataset: Any) -> list[ShardRef]:
    """One :class:`ShardRef` per shard of a dataset with a manifest, in manifest order."""
    refs, base = [], 0
    for info in dataset.manifest.shards:
        refs.append(ShardRef(dataset.shard_path(info), dataset.index_path(info),
                             expected_bytes=info.bytes, expected_samples=info.num_samples,
                             base=base, sha256=info.sha256, index_sha256=info.index_sha256,
                             index_bytes=info.index_bytes))
        base += info.num_samples
    return refs


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
        self._first_read = threading.Event()
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cached = 0

    def prefetch(self, order: Iterable[int], depth: int = 2) -> None:
        """Download remote shards ``order`` (shard ids, first use first) in the background."""
        store = self._store()

        def fetch(s: int) -> str | None:
            """Download shard ``s``; None: not ours (local, cached, another process has it)."""
            ref = self.shards[s]
            if not is_remote(ref.path) or ref.expected_bytes is not None and store.has_shard(
                    ref.path, size=ref.expected_bytes, sha256=ref.sha256):
                return None
            return store.shard_path(ref.path, size=ref.expected_bytes, sha256=ref.sha256,
                                    wait=False)
        # read-ahead starts once the reader has read its first batch: a download beside
        # the first shard (often another process's) would only slow that batch down
        self._first_read = threading.Event()
        if any(ref.opened for ref in self.shards):
            self._first_read.set()
        self._prefetcher = Prefetcher(fetch, order, depth=depth, after=self._first_read)

    def _store(self) -> RemoteCache:
        if self.remote is None:
            self.remote = RemoteCache()
        return self.remote

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        for ref in self.shards:
            if ref.fd >= 0:
                os.close(ref.fd)
                ref.fd = -1
            ref.opened = False
        self._cache.clear()
        self._cached = 0

    # -- shards ---------------------------------------------------------------
    def block_firsts(self, s: int) -> np.ndarray:
        ref = self.open(s)
        if ref.block_of is None:  # unreadable shard: pretend one block
            return np.zeros(1, dtype=np.int64)
        return ref.block_first

    def open(self, s: int) -> ShardRef:
        ref = self.shards[s]
        if ref.opened:
            return ref
        ref.opened = True
        ref.block_of = None
        try:
            if is_remote(ref.path):
                self._load_remote(s, ref)
            else:
                self._load(ref)
        except (CorruptShardError, ShardNotFoundError) as exc:
            self._fail(ref, 0, exc)
        except StorageError as exc:
            if getattr(exc, "kind", None) == "auth":
                raise  # every shard would fail the same way: no skipping
            self._fail(ref, 0, exc)
        return ref

    def _load_remote(self, s: int, ref: ShardRef) -> None:
        """Index by one request (cached), shard whole into the node-local cache."""
        store = self._store()
        taken = self._prefetcher.take(s) if self._prefetcher is not None else None
        data = store.index_bytes(ref.index_path, sha256=ref.index_sha256,
                                 size=ref.expected_index_bytes)
        assert data is not None
        index = _any_index(data, ref.index_path)
        self._check_entry(ref, index, data)
        size = ref.expected_bytes if ref.expected_bytes is not None else index.shard_bytes
        fd = store.open_shard(ref.path, size=size, sha256=ref.sha256, path=taken)
        try:
            self._set_index(ref, index, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        ref.fd = fd

    def _load(self, ref: ShardRef) -> None:
        try:
            size = os.path.getsize(ref.path)
        except FileNotFoundError:
            raise ShardNotFoundError(f"shard {ref.path} is missing; restore it or rewrite the "
                                     "dataset") from None
        data = read_index_file(ref.index_path, ref.path)
        index = _any_index(data, ref.index_path)
        self._check_entry(ref, index, data)
        self._set_index(ref, index, size)
        try:
            ref.fd = os.open(ref.path, os.O_RDONLY)
        except OSError as exc:
            raise StorageError(f"cannot open {ref.path}: {exc.strerror or exc}") from exc

    @staticmethod
    def _check_entry(ref: ShardRef, index: ShardIndex, data: bytes) -> None:
        """``index`` (from ``data``) must be the one the manifest lists for ``ref``."""
        check_index_entry(index, data, ref, idx_path=ref.index_path, shard_path=ref.path)

    def _set_index(self, ref: ShardRef, index: ShardIndex, size: int) -> None:
        """Check ``index`` against the shard's ``size``; keep it."""
        if not isinstance(index, ShardIndex):  # a webdataset tar indexed in place
            return _set_foreign_index(ref, index, size, self.verify_blocks)
        if size > index.shard_bytes:
            raise IndexMismatchError(f"shard {ref.path} is {size} bytes, its index says "
                                     f"{index.shard_bytes}: the shard was replaced; rebuild the "
                                     "index with `shardstream index`")
        n = index.num_samples
        firsts = index.block_first.astype(np.int64)
        counts = np.diff(np.append(firsts, n))
        ref.block_first = firsts
        ref.block_of = np.repeat(np.arange(index.num_blocks), counts)
        ref.block_offset = index.block_offset.astype(np.int64)
        ref.block_size = index.block_size.astype(np.int64)
        ref.rel_start = index.sample_offset.astype(np.int64)
        rel_end = np.empty(n, dtype=np.int64)
        rel_end[:-1] = ref.rel_start[1:]
        last = np.append(firsts[1:], n) - 1
        rel_end[last] = index.raw_block_size  # offsets are into uncompressed blocks
        ref.rel_end = rel_end
        ref.size = size
        ref.codec = index.block_decoder(ref.path)  # None: blocks stored raw
        ref.index = index if self.verify_blocks and index.checksummed else None
        if size < index.shard_bytes:
            short = np.flatnonzero(index.stored_ends() > size)
            ref.trunc_from = int(short[0]) if len(short) else None

    def _fail(self, ref: ShardRef, first: int, exc: Exception) -> None:
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
        ref = self.shards[s]
        stop = i1
        if ref.trunc_from is not None and stop > ref.trunc_from:
            first = max(i0, ref.trunc_from)
            b = int(ref.block_of[first])
            self._fail(ref, first, CorruptShardError(
                f"shard {ref.path} is truncated ({ref.size} of {ref.expected_bytes or '?'} bytes): "
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

    def _decode(self, ref: ShardRef, s: int, i0: int, i1: int, out: list, k0: int,
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

    def _block(self, ref: ShardRef, s: int, b: int) -> bytes:
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
    def _check_block(ref: ShardRef, b: int, data: bytes) -> None:
        """Compare block ``b``'s stored bytes with its checksum (names the damaged frame
        of a framed block too)."""
        index = ref.index
        assert index is not None
        if xxh3(data) == int(index.block_checksum[b]):
            return
        msg = index.checksum_message(b, ref.path, xxh3(data), ref.label(int(ref.block_first[b])))
        detail = damage_detail(index, b, data, ref.path, label=ref.label, decoder=ref.codec)
        raise CorruptShardError(msg if detail is None else f"{msg}; {detail}")


# ---------------------------------------------------------------- webdataset tars (wdsindex)
def _any_index(data: bytes, where: str) -> Any:
    """A shardstream index, or the :class:`~shardstream.format.webdataset.ForeignIndex` of a
    webdataset tar indexed in place (``shardstream index``)."""
    from shardstream.format.webdataset import index_from_bytes

    return index_from_bytes(data, where)


def _set_foreign_index(ref: ShardRef, index: Any, size: int, verify: bool = True) -> None:
    """Read a webdataset tar through its index; ``verify``: check member checksums."""
    from shardstream.read.webdataset import set_stream_index

    set_stream_index(ref, index, size, verify)
