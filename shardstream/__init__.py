"""shardstream: pack lists of dicts into tar shards and stream them into PyTorch.

The public API is what ``__all__`` lists; everything else is internal. The
packing half (codec, writer, manifest, verify) imports without torch, so the
CLI starts fast; the reading half (torch datasets, loader, prefetcher) is
imported on first use.
"""

import importlib as _importlib

__version__ = "0.4.0"

from .errors import (CorruptShardError, DatasetExistsError, DatasetLockedError, DecodeError,
                     EncodeError, IndexMismatchError, InputError, ManifestError, ShardNotFoundError,
                     ShardstreamError, StorageError, UsageError)
from .format.codec import decode_sample, iter_samples, unpack_blocks
from .format.encode import encode_sample
from .format.manifest import Manifest, ShardInfo
from .read.dataset import load_manifest
from .read.verify import verify
from .write.convert import convert
from .write.parallel import write_shards
from .write.reindex import build_index
from .write.writer import ShardWriter

#: names that need torch, and the module each lives in
_LAZY = {
    "ShardStream": "pytorch.stream", "ShardDataset": "pytorch.random_access",
    "loader": "pytorch.loader", "ShardLoader": "pytorch.loader",
    "Collate": "pytorch.collation", "collate": "pytorch.collation",
    "World": "read.world", "get_world": "read.world", "Mixture": "read.mixture",
    "Source": "read.mixture", "CUDAPrefetcher": "pytorch.prefetch",
    "PrefetchStats": "pytorch.prefetch", "to_device": "pytorch.prefetch",
}

__all__ = [
    "__version__",
    # codec
    "encode_sample", "decode_sample", "iter_samples", "unpack_blocks",
    # writing
    "ShardWriter", "write_shards",
    # datasets
    "Manifest", "ShardInfo", "load_manifest", "verify", "build_index", "convert",
    # reading
    "ShardStream", "ShardDataset", "loader", "ShardLoader", "Collate", "collate", "World",
    "get_world", "Mixture", "Source",
    # GPU
    "CUDAPrefetcher", "PrefetchStats", "to_device",
    # errors
    "ShardstreamError", "EncodeError", "DecodeError", "InputError", "DatasetExistsError",
    "DatasetLockedError", "ManifestError", "ShardNotFoundError", "CorruptShardError",
    "IndexMismatchError", "StorageError", "UsageError",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shardstream' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
