"""shardstream: pack lists of dicts into tar shards and stream them into PyTorch.

The public API is what ``__all__`` lists; everything else is internal.
"""

__version__ = "0.1.0"

from .collation import Collate, collate
from .codec import decode_sample, encode_sample, iter_samples, unpack_blocks
from .errors import (CorruptShardError, DatasetExistsError, DecodeError, EncodeError,
                     IndexMismatchError, InputError, ManifestError, ShardNotFoundError,
                     ShardstreamError, StorageError)
from .manifest import Manifest, ShardInfo, load_manifest
from .parallel import write_shards
from .prefetch import CUDAPrefetcher, PrefetchStats, to_device
from .dataloader import ShardLoader, loader
from .random_access import ShardDataset
from .stream import ShardStream
from .world import World, get_world
from .wdsindex import build_index
from .verify import verify
from .writer import ShardWriter

__all__ = [
    "__version__",
    # codec
    "encode_sample", "decode_sample", "iter_samples", "unpack_blocks",
    # writing
    "ShardWriter", "write_shards",
    # datasets
    "Manifest", "ShardInfo", "load_manifest", "verify", "build_index",
    # reading
    "ShardStream", "ShardDataset", "loader", "ShardLoader", "Collate", "collate", "World",
    "get_world",
    # GPU
    "CUDAPrefetcher", "PrefetchStats", "to_device",
    # errors
    "ShardstreamError", "EncodeError", "DecodeError", "InputError", "DatasetExistsError",
    "ManifestError", "ShardNotFoundError", "CorruptShardError", "IndexMismatchError",
    "StorageError",
]
