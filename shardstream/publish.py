"""Publishing a dataset: locking the output, staging, moving shards into place
(or uploading them) and switching to the new ``manifest.json`` in one step.

Used by every writer (:class:`~shardstream.writer.ShardWriter`,
:func:`~shardstream.parallel.write_shards`, the Ray integration, ``convert``):

1. :func:`prepare_output` takes an exclusive lock on the output directory
   (``flock`` on ``.shardstream.lock``; a second writer fails at once with
   :class:`~shardstream.errors.DatasetLockedError`), then removes leftovers
   of crashed writers (``.staging-*`` folders, manifest temp files: only a
   crashed writer can have left them while the lock is free), reads the old
   manifest (checked, see :meth:`Manifest.from_json`) and lists the old files
   an overwrite will remove: names the old manifest lists (plain names inside
   the directory) and stray files of this writer's own pattern
   (``<prefix>-NNNNNN.tar[.idx]``). Nothing else is ever deleted.
2. Shards are written into staging folders (:func:`make_staging`).
3. :func:`publish` moves them in under names that no file in the directory
   (and no name the old manifest lists) uses, so overwrites alternate between
   two number ranges; then ``os.replace`` puts the new manifest in place (the
   one atomic switch); only then are the old files removed. A reader that
   opened the old manifest gets :class:`ShardNotFoundError` after the switch,
   never a mix of old and new shards; a crash at any point leaves the old
   dataset whole or the new one whole, plus orphans that the next overwrite
   removes.
4. :meth:`PreparedOutput.release` drops the lock (and removes the output
   directory again if this writer created it and published nothing).

Remote (URL) outputs cannot be locked this way: two writers on one prefix
must be kept apart by the caller. Their new objects get fresh names too, the
manifest is one PUT, and the old objects are deleted after it.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import re
import shutil
import tempfile
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable

from . import __version__, storage
from .compression import Compression
from .errors import DatasetExistsError, DatasetLockedError, ManifestError, StorageError
from .index import INDEX_SUFFIX
from .manifest import LOCK_NAME, MANIFEST_NAME, STAGING_PREFIX, Manifest, SchemaBuilder, \
    ShardInfo, atomic_write, check_name, fsync_dir, load_manifest

__all__ = ["STAGING_PREFIX", "LOCK_NAME", "FAULT_STEPS", "DatasetLock", "PreparedOutput",
           "prepare_output", "make_staging", "publish"]

UPLOAD_THREADS = 4

#: the steps of :func:`publish`, in order, at which :data:`_fault` is called
FAULT_STEPS = ("staged", "moving", "moved", "manifest", "removed-old")

#: test hook: called with each step's name; raising (or dying) there simulates a crash
_fault: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _fault is not None:
        _fault(name)


def _storage_error(action: str, path: str, exc: OSError) -> StorageError:
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}", errno=exc.errno)


# ---------------------------------------------------------------- the writers' lock
_held: "weakref.WeakSet[DatasetLock]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    """In a forked child: close the inherited lock fds (the parent keeps the lock), so
    the lock goes away with the parent even while children live on."""
    for lock in list(_held):
        lock._drop_fd()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class DatasetLock:
    """An exclusive ``flock`` on ``<directory>/.shardstream.lock``, held by this process.

    The kernel drops it when the process dies, so a crashed writer never leaves
    a stale lock; :meth:`release` removes the lock file while still holding it.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._pid = os.getpid()
        _held.add(self)

    @classmethod
    def acquire(cls, directory: str) -> "DatasetLock | None":
        """Lock ``directory`` or raise :class:`DatasetLockedError` at once.

        None where the filesystem has no locks (a warning says so);
        FileNotFoundError if ``directory`` vanished (the caller retries).
        """
        path = os.path.join(directory, LOCK_NAME)
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise _storage_error("create the lock file", path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise _locked_error(directory, holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (_errno.ENOLCK, _errno.EOPNOTSUPP, _errno.ENOSYS):
                    warnings.warn(f"{directory}: the filesystem does not support locks; "
                                  "nothing keeps two writers apart here", stacklevel=3)
                    return None
                raise _storage_error("lock", path, exc) from exc
            if _same_file(fd, path):  # else a finishing writer unlinked it: lock the new one
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(path, fd)
            os.close(fd)
        raise StorageError(f"cannot lock {path}: it keeps being replaced; is another writer "
                           "starting and stopping in a loop?")

    def release(self, cleanup: Callable[[], None] | None = None) -> None:
        """Remove the lock file, run ``cleanup`` (still locked), then unlock. Idempotent."""
        fd = self._fd
        if fd is None or os.getpid() != self._pid:
            return
        self._fd = None
        try:
            if _same_file(fd, self.path):
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            if cleanup is not None:
                cleanup()
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: forked children share the lock
            finally:
                os.close(fd)

    def _drop_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _locked_error(directory: str, pid: int | None) -> DatasetLockedError:
    if pid == os.getpid():
        return DatasetLockedError(f"{directory} is being written by another writer in this "
                                  f"process (pid {pid}); close or abort that writer first")
    who = "another writer" + (f" (pid {pid})" if pid else "")
    return DatasetLockedError(
        f"{directory} is being written by {who}; wait for it to finish (its lock, "
        f"{LOCK_NAME}, goes away when that process exits), or stop it and run again")


# ---------------------------------------------------------------- preparing the output
@dataclass
class PreparedOutput:
    """What :func:`prepare_output` found and holds; pass it to :func:`publish`."""

    output_dir: str  #: a local path or a URL
    prefix: str
    #: the dataset appended to (its shards are kept)
    base: Manifest | None = None
    #: the dataset overwritten
    replace: Manifest | None = None
    #: names inside ``output_dir`` that go once the new manifest is in (overwrite)
    old_files: list[str] = field(default_factory=list)
    storage_options: dict[str, Any] | None = None
    lock: DatasetLock | None = None
    #: directories :func:`prepare_output` created, deepest first
    created: list[str] = field(default_factory=list)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.output_dir)

    def release(self) -> None:
        """Unlock; remove the directories this writer created if they are empty
        (nothing was published). Call after removing the staging folders."""
        if self.lock is not None:
            self.lock.release(self._remove_created)
        else:
            self._remove_created()

    def _remove_created(self) -> None:
        created, self.created = self.created, []
        for d in created:  # rmdir: never a directory that holds anything
            try:
                os.rmdir(d)
            except OSError:
                break


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    out = []
    d = os.path.abspath(path)
    while not os.path.isdir(d) and not os.path.exists(d):
        out.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return out


def _lock_output(output_dir: str) -> tuple[DatasetLock | None, list[str]]:
    """Create ``output_dir`` if needed and lock it; returns (lock, directories created)."""
    created: list[str] = []
    for _ in range(5):
        created += [d for d in _missing_dirs(output_dir) if d not in created]
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as exc:
            raise _storage_error("create directory", output_dir, exc) from exc
        try:
            return DatasetLock.acquire(output_dir), created
        except FileNotFoundError:  # a failed writer just removed the directory it made
            continue
    raise StorageError(f"cannot lock {output_dir}: the directory keeps disappearing")


def _is_leftover(name: str) -> bool:
    """Hidden entries only a writer makes: staging folders, manifest temp files, the lock."""
    return name == LOCK_NAME or name.startswith(STAGING_PREFIX) or \
        (name.startswith("." + MANIFEST_NAME + ".") and name.endswith(".tmp"))


def _existing_entries(output_dir: str) -> list[str]:
    try:
        return sorted(os.listdir(output_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _storage_error("list", output_dir, exc) from exc


def _remove_leftovers(output_dir: str, entries: list[str]) -> None:
    """Staging folders and temp files of crashed writers (we hold the lock: nobody
    else is writing, so nobody else's)."""
    for e in entries:
        if e != LOCK_NAME and _is_leftover(e):
            path = os.path.join(output_dir, e)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _own_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"-\d+\.tar(" + re.escape(INDEX_SUFFIX) + r")?")


def _old_files(old: Manifest | None, entries: list[str], prefix: str) -> list[str]:
    """What an overwrite may delete: plain names the old manifest lists (only the
    indexes of foreign tars indexed in place: the tars are the user's) and stray
    files of this writer's pattern (leftovers of a crash during publishing)."""
    names: set[str] = set()
    keep: set[str] = set()
    for s in old.shards if old else []:
        if old.layout == "shardstream":
            names.update((s.name, s.index))
        else:
            names.add(s.index)
            keep.add(s.name)
    pat = _own_pattern(prefix)
    names.update(e for e in entries if pat.fullmatch(e))
    return sorted(n for n in names - keep if check_name(n) is None)


def prepare_output(output_dir: str, *, prefix: str, overwrite: bool, append: bool,
                   key_field: str, storage_options: dict[str, Any] | None = None,
                   compression: Compression | None = None) -> PreparedOutput:
    """Lock and check the output location (see the module docstring).

    The caller must :meth:`~PreparedOutput.release` the result in every path,
    after :func:`publish` or after giving up. Remote outputs are not locked.
    """
    if overwrite and append:
        raise ValueError("overwrite and append are mutually exclusive")
    if storage.is_remote(output_dir):
        target = PreparedOutput(output_dir, prefix, storage_options=storage_options)
        entries = storage.list_prefix(output_dir, storage_options=storage_options)
    else:
        output_dir = storage.local_path(output_dir)
        lock, created = _lock_output(output_dir)
        target = PreparedOutput(output_dir, prefix, lock=lock, created=created)
    try:
        if not target.remote:
            entries = _existing_entries(output_dir)
            _remove_leftovers(output_dir, entries)
            entries = [e for e in entries if not _is_leftover(e)]
        _check_existing(target, entries, overwrite=overwrite, append=append,
                        key_field=key_field, compression=compression)
    except BaseException:
        target.release()
        raise
    return target


def _check_existing(target: PreparedOutput, entries: list[str], *, overwrite: bool,
                    append: bool, key_field: str, compression: Compression | None) -> None:
    output_dir = target.output_dir
    has_manifest = MANIFEST_NAME in entries
    old = None
    if has_manifest and append:
        old = load_manifest(output_dir, target.storage_options)
    elif has_manifest and overwrite:
        try:
            old = load_manifest(output_dir, target.storage_options)
        except ManifestError as exc:  # replacing a damaged dataset is what overwrite is for
            warnings.warn(f"{exc}\n-- overwriting it; of its files only those named like "
                          f"this writer's shards ({target.prefix}-NNNNNN.tar[.idx]) are "
                          "removed", stacklevel=4)
    if append:
        if old is not None:
            _check_append(output_dir, old, key_field, compression)
        target.base = old
        return
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        what = "a dataset" if has_manifest else "files"
        raise DatasetExistsError(
            f"{output_dir} already holds {what} ({shown}); pass overwrite=True "
            "(--overwrite) to replace it or append=True (--append) to add shards")
    if overwrite:
        target.replace = old
        target.old_files = _old_files(old, entries, target.prefix)


def _check_append(output_dir: str, old: Manifest, key_field: str,
                  compression: Compression | None) -> None:
    if old.layout != "shardstream":
        raise ManifestError(f"{output_dir} indexes {old.layout}-layout tars in place; append "
                            "writes shardstream shards: write into another directory")
    if old.key_field != key_field:
        raise ManifestError(f"{output_dir} uses key field {old.key_field!r}, not "
                            f"{key_field!r}; append with the same key field")
    if old.compression is not None and not old.compression.framed:
        raise ManifestError(f"{output_dir} uses the format-v2 compressed layout (one zstd "
                            "frame per block), which this shardstream reads but does not "
                            "write; upgrade it first with `shardstream convert "
                            f"{output_dir} NEW --compress {old.compression.spec()}`, then "
                            "append to NEW")
    if old.compression != compression:
        def spec(c: Compression | None) -> str:
            if c is None:
                return "none"
            other = old.compression if c is compression else compression
            if other is not None and other.spec() == c.spec():  # differ in frames only
                return f"Compression({c.codec!r}, {c.level}, frame_bytes={c.frame_bytes}, " \
                       f"dict_bytes={c.dict_bytes})"
            return c.spec()
        raise ManifestError(f"{output_dir} is compressed with {spec(old.compression)}, "
                            f"this write with {spec(compression)}; append with "
                            f"--compress {spec(old.compression)} (compression="
                            f"{spec(old.compression)!r})")


def make_staging(output_dir: str) -> str:
    """A fresh staging directory: inside ``output_dir``, or a local temp dir for a URL."""
    if storage.is_remote(output_dir):
        try:
            return tempfile.mkdtemp(prefix="shardstream" + STAGING_PREFIX)
        except OSError as exc:
            raise _storage_error("create a staging directory for", output_dir, exc) from exc
    output_dir = storage.local_path(output_dir)
    try:
        return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir)
    except OSError as exc:
        raise _storage_error("create staging directory in", output_dir, exc) from exc


# ---------------------------------------------------------------- publishing
def publish(target: PreparedOutput, staged: list[tuple[str, ShardInfo]],
            schema: SchemaBuilder, *, key_field: str, block_bytes: int,
            compression: Compression | None = None) -> Manifest:
    """Move staged shards in under fresh names, switch the manifest, remove the old files.

    ``staged``: (staging folder, shard info) pairs in dataset order. A
    remote output gets uploads instead of renames (:func:`_publish_remote`).
    Until the manifest switch an error takes the moved files out again (the
    old dataset stays as it was); after it, the new dataset stands.
    """
    if target.remote:
        return _publish_remote(target, staged, schema, key_field=key_field,
                               block_bytes=block_bytes, compression=compression)
    output_dir = target.output_dir
    _step("staged")
    moves, final = _plan_names(staged, target, set(_existing_entries(output_dir)))
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    manifest, data = _encode(_new_manifest(target.base, final, schema, key_field, block_bytes,
                                           compression), manifest_path)
    moved: list[str] = []
    try:
        for src, dst in moves:
            try:
                os.replace(src, os.path.join(output_dir, dst))
            except OSError as exc:
                raise _storage_error("move into place", os.path.join(output_dir, dst),
                                     exc) from exc
            moved.append(dst)
            if len(moved) == 1:
                _step("moving")
        fsync_dir(output_dir)
        _step("moved")
        try:
            atomic_write(manifest_path, data)
        except OSError as exc:
            raise _storage_error("write", manifest_path, exc) from exc
    except BaseException:
        if _read_local(manifest_path) != data:  # not switched: nothing lists them
            for dst in moved:
                try:
                    os.unlink(os.path.join(output_dir, dst))
                except OSError:
                    pass
        raise
    _step("manifest")
    new = {n for s in final for n in (s.name, s.index)}
    for name in target.old_files:
        if name not in new:
            _remove(os.path.join(output_dir, name))
    fsync_dir(output_dir)
    _step("removed-old")
    return manifest


def _encode(manifest: Manifest, where: str) -> tuple[Manifest, bytes]:
    """The manifest's bytes and the manifest as readers will load them (equal to what is
    published, version included); a writer never publishes what readers would refuse."""
    data = manifest.to_json().encode()
    return Manifest.from_json(data, where=where), data


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _plan_names(staged: list[tuple[str, ShardInfo]], target: PreparedOutput, existing: set[str]
                ) -> tuple[list[tuple[str, str]], list[ShardInfo]]:
    """Final names: (staged file, final name) pairs and the new shards' infos.

    A name is never one that ``existing`` holds or an old manifest lists, so
    nothing is replaced in place: appends number on after the last shard,
    overwrites from 0 up, skipping the old dataset's names.
    """
    base, prefix = target.base, target.prefix
    taken = set(existing) | set(target.old_files)
    for m in (base, target.replace):
        taken.update(n for s in (m.shards if m else []) for n in (s.name, s.index))
    number = _next_number(list(base.shards) if base else [], prefix)
    moves: list[tuple[str, str]] = []
    final: list[ShardInfo] = []
    for staging_dir, info in staged:
        while f"{prefix}-{number:06d}.tar" in taken or \
                f"{prefix}-{number:06d}.tar{INDEX_SUFFIX}" in taken:
            number += 1
        name = f"{prefix}-{number:06d}.tar"
        number += 1
        moves += [(os.path.join(staging_dir, info.name), name),
                  (os.path.join(staging_dir, info.index), name + INDEX_SUFFIX)]
        final.append(ShardInfo(**{**info.__dict__, "name": name, "index": name + INDEX_SUFFIX}))
    return moves, final


def _new_manifest(base: Manifest | None, final: list[ShardInfo], schema: SchemaBuilder,
                  key_field: str, block_bytes: int,
                  compression: Compression | None = None) -> Manifest:
    merged = SchemaBuilder()
    if base:
        merged.merge(_schema_sets(base.schema))
    merged.merge(schema)
    kept = list(base.shards) if base else []
    return Manifest(shards=kept + final, schema=merged.to_dict(), key_field=key_field,
                    block_bytes=block_bytes, created_by=f"shardstream {__version__}",
                    compression=compression)


def _publish_remote(target: PreparedOutput, staged: list[tuple[str, ShardInfo]],
                    schema: SchemaBuilder, *, key_field: str, block_bytes: int,
                    compression: Compression | None = None) -> Manifest:
    """Upload shards and indexes (``UPLOAD_THREADS`` at a time) under fresh names,
    PUT the manifest (one atomic step), then delete the old objects.

    On failure before the manifest PUT, the objects this call uploaded are
    deleted (best effort; orphans are harmless: nothing lists them). No lock:
    keep writers of one prefix apart yourself.
    """
    url, opts = target.output_dir, {"storage_options": target.storage_options}
    manifest_url = storage.join(url, MANIFEST_NAME)
    _step("staged")
    existing = set(storage.list_prefix(url, **opts))
    moves, final = _plan_names(staged, target, existing)
    manifest, data = _encode(_new_manifest(target.base, final, schema, key_field, block_bytes,
                                           compression), manifest_url)
    pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="shardstream-upload")
    try:
        futures = [pool.submit(storage.put_file, src, storage.join(url, dst), **opts)
                   for src, dst in moves]
        for k, f in enumerate(as_completed(futures)):
            f.result()
            if k == 0:
                _step("moving")
        pool.shutdown()
        _step("moved")
        storage.put_bytes(data, manifest_url, **opts)
    except BaseException:
        pool.shutdown(cancel_futures=True)
        if not _remote_manifest_is(manifest_url, data, target.storage_options):
            for _, dst in moves:  # orphans: nothing lists them
                try:
                    storage.remove(storage.join(url, dst), storage_options=target.storage_options,
                                   retry=storage.RetryPolicy(attempts=2))
                except Exception:  # noqa: BLE001 - best effort, the first error matters
                    pass
        raise
    _step("manifest")
    new = {dst for _, dst in moves}
    for name in target.old_files:
        if name not in new:
            storage.remove(storage.join(url, name), **opts)
    _step("removed-old")
    return manifest


def _remote_manifest_is(url: str, data: bytes, storage_options: dict[str, Any] | None) -> bool:
    """Whether ``url`` holds ``data``; True when that cannot be told (then keep the objects)."""
    try:
        return storage.read_bytes(url, storage_options=storage_options,
                                  retry=storage.RetryPolicy(attempts=2)) == data
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - unknown: orphans are safer than a broken dataset
        return True


def _schema_sets(schema: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for path, f in schema.items():
        g = {"count": f["count"], "types": set(f["types"])}
        if "dtypes" in f:
            g["dtypes"], g["shape"] = set(f["dtypes"]), f["shape"]
        out[path] = g
    return out


def _next_number(shards: list[ShardInfo], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"-(\d+)\.tar$")
    nums = [int(m.group(1)) for s in shards if (m := pat.match(s.name))]
    return max(nums) + 1 if nums else 0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _storage_error("remove", path, exc) from exc
