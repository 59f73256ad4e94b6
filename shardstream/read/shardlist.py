"""Sources without a manifest: shard-level splitting and safe member decoding.

Tar shards listed by a brace pattern or a list are split between ranks and
workers by whole shards, as webdataset does (counts per rank may differ; use
a manifest for exact epochs, or ``resampled=True`` with ``epoch_size``).
Our own shards (``<shard>.tar.idx`` next to them) are still read block by
block through their index, as are webdataset tars indexed in place
(``shardstream index``; a list of local tars that all are streams with exact
epochs, see :func:`shardstream.read.webdataset.list_manifest`), their members checked
against the index's checksums. Un-indexed webdataset tars are read with
webdataset's tar iterators (nothing to check them against). Members are decoded by
extension by :func:`shardstream.format.members.decode_member` -- never unpickled.

Remote URLs (``s3://``, ``http://``...): an indexed shard (its ``.idx`` object
exists) is downloaded into the node-local cache (:mod:`shardstream.storage.cache`),
the next ones ahead in a background thread; a foreign tar is streamed with
:func:`shardstream.storage.streams.open_stream` (resumable range requests) into the
tar iterator -- webdataset's ``gopen`` (``curl`` pipes) is never used.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from shardstream.errors import CorruptShardError, ShardNotFoundError, StorageError
from shardstream.format.index import INDEX_SUFFIX
from shardstream.format.members import decode_member
from shardstream.format.webdataset import index_from_bytes
from shardstream.read.blocks import BlockReader
from shardstream.read.order import BUFFER_TAG, RESAMPLE_TAG, SHARD_TAG, rng_for
from shardstream.read.shards import ShardRef
from shardstream.storage import streams
from shardstream.storage.cache import RemoteCache
from shardstream.storage.readahead import Prefetcher
from shardstream.storage.urls import is_remote, local_path

__all__ = ["decode_wds_sample", "iter_shard", "iter_shards", "split_shards",
           "resampled_shards", "buffer_shuffle", "batched", "limit", "is_indexed"]


log = logging.getLogger("shardstream")


def decode_wds_sample(sample: dict[str, Any], *, url: str = "?") -> dict[str, Any]:
    """Decode every member of a webdataset sample; ``__key__`` and ``__url__`` are kept."""
    out: dict[str, Any] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            out[name] = value
            continue
        try:
            out[name] = decode_member(name, value)
        except Exception as exc:  # json, numpy, msgpack, unicode: many exception types
            raise CorruptShardError(f"shard {url}: sample {sample.get('__key__')!r}, member "
                                    f"{name!r} cannot be decoded: {type(exc).__name__}: {exc}"
                                    ) from exc
    return out


# ---------------------------------------------------------------- reading shards
def is_indexed(url: str, remote: RemoteCache | None = None) -> bool:
    """A shardstream shard: its ``.idx`` lies next to it (locally, or as an object)."""
    if is_remote(url):
        remote = remote or RemoteCache()
        return remote.index_bytes(url + INDEX_SUFFIX, missing_ok=True) is not None
    return os.path.exists(url + INDEX_SUFFIX)


def iter_shard(url: str, *, on_error: str = "raise",
               on_skip: Callable[[int], None] | None = None,
               remote: RemoteCache | None = None) -> Iterator[dict]:
    """The samples of one shard, ours (via its index) or a foreign webdataset tar."""
    try:
        indexed = is_indexed(url, remote)
    except StorageError as exc:
        if on_error != "warn" or getattr(exc, "kind", None) == "auth":
            raise
        log.warning("%s; skipping shard %s", exc, url)
        return
    if indexed:
        yield from _iter_indexed(url, on_error, on_skip, remote)
    else:
        yield from _iter_foreign(url, on_error, remote)


def iter_shards(urls: Iterable[str], *, on_error: str = "raise",
                on_skip: Callable[[int], None] | None = None,
                remote: RemoteCache | None = None, prefetch: int = 2) -> Iterator[dict]:
    """Samples of ``urls`` in turn; remote indexed shards of a list are downloaded
    ``prefetch`` shards ahead (resampled streams are not)."""
    ahead: Prefetcher | None = None
    if remote is not None and prefetch > 0 and isinstance(urls, Sequence):
        ahead = Prefetcher(lambda u: _fetch_indexed(u, remote), list(urls), depth=prefetch)
    try:
        for url in urls:
            if ahead is not None:
                try:
                    ahead.take(url)
                except Exception:  # noqa: BLE001 - iter_shard meets and reports it again
                    pass
            yield from iter_shard(url, on_error=on_error, on_skip=on_skip, remote=remote)
    finally:
        if ahead is not None:
            ahead.close()


def _fetch_indexed(url: str, remote: RemoteCache) -> str | None:
    """Download a remote indexed shard into the cache (read-ahead); foreign tars: None."""
    if not is_remote(url):
        return None
    data = remote.index_bytes(url + INDEX_SUFFIX, missing_ok=True)
    if data is None:
        return None
    size = index_from_bytes(data, url + INDEX_SUFFIX).shard_bytes
    return remote.shard_path(url, size=size, wait=False)


def _iter_indexed(url: str, on_error: str, on_skip: Callable[[int], None] | None,
                  remote: RemoteCache | None = None) -> Iterator[dict]:
    reader = BlockReader([ShardRef(url, url + INDEX_SUFFIX)], on_error=on_error,
                         cache_bytes=1 << 20, on_skip=on_skip, remote=remote)
    try:
        ref = reader.open(0)
        if ref.block_of is None:
            return
        firsts = ref.block_first.tolist() + [len(ref.block_of)]
        for b in range(len(firsts) - 1):
            local = np.arange(firsts[b], firsts[b + 1])
            for s in reader.read(np.zeros(len(local), dtype=np.int64), local):
                if s is not None:
                    yield s
            if ref.bad_from is not None:
                return
    finally:
        reader.close()


def _iter_foreign(url: str, on_error: str, remote: RemoteCache | None = None
                  ) -> Iterator[dict]:
    """A webdataset tar streamed through :func:`storage.open_stream` (never ``gopen``)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    if not is_remote(url) and not os.path.exists(local_path(url)):
        exc = ShardNotFoundError(f"shard {url} does not exist; check the path or pattern")
        if on_error != "warn":
            raise exc
        log.warning("%s; skipping it", exc)
        return
    last = None
    opts = remote.storage_options if remote is not None else None
    try:
        with streams.open_stream(url, storage_options=opts) as stream:
            files = tar_file_expander(iter([{"url": url, "stream": stream}]))
            for sample in group_by_keys(files):
                last = sample.get("__key__")
                yield decode_wds_sample(sample, url=url)
    except (StorageError, ShardNotFoundError) as exc:  # after the retry budget
        if on_error != "warn" or getattr(exc, "kind", None) == "auth":
            raise
        log.warning("%s; skipping the rest of shard %s after sample %r", exc, url, last)
    except CorruptShardError as exc:
        if on_error != "warn":
            raise
        log.warning("%s; skipping the rest of the shard", exc)
    except Exception as exc:  # tarfile / gopen errors
        err = CorruptShardError(f"shard {url}: unreadable after sample {last!r} "
                                f"({type(exc).__name__}: {exc}); the tar is truncated or corrupt")
        if on_error != "warn":
            raise err from exc
        log.warning("%s; skipping the rest of the shard", err)


# ---------------------------------------------------------------- shard-level stages
def split_shards(urls: Sequence[str], *, rank: int, world_size: int, worker: int,
                 num_workers: int, seed: int, epoch: int, shuffle: bool) -> list[str]:
    """Shuffle shards by (seed, epoch), then keep this rank's and worker's share."""
    order = list(urls)
    if shuffle:
        order = [order[i] for i in rng_for(seed, epoch, SHARD_TAG).permutation(len(order))]
    return order[rank::world_size][worker::num_workers]


def resampled_shards(urls: Sequence[str], *, seed: int, epoch: int, rank: int,
                     worker: int) -> Iterator[str]:
    """Endless shards drawn with replacement, seeded per (seed, epoch, rank, worker)."""
    rng = rng_for(seed, epoch, RESAMPLE_TAG, rank, worker)
    while True:
        for i in rng.integers(0, len(urls), 1024):
            yield urls[int(i)]


def buffer_shuffle(data: Iterable[Any], size: int, *, seed: int, epoch: int, rank: int,
                   worker: int) -> Iterator[Any]:
    """Deterministic buffer shuffle (webdataset's algorithm, seeded per reader)."""
    import webdataset as wds

    rng = random.Random(hash((seed, epoch, BUFFER_TAG, rank, worker)))
    return wds.filters._shuffle(iter(data), bufsize=size, initial=min(size, 100), rng=rng)


def batched(data: Iterable[dict], size: int, collate: Callable[[list], Any], *,
            partial: bool) -> Iterator[Any]:
    """Group samples into lists of ``size`` and collate each."""
    batch: list = []
    for sample in data:
        batch.append(sample)
        if len(batch) == size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)


def limit(data: Iterable[Any], n: int) -> Iterator[Any]:
    """The first ``n`` items."""
    if n <= 0:
        return
    for i, item in enumerate(data, 1):
        yield item
        if i >= n:
            return
