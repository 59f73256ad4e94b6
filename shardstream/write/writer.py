"""ShardWriter: samples -> blocks -> tar shards + indexes, staged, then published.

:class:`ShardSink` packs samples into blocks and shards inside one directory;
:class:`ShardWriter` adds the dataset around it (:mod:`shardstream.write.publish`).

The writer locks the output directory while it lives (``.shardstream.lock``;
a second writer gets :class:`~shardstream.errors.DatasetLockedError`). Shards
are written into a hidden staging folder inside the output directory and only
moved in when the writer closes cleanly, under names no file there uses
(``<prefix>-NNNNNN.tar``; an overwrite skips the old dataset's numbers); one
``os.replace`` of ``manifest.json`` then switches readers to the new dataset,
and only after it are the old files removed. A crash, an exception or Ctrl-C
therefore leaves the old dataset whole or the new one whole, never a mix (see
:mod:`shardstream.write.publish`). A failed write removes the output directory
again if it made it and nothing was published.

Remote outputs (``s3://bucket/prefix``, ``gs://``... see :mod:`.storage`) are
staged in a local temporary directory; each shard and index is uploaded
whole, and the manifest last (see :func:`publish`).
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from shardstream.format.compression import Compression, parse_compression
from shardstream.format.manifest import Manifest
from shardstream.write.arrow_encode import EncodedRows
from shardstream.write.output import make_staging, prepare_output
from shardstream.write.publish import publish
from shardstream.write.sink import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_BYTES, ShardSink

__all__ = ["ShardWriter"]


class ShardWriter:
    """Write sample dicts into a shardstream dataset directory.

    >>> with ShardWriter("out", max_bytes=64 << 20) as w:   # doctest: +SKIP
    ...     for sample in samples:
    ...         w.write(sample)

    Shards roll at ``max_bytes`` real bytes on disk (tar headers and padding
    counted) or ``max_samples`` samples, whichever comes first. Small samples
    are packed into blocks of about ``block_bytes``; a larger sample is a
    block of its own. An existing dataset is refused unless ``overwrite=True``
    (replaced in one atomic step when this writer succeeds; only files the old
    manifest lists or named like this writer's shards are removed) or
    ``append=True``. The output directory is locked from here until
    :meth:`close` or :meth:`abort`; use the writer as a context manager.

    ``output_dir`` may be a URL (``s3://bucket/prefix``, ``gs://...``, any
    fsspec URL); ``storage_options`` go to the filesystem (``endpoint_url``,
    ``key``, ``secret``...). Shards are staged locally and uploaded on close;
    remote outputs are not locked, so keep writers of one prefix apart yourself.

    ``compression="zstd"`` (``level=3`` by default, or ``"zstd:19"``) stores
    every block (``NNNNNN.ssb.zst``) as zstd frames of about 256 bytes of samples
    with a dictionary trained on the first samples; readers decompress
    transparently and ``ds[i]`` decompresses one frame (docs/compression.md).
    """

    def __init__(self, output_dir: str | os.PathLike, *, prefix: str = "shard",
                 max_samples: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, key_field: str = "__key__",
                 overwrite: bool = False, append: bool = False, fsync: bool = True,
                 storage_options: dict[str, Any] | None = None,
                 compression: Compression | str | None = None, level: int | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*", prefix):
            raise ValueError(f"prefix {prefix!r} must be letters, digits, '_', '.' or '-'")
        self.output_dir = os.fspath(output_dir)
        self.prefix = prefix
        self.key_field = key_field
        self.block_bytes = block_bytes
        self.storage_options = storage_options
        self.compression = parse_compression(compression, level)
        self._target = prepare_output(self.output_dir, prefix=prefix, overwrite=overwrite,
                                      append=append, key_field=key_field,
                                      storage_options=storage_options,
                                      compression=self.compression)  # locked from here
        self._base, self._replace = self._target.base, self._target.replace
        self._staging = ""
        try:
            self._staging = make_staging(self.output_dir)
            first = self._base.num_samples if self._base else 0
            self._sink = ShardSink(self._staging, max_samples=max_samples, max_bytes=max_bytes,
                                   block_bytes=block_bytes, key_field=key_field,
                                   first_ordinal=first, fsync=fsync,
                                   compression=self.compression)
        except BaseException:
            self._drop_staging()
            raise
        self.manifest: Manifest | None = None
        self._closed = False

    @property
    def num_samples(self) -> int:
        """Samples written by this writer so far."""
        return self._sink.num_samples

    @property
    def bytes_written(self) -> int:
        """Bytes of finished shards and indexes so far."""
        return self._sink.bytes_written

    @property
    def first_ordinal(self) -> int:
        """Dataset-global ordinal of this writer's first sample (non-zero when appending)."""
        return self._base.num_samples if self._base else 0

    def write(self, sample: dict[str, Any]) -> None:
        """Encode and add one sample; raises :class:`EncodeError` naming the field."""
        if self._closed:
            raise ValueError("write() on a closed ShardWriter")
        self._sink.write(sample)

    @property
    def packs(self) -> bool:
        """Whether :meth:`write_encoded` wants samples encoded with ``pack=True``."""
        return self._sink.packs

    def write_encoded(self, samples: list[bytes], schema: dict[str, Any],
                      packed: bool = False) -> None:
        """Add samples encoded elsewhere (by :func:`encode_sample`) with their schema.

        ``packed``: they were encoded with ``pack=True`` (pass :attr:`packs`
        to the encoder to avoid re-encoding).
        """
        if self._closed:
            raise ValueError("write_encoded() on a closed ShardWriter")
        for data in samples:
            self._sink.write_encoded(data, packed)
        self._sink.schema.merge(schema)

    def write_rows(self, rows: EncodedRows) -> None:
        """Add a batch encoded by :func:`~shardstream.write.arrow_encode.encode_batch`
        (samples back to back), blocks cut without a Python step per sample."""
        if self._closed:
            raise ValueError("write_rows() on a closed ShardWriter")
        self._sink.write_rows(rows)

    def close(self) -> Manifest:
        """Finish the last shard, publish the shards, write ``manifest.json``."""
        if self._closed:
            if self.manifest is None:
                raise ValueError("this ShardWriter was aborted")
            return self.manifest
        try:
            infos = self._sink.finish()
            self.manifest = publish(self._target, [(self._staging, i) for i in infos],
                                    self._sink.schema, key_field=self.key_field,
                                    block_bytes=self.block_bytes,
                                    compression=self.compression)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._drop_staging()
        return self.manifest

    def abort(self) -> None:
        """Drop everything this writer wrote; an existing dataset stays as it was.

        Also releases the output's lock, and removes the output directory if this
        writer created it and it is empty again."""
        self._closed = True
        self._sink.close_files()
        self._drop_staging()

    def _drop_staging(self) -> None:
        """Remove the staging folder, then release the lock (see :class:`PreparedOutput`)."""
        try:
            if self._staging:
                shutil.rmtree(self._staging, ignore_errors=True)
        finally:
            self._target.release()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
