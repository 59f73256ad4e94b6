"""Every error shardstream raises, in one place.

Each class mixes in the builtin it means, so ``except ValueError`` or
``except FileNotFoundError`` in user code keeps working::

    ShardstreamError
    ├── EncodeError(ValueError)          a sample cannot be encoded (names sample + field path)
    ├── DecodeError(ValueError)          bytes are not a valid shardstream sample
    ├── InputError(ValueError)           an input file is malformed (names file + line/row)
    ├── DatasetExistsError(FileExistsError)  output already holds a dataset
    ├── DatasetLockedError(BlockingIOError)  another writer is writing the output
    ├── ManifestError(ValueError)        manifest.json missing fields / wrong version
    ├── ShardNotFoundError(FileNotFoundError)  a shard listed in the manifest is missing
    ├── CorruptShardError(ValueError)    shard / index damaged or out of sync
    │   └── IndexMismatchError           index does not describe its shard
    ├── StorageError(OSError)            disk, permission or network failure
    └── UsageError(RuntimeError)         a framework would lose or repeat data (accelerate re-split)

Third-party errors are translated at the boundary (``raise X(...) from exc``).
"""

from __future__ import annotations

__all__ = [
    "ShardstreamError",
    "EncodeError",
    "DecodeError",
    "InputError",
    "DatasetExistsError",
    "DatasetLockedError",
    "ManifestError",
    "ShardNotFoundError",
    "CorruptShardError",
    "IndexMismatchError",
    "StorageError",
    "UsageError",
]


class ShardstreamError(Exception):
    """Base class of every error raised by shardstream."""


class EncodeError(ShardstreamError, ValueError):
    """A sample holds a value the format cannot represent.

    ``sample`` is the sample's key or ordinal, ``path`` the dotted field path
    (``meta.tags[2]``) of the offending value.
    """

    def __init__(self, message: str, *, sample: object = None, path: str | None = None):
        super().__init__(message)
        self.sample = sample
        self.path = path


class DecodeError(ShardstreamError, ValueError):
    """Bytes that should hold a sample could not be decoded."""


class InputError(ShardstreamError, ValueError):
    """An input file given to the writer is malformed."""


class DatasetExistsError(ShardstreamError, FileExistsError):
    """The output location already holds a dataset (use overwrite or append)."""


class DatasetLockedError(ShardstreamError, BlockingIOError):
    """Another writer holds the output directory's lock (``.shardstream.lock``)."""


class ManifestError(ShardstreamError, ValueError):
    """``manifest.json`` is missing, unreadable or of an unsupported version."""


class ShardNotFoundError(ShardstreamError, FileNotFoundError):
    """A shard (or its index) listed in the manifest does not exist."""


class CorruptShardError(ShardstreamError, ValueError):
    """A shard, block or index is damaged: truncated, wrong checksum, bad bytes."""


class IndexMismatchError(CorruptShardError):
    """An index does not describe its shard (size or checksum differ)."""


class StorageError(ShardstreamError, OSError):
    """Reading or writing storage failed (disk full, permission denied, network).

    ``StorageError("cannot write X: No space left on device", errno=28)``: the
    message prints as given, ``.errno`` carries the OS error number (or None).
    A failed storage call also says what it was: ``url`` (the object), ``kind``
    (``"auth"``, ``"transient"``, ``"fatal"``: see :func:`shardstream.storage.retry.classify`),
    ``tries`` (attempts made); an answer from an HTTP server gives its ``status``
    and the server's error ``code`` (S3's ``<Code>``, e.g. ``"SlowDown"``).
    """

    url: str | None = None
    kind: str | None = None
    tries: int | None = None
    status: int | None = None
    code: str | None = None

    def __init__(self, message: str = "", *args: object, errno: int | None = None,
                 url: str | None = None, kind: str | None = None, tries: int | None = None,
                 status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, *args)
        self.errno = errno
        self.url, self.kind, self.tries = url, kind, tries
        self.status, self.code = status, code

    def __reduce__(self) -> tuple:  # keep errno (and the fields) across pickling (workers)
        return _rebuild_storage_error, (type(self), self.args, self.errno), self.__dict__


def _rebuild_storage_error(cls: type, args: tuple, errno: int | None) -> "StorageError":
    return cls(*args, errno=errno)  # the other fields come back with __dict__


class UsageError(ShardstreamError, RuntimeError):
    """A framework drives the stream in a way that would silently lose or repeat data
    (e.g. accelerate re-splitting a DataLoader around a ShardStream)."""
