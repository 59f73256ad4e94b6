"""Preparing an output: lock it, check what is there (``--overwrite``/``--append``)
and clean up leftovers of crashed writers; the staging directory.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

from shardstream.errors import DatasetExistsError, ManifestError, StorageError
from shardstream.format.compression import Compression
from shardstream.format.index import INDEX_SUFFIX
from shardstream.format.manifest import (LOCK_NAME, MANIFEST_NAME, STAGING_PREFIX, Manifest,
                                         check_name)
from shardstream.storage import io, urls
from shardstream.storage.io import load_manifest
from shardstream.write.lock import DatasetLock, storage_error

__all__ = ["PreparedOutput", "prepare_output", "make_staging", "existing_entries"]


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
        return urls.is_remote(self.output_dir)

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
            raise storage_error("create directory", output_dir, exc) from exc
        try:
            return DatasetLock.acquire(output_dir), created
        except FileNotFoundError:  # a failed writer just removed the directory it made
            continue
    raise StorageError(f"cannot lock {output_dir}: the directory keeps disappearing")


def _is_leftover(name: str) -> bool:
    """Hidden entries only a writer makes: staging folders, manifest temp files, the lock."""
    return name == LOCK_NAME or name.startswith(STAGING_PREFIX) or \
        (name.startswith("." + MANIFEST_NAME + ".") and name.endswith(".tmp"))


def existing_entries(output_dir: str) -> list[str]:
    try:
        return sorted(os.listdir(output_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise storage_error("list", output_dir, exc) from exc


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
    if urls.is_remote(output_dir):
        target = PreparedOutput(output_dir, prefix, storage_options=storage_options)
        entries = io.list_prefix(output_dir, storage_options=storage_options)
    else:
        output_dir = urls.local_path(output_dir)
        lock, created = _lock_output(output_dir)
        target = PreparedOutput(output_dir, prefix, lock=lock, created=created)
    try:
        if not target.remote:
            entries = existing_entries(output_dir)
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
    if urls.is_remote(output_dir):
        try:
            return tempfile.mkdtemp(prefix="shardstream" + STAGING_PREFIX)
        except OSError as exc:
            raise storage_error("create a staging directory for", output_dir, exc) from exc
    output_dir = urls.local_path(output_dir)
    try:
        return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir)
    except OSError as exc:
        raise storage_error("create staging directory in", output_dir, exc) from exc
