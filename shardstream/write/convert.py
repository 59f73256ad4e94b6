"""``shardstream convert``: rewrite a dataset with (or without) compression.

Also upgrades format-v2 compressed datasets (one frame per block) to v3.

Samples are copied as encoded bytes, in order, so keys, values and the schema
carry over exactly; only samples with integer arrays are re-encoded when they
move into or out of compressed frames (narrowed there, see
:func:`~shardstream.format.encode.repack`). Blocks are re-packed with
the source's ``block_bytes`` on their uncompressed sizes, so converting back
with ``compression=None`` and the same ``max_bytes`` reproduces the original
uncompressed shards byte for byte.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from shardstream.errors import CorruptShardError
from shardstream.format.compression import Compression, parse_compression
from shardstream.format.manifest import Manifest
from shardstream.read.dataset import load_index, open_dataset, read_block
from shardstream.storage.files import sha256_file
from shardstream.write.sink import DEFAULT_MAX_BYTES
from shardstream.write.writer import ShardWriter

__all__ = ["convert"]


def convert(source: str | os.PathLike, output: str | os.PathLike, *,
            compression: Compression | str | None, level: int | None = None,
            max_bytes: int = DEFAULT_MAX_BYTES, block_bytes: int | None = None,
            overwrite: bool = False, fsync: bool = True,
            storage_options: dict[str, Any] | None = None,
            progress: Callable[[int], None] | None = None) -> Manifest:
    """Copy the local dataset ``source`` into ``output`` with ``compression`` (``"zstd"``,
    ``"zstd:19"``, or ``None``/``"none"`` to store blocks raw); returns the new manifest.

    ``output`` may be a URL; ``block_bytes`` defaults to the source's. ``overwrite``
    replaces ``output`` in one atomic step, like :class:`ShardWriter` does.
    ``progress(samples)`` is called after every block.
    """
    comp = parse_compression(compression, level)
    ds = open_dataset(source)
    m = ds.manifest
    if m.layout != "shardstream":
        raise ValueError(f"{ds.root} holds {m.layout}-layout tars indexed in place; convert "
                         "reads shardstream datasets: write the samples with ShardWriter "
                         "(shardstream-write) instead")
    out = os.fspath(output)
    if "://" not in out and os.path.abspath(out) == os.path.abspath(ds.root):
        raise ValueError(f"convert {ds.root} into another directory, not into itself")
    with ShardWriter(out, key_field=m.key_field, block_bytes=block_bytes or m.block_bytes,
                     max_bytes=max_bytes, overwrite=overwrite, fsync=fsync,
                     storage_options=storage_options, compression=comp) as w:
        for info in m.shards:
            index = load_index(ds, info)
            path = ds.shard_path(info)
            if sha256_file(path) != info.sha256:  # bytes are copied, not decoded: check them
                raise CorruptShardError(f"shard {path}: sha256 differs from the manifest; run "
                                        "`shardstream verify` and restore the shard first")
            with open(path, "rb") as f:
                for b in range(index.num_blocks):
                    data = read_block(f, index, b, where=path)
                    first, stop = index.block_samples(b)
                    cuts = [int(x) for x in index.sample_offset[first:stop]] + [len(data)]
                    w.write_encoded([data[a:z] for a, z in zip(cuts, cuts[1:])], {},
                                    packed=index.framed)
                    if progress:
                        progress(stop - first)
        w.write_encoded([], m.schema)
    return w.close()
