"""The Ray writer's object-storage path (``s3://``, ``gs://``, ``az://``...): tasks upload, the
driver publishes ``manifest.json`` last.

Object stores have no rename, so nothing is moved at the end: every write task packs its
rows in a local temporary folder on its own node (:class:`~shardstream.write.sink.ShardSink`,
as ``ShardWriter`` does for a URL), uploads each shard and its index as soon as the shard
is finished (:func:`shardstream.storage.io.put_file`, retried; then the local copy goes)
under its final name, and returns the shards' infos. The names are unique per job and per
task attempt::

    <prefix>-<job>-<order>-<attempt>-<n>.tar (+ .idx)
    e.g. shard-1f0c9a2b3d4e-000003-9b1c2d3e-000000.tar

The driver (:meth:`RemoteJob.commit`) checks that every object the successful attempts
list is there, PUTs ``manifest.json`` (one atomic step; readers see the old dataset or the
new one) listing exactly those shards in part order, and then deletes what the dataset
no longer lists (an overwrite's old objects). :meth:`RemoteJob.cleanup` then deletes every
object of the job that the published manifest does not list: the whole job after a
failure, the uploads of failed or retried attempts after a success. A failing task also
deletes its own uploads first. Remote outputs are not locked (as for ``ShardWriter``): keep
writers of one prefix apart yourself.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from shardstream import __version__
from shardstream.errors import EncodeError, StorageError
from shardstream.format.compression import Compression
from shardstream.format.index import INDEX_SUFFIX
from shardstream.format.manifest import MANIFEST_NAME, STAGING_PREFIX, Manifest, ShardInfo
from shardstream.format.schema import SchemaBuilder
from shardstream.storage import io, retry, urls
from shardstream.write.output import PreparedOutput
from shardstream.write.sink import ShardSink

__all__ = ["StagedPart", "ordered_parts", "RemoteJob", "check_remote_output", "UPLOADS"]

#: shards a task uploads at once while it packs the next (each one stays on local disk
#: until its upload finished)
UPLOADS = 2
_BEST_EFFORT = retry.RetryPolicy(attempts=2)


@dataclass(frozen=True)
class StagedPart:
    """What one write task staged: its shards, in order, and their schema."""

    order: int            # position of this part in the dataset (task index or input group)
    staging: str          # staging folder name (local) or attempt id (remote)
    shards: tuple[ShardInfo, ...]
    schema: dict[str, dict[str, Any]]
    num_samples: int


def ordered_parts(parts: list[StagedPart]) -> list[StagedPart]:
    """``parts`` in dataset order; two results for one part are refused."""
    parts = sorted(parts, key=lambda p: p.order)
    for a, b in zip(parts, parts[1:]):
        if a.order == b.order:
            raise RuntimeError(f"two results for write task {a.order} ({a.staging}, "
                               f"{b.staging}); refusing to publish a duplicated part")
    return parts


def check_remote_output(url: str) -> str:
    """``url`` if Ray tasks on other processes and nodes can write to it."""
    if urls.is_pipe(url) or urls.url_protocol(url) == "memory":
        raise ValueError(f"{url}: the Ray writer needs an output every Ray worker reaches "
                         "(a shared path, s3://, gs://, az://...); memory:// and pipe: are "
                         "private to one process")
    return url


def stray_pattern(prefix: str) -> re.Pattern[str]:
    """Names the Ray writer uploads, of any job (an overwrite removes unlisted ones)."""
    return re.compile(re.escape(prefix) + r"-[0-9a-f]{12}-\d{6,}-[0-9a-f]{8}-\d{6,}\.tar("
                      + re.escape(INDEX_SUFFIX) + r")?")


# ---------------------------------------------------------------- worker side
class _Uploads:
    """Uploads finished shards (tar, then index) in the background, ``UPLOADS`` at a time."""

    def __init__(self, local_dir: str, url: str, storage_options: dict[str, Any] | None) -> None:
        self.local_dir, self.url, self.opts = local_dir, url, storage_options
        self.pool = ThreadPoolExecutor(UPLOADS, thread_name_prefix="shardstream-ray-upload")
        self.pending: deque[Future[None]] = deque()
        self.names: list[str] = []  # every object submitted, for the clean-up
        self.count = 0  # shards submitted

    def submit(self, infos: Iterable[ShardInfo]) -> None:
        for info in infos:
            while len(self.pending) >= UPLOADS:  # bounds the local disk used
                self.pending.popleft().result()
            self.names += [info.name, info.index]
            self.count += 1
            self.pending.append(self.pool.submit(self._put, info))

    def _put(self, info: ShardInfo) -> None:
        for name in (info.name, info.index):  # the index last: a listed index means a whole tar
            local = os.path.join(self.local_dir, name)
            io.put_file(local, urls.join(self.url, name), storage_options=self.opts)
            os.unlink(local)

    def wait(self) -> None:
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown()

    def abort(self) -> None:
        """Stop, then delete whatever went up (best effort: the driver sweeps too)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for name in self.names:
            try:
                io.remove(urls.join(self.url, name), storage_options=self.opts,
                          retry=_BEST_EFFORT)
            except Exception:  # noqa: BLE001 - the task's own error matters
                pass


# ---------------------------------------------------------------- the job
@dataclass
class RemoteJob:
    """One Ray write job to a URL: what its tasks upload and what the driver publishes."""

    url: str
    storage_options: dict[str, Any] | None
    prefix: str
    job: str
    #: names the published manifest lists: :meth:`cleanup` never deletes them
    keep: set[str] = field(default_factory=set)

    @property
    def _mine(self) -> str:
        return f"{self.prefix}-{self.job}-"

    def pack(self, order: int, rows: Iterable[dict], sink_kw: dict[str, Any],
             where: str) -> StagedPart:
        """In a task: pack ``rows`` as part ``order``, uploading each finished shard.

        On error nothing of this attempt stays (locally or, best effort, in the store)."""
        attempt = uuid.uuid4().hex[:8]
        try:
            local = tempfile.mkdtemp(prefix=f"shardstream{STAGING_PREFIX}ray-{self.job}-")
        except OSError as exc:
            raise StorageError(f"cannot create a local staging folder for {self.url} on this "
                               f"Ray node: {exc.strerror or exc}", errno=exc.errno) from exc
        name_format = f"{self._mine}{order:06d}-{attempt}-{{:06d}}.tar"
        sink = ShardSink(local, name_format=name_format, **sink_kw)
        uploads = _Uploads(local, self.url, self.storage_options)
        try:
            for row in rows:
                sink.write(row)
                if len(sink.shards) > uploads.count:
                    uploads.submit(sink.shards[uploads.count:])
            uploads.submit(sink.finish()[uploads.count:])
            uploads.wait()
        except EncodeError as exc:
            sink.close_files()
            uploads.abort()
            raise EncodeError(f"{where} (samples counted from its first row): {exc}",
                              sample=exc.sample, path=exc.path) from exc
        except BaseException:
            sink.close_files()
            uploads.abort()
            raise
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return StagedPart(order, attempt, tuple(sink.shards), sink.schema.to_dict(),
                          sink.num_samples)

    def commit(self, target: PreparedOutput, parts: list[StagedPart], *, key_field: str,
               block_bytes: int, compression: Compression | None, overwrite: bool) -> Manifest:
        """Driver: PUT ``manifest.json`` listing ``parts`` in order (after the old dataset's
        shards when appending), then delete what an overwrite replaced."""
        parts = ordered_parts(parts)
        opts = self.storage_options
        manifest_url = urls.join(self.url, MANIFEST_NAME)
        schema = SchemaBuilder()
        if target.base is not None:
            schema.merge(target.base.schema)
        for p in parts:
            schema.merge(p.schema)
        new = [info for p in parts for info in p.shards]
        kept = list(target.base.shards) if target.base is not None else []
        data = Manifest(shards=kept + new, schema=schema.to_dict(), key_field=key_field,
                        block_bytes=block_bytes, created_by=f"shardstream {__version__}",
                        compression=compression).to_json().encode()
        manifest = Manifest.from_json(data, where=manifest_url)  # what readers will load
        listed = {n for s in manifest.shards for n in (s.name, s.index)}
        entries = set(io.list_prefix(self.url, storage_options=opts))
        missing = sorted(n for i in new for n in (i.name, i.index) if n not in entries)
        if missing:
            raise StorageError(f"{self.url}: {len(missing)} objects the write tasks uploaded "
                               f"are not there ({', '.join(missing[:3])}...); not publishing. "
                               "Do all Ray nodes reach the same store (endpoint, "
                               "credentials)?", url=self.url)
        try:
            io.put_bytes(data, manifest_url, storage_options=opts)
        except BaseException:
            if self._manifest_maybe(manifest_url, data):
                self.keep |= listed  # it may stand: keep what it lists
            raise
        self.keep |= listed
        old = set(target.old_files)
        if overwrite:  # and stray uploads of jobs that died with their driver
            old |= {e for e in entries if stray_pattern(self.prefix).fullmatch(e)}
        for name in sorted(old - listed):
            io.remove(urls.join(self.url, name), storage_options=opts)
        return manifest

    def _manifest_maybe(self, url: str, data: bytes) -> bool:
        """Whether ``url`` may hold ``data`` (True when that cannot be told)."""
        try:
            return io.read_bytes(url, storage_options=self.storage_options,
                                 retry=_BEST_EFFORT) == data
        except FileNotFoundError:
            return False
        except Exception:  # noqa: BLE001 - unknown: orphans are safer than a broken dataset
            return True

    def cleanup(self) -> None:
        """Driver: delete every object of this job that no published manifest lists
        (all of it after a failure); best effort, a failure is a warning."""
        try:
            names = [e for e in io.list_prefix(self.url, storage_options=self.storage_options)
                     if e.startswith(self._mine) and e not in self.keep]
            for name in names:
                io.remove(urls.join(self.url, name), storage_options=self.storage_options)
        except Exception as exc:  # noqa: BLE001 - the job's own error (if any) matters more
            warnings.warn(f"could not remove the unpublished objects of Ray write job "
                          f"{self.job} under {self.url} ({self._mine}*): {exc}; nothing "
                          "lists them, an overwrite removes them", stacklevel=2)
