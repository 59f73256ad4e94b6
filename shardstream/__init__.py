"""shardstream: pack lists of dicts into tar shards and stream them into PyTorch.

The public API is what ``__all__`` lists; everything else is internal. The
packing half (codec, writer, manifest, verify) imports without torch, so the
CLI starts fast; the reading half (torch datasets, loader, prefetcher) is
imported on first use.
"""

import importlib as _importlib

__version__ = "0.3.0"

from .convert import convert
from .codec import decode_sample, encode_sample, iter_samples, unpack_blocks
from .errors import (CorruptShardError, DatasetExistsError, DatasetLockedError, DecodeError,
                     EncodeError, IndexMismatchError, InputError, ManifestError,
                     ShardNotFoundError, ShardstreamError, StorageError, UsageError)
from .manifest import Manifest, ShardInfo, load_manifest
from .parallel import write_shards
from .verify import verify
from .wdsindex import build_index
from .writer import ShardWriter

#: names that need torch, and the module each lives in
_LAZY = {
    "ShardStream": "stream", "ShardDataset": "random_access", "loader": "dataloader",
    "ShardLoader": "dataloader", "Collate": "collation", "collate": "collation",
    "World": "world", "get_world": "world", "Mixture": "mixture", "Source": "mixture", "CUDAPrefetcher": "prefetch",
    "PrefetchStats": "prefetch", "to_device": "prefetch",
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
