"""Every error shardstream raises, in one place.

Each class mixes in the builtin it means, so ``except ValueError`` or
``except FileNotFoundError`` in user code keeps working::

    ShardstreamError
    ├── EncodeError(ValueError)          a sample cannot be encoded (names sample + field path)
    ├── DecodeError(ValueError)          bytes are not a valid shardstream sample
    ├── InputError(ValueError)           an input file is malformed (names file + line/row)
    ├── DatasetExistsError(FileExistsError)  output already holds a dataset
    ├── ManifestError(ValueError)        manifest.json missing fields / wrong version
    ├── ShardNotFoundError(FileNotFoundError)  a shard listed in the manifest is missing
    ├── CorruptShardError(ValueError)    shard / index damaged or out of sync
    │   └── IndexMismatchError           index does not describe its shard
    └── StorageError(OSError)            disk, permission or network failure

Third-party errors are translated at the boundary (``raise X(...) from exc``).
"""

from __future__ import annotations

__all__ = [
    "ShardstreamError",
    "EncodeError",
    "DecodeError",
    "InputError",
    "DatasetExistsError",
    "ManifestError",
    "ShardNotFoundError",
    "CorruptShardError",
    "IndexMismatchError",
    "StorageError",
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


class ManifestError(ShardstreamError, ValueError):
    """``manifest.json`` is missing, unreadable or of an unsupported version."""


class ShardNotFoundError(ShardstreamError, FileNotFoundError):
    """A shard (or its index) listed in the manifest does not exist."""


class CorruptShardError(ShardstreamError, ValueError):
    """A shard, block or index is damaged: truncated, wrong checksum, bad bytes."""


class IndexMismatchError(CorruptShardError):
    """An index does not describe its shard (size or checksum differ)."""


class StorageError(ShardstreamError, OSError):
    """Reading or writing storage failed (disk full, permission denied, network)."""
