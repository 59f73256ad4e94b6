"""Reading zstd data: bounded decompression of blocks and frames.

Every frame must declare its size, and the size must match what the index says,
before anything is decompressed (see :mod:`shardstream.format.limits`).
:class:`BlockDecoder` reads per-block compressed shards (format v2),
:class:`FrameDecoder` framed ones (v3+), :func:`split_frames` a shard without index.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from shardstream.errors import CorruptShardError
from shardstream.format import limits
from shardstream.format.limits import MAX_ZSTD_RATIO

__all__ = ["CODECS", "FrameDecoder", "split_frames", "BlockDecoder", "decompress_block",
           "declared_size", "load_dictionary", "zstandard"]


#: codec name -> member name suffix (``000000.ssb.zst``)
CODECS: dict[str, str] = {"zstd": ".zst"}


_local = threading.local()
_get_ident = threading.get_ident


def zstandard() -> Any:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency
        raise ImportError("compressed shardstream datasets need the zstandard package: "
                          "pip install zstandard") from None
    return zstandard


def _decompressor() -> Any:
    d = getattr(_local, "d", None)
    if d is None:  # not thread safe: one per thread
        d = _local.d = zstandard().ZstdDecompressor()
    return d


def checked_decompress(decompress: Callable[[Any], bytes], data: bytes | memoryview,
                       expected: int, where: Callable[[], str]) -> bytes:
    """``decompress(data)`` of one zstd frame that must hold ``expected`` bytes.

    The declared content size is checked before decompressing (never allocate a
    lie: it must equal ``expected`` and fit :data:`MAX_ZSTD_RATIO`), the frame's
    checksum while decompressing, the length after; every failure is a
    :class:`CorruptShardError` starting with ``where()``.
    """
    zstd = zstandard()
    try:
        declared = zstd.frame_content_size(data)
    except zstd.ZstdError as exc:
        raise _not_a_frame(where(), exc) from exc
    if declared != expected:
        raise _size_mismatch(where(), declared, expected)
    if expected > len(data) * MAX_ZSTD_RATIO:
        raise _too_big(where(), expected, len(data))
    try:
        out = decompress(data)
    except zstd.ZstdError as exc:
        raise CorruptShardError(f"{where()} cannot be decompressed (zstd: {exc}); the shard "
                                "is damaged: restore it or rewrite the dataset") from exc
    if len(out) != expected:
        raise CorruptShardError(f"{where()}: decompressed to {len(out)} bytes, the index says "
                                f"{expected}; restore the shard or rewrite the dataset")
    return out


def _not_a_frame(where: str, exc: Exception) -> CorruptShardError:
    return CorruptShardError(f"{where} is not a zstd frame (zstd: {exc}); the shard is "
                             "damaged: restore it or rewrite the dataset")


def _size_mismatch(where: str, declared: int, expected: int) -> CorruptShardError:
    if declared < 0:
        return CorruptShardError(f"{where}: the zstd frame does not declare its size (the "
                                 f"index says {expected} bytes; shardstream always writes it): "
                                 "the shard is damaged: restore it or rewrite the dataset")
    return CorruptShardError(f"{where}: the zstd frame declares {declared} bytes, the index "
                             f"{expected}; the shard is damaged: restore it or rewrite the "
                             "dataset")


def _too_big(where: str, raw: int, stored: int) -> CorruptShardError:
    return CorruptShardError(f"{where}: {raw} uncompressed bytes declared for {stored} stored "
                             f"bytes, more than zstd can expand (x{MAX_ZSTD_RATIO}); the shard "
                             "or its index is damaged: restore it or rebuild the index with "
                             "`shardstream index`")


def _over_limit(where: str, raw: int) -> CorruptShardError:
    limit = limits.MAX_BLOCK_RAW_BYTES
    return CorruptShardError(f"{where}: {raw} uncompressed bytes declared, more than the "
                             f"{limit} one block may hold (shardstream.index."
                             "MAX_BLOCK_RAW_BYTES); the shard is damaged or was not written "
                             "by shardstream: restore it or rewrite the dataset")


def declared_size(data: bytes | memoryview, *, where: str) -> int:
    """The content size the zstd frame at the start of ``data`` declares, checked:
    present (shardstream always writes it), within :data:`MAX_ZSTD_RATIO` of ``data``
    and :data:`~shardstream.format.limits.MAX_BLOCK_RAW_BYTES`. For reading without an index."""
    zstd = zstandard()
    try:
        n = zstd.frame_content_size(data)
    except zstd.ZstdError as exc:
        raise _not_a_frame(where, exc) from exc
    if n < 0:
        raise CorruptShardError(f"{where}: the zstd frame does not declare its size; not "
                                "written by shardstream (or damaged): restore it or rewrite "
                                "the dataset")
    if n > limits.MAX_BLOCK_RAW_BYTES:
        raise _over_limit(where, n)
    if n > len(data) * MAX_ZSTD_RATIO:
        raise _too_big(where, n, len(data))
    return n


def load_dictionary(data: bytes, *, where: str) -> Any:
    """A zstd dictionary (``ZstdCompressionDict``) from its bytes, checked; None for ``b""``.

    A damaged dictionary (bad magic, bad tables) is a :class:`CorruptShardError`
    starting with ``where``, raised here rather than by the first decompression.
    """
    if not data:
        return None
    zstd = zstandard()
    try:
        d = zstd.ZstdCompressionDict(bytes(data), dict_type=zstd.DICT_TYPE_FULLDICT)
        zstd.ZstdDecompressor(dict_data=d)  # builds (and caches) the decoding tables
    except zstd.ZstdError as exc:
        raise CorruptShardError(f"{where}: the zstd dictionary ({len(data)} bytes) is damaged "
                                f"(zstd: {exc}); restore the shard, rebuild its index with "
                                "`shardstream index`, or rewrite the dataset") from exc
    return d


def decompress_block(codec: str, data: bytes | memoryview, raw_size: int, *,
                     where: str) -> bytes:
    """The uncompressed bytes of one format-v2 block (one frame), checked.

    ``where`` names the block in errors (``"shard x.tar: block 3 (samples ...)"``).
    """
    if codec not in CODECS:
        raise CorruptShardError(f"{where}: compression {codec!r} is not supported by this "
                                "shardstream; upgrade shardstream")
    if raw_size > limits.MAX_BLOCK_RAW_BYTES:
        raise _over_limit(where, raw_size)
    return checked_decompress(lambda d: _decompressor().decompress(d, allow_extra_data=False),
                              data, raw_size, lambda: where)


class BlockDecoder:
    """Decompresses the blocks of one shard, given its index's codec and raw sizes."""

    __slots__ = ("codec", "raw_size", "path")

    def __init__(self, codec: str, raw_size: Any, path: str) -> None:
        self.codec, self.path = codec, path
        self.raw_size = [int(x) for x in raw_size]

    def decode(self, block: int, data: bytes | memoryview, label: str = "") -> bytes:
        """Block ``block``'s uncompressed bytes; ``label`` names its first sample in errors."""
        where = f"shard {self.path}: block {block}" + (f" (starting at {label})" if label else "")
        return decompress_block(self.codec, data, self.raw_size[block], where=where)


def split_frames(data: bytes | memoryview, dictionary: bytes, *, where: str
                 ) -> list[tuple[int, bytes]]:
    """(offset, decompressed bytes) of every zstd frame in a stored block, in order.

    For rebuilding an index from a shard alone; ``where`` names the block in errors.
    Every frame must declare its size; all of them together may hold at most
    :data:`~shardstream.format.limits.MAX_BLOCK_RAW_BYTES`, checked before each is decompressed.
    """
    zstd = zstandard()
    d = load_dictionary(dictionary, where=where)
    d = zstd.ZstdDecompressor(dict_data=d) if d is not None else zstd.ZstdDecompressor()
    view = memoryview(data)
    out: list[tuple[int, bytes]] = []
    pos = total = 0
    while pos < len(view):
        at = f"{where}, frame {len(out)} at byte {pos}"
        size = declared_size(view[pos:], where=at)
        total += size
        if total > limits.MAX_BLOCK_RAW_BYTES:
            raise _over_limit(f"{where} (frames 0..{len(out)})", total)
        obj = d.decompressobj()
        try:  # zstd stops at the declared size: a lying header cannot inflate past it
            raw = obj.decompress(view[pos:])
        except zstd.ZstdError as exc:
            raise CorruptShardError(f"{at} cannot be decompressed (zstd: {exc}); the shard "
                                    "is damaged") from exc
        if not obj.eof:
            raise CorruptShardError(f"{at} is truncated; the shard is damaged")
        if len(raw) != size:
            raise CorruptShardError(f"{at}: decompressed to {len(raw)} bytes, it declares "
                                    f"{size}; the shard is damaged")
        out.append((pos, raw))
        pos = len(view) - len(obj.unused_data)
    return out


def _ints(a: Any) -> memoryview:
    """A read-only sequence of Python ints over an integer array (fast to index)."""
    return memoryview(np.ascontiguousarray(a, dtype="=u8")).cast("B").cast("Q")


class FrameDecoder:
    """Decompresses the frames of one format-v3 shard (see :class:`ShardIndex` frame table).

    ``decode(block, data)`` gives a whole block's samples back to back (the
    stream reader), ``frame(f, data)`` one frame (``ds[i]``). One zstd
    decompressor per thread, holding the shard's dictionary.
    """

    def __init__(self, index: Any, path: str) -> None:
        zstd = zstandard()
        self.path, self.index = path, index
        t = index.frame_table()
        self.frame_first, self.frame_block = _ints(t.first), _ints(t.block)
        self.rel_start, self.rel_end = _ints(t.rel_start), _ints(t.rel_end)
        self.raw_start, self.raw_end = _ints(t.raw_start), _ints(t.raw_end)
        self.raw_len = _ints(t.raw_end - t.raw_start)
        self.block_frame = _ints(t.block_frame)  # first frame of every block, then the count
        self.table = t
        self._dict = load_dictionary(index.dictionary or b"",
                                     where=f"shard {path}: its index")
        self._local = threading.local()
        self._zstd = zstd
        self._owner: int | None = None
        self._decompress: Any = None
        self._dctx: Any = None
        self.content_size = zstd.frame_content_size

    def _d(self) -> Any:
        """This thread's decompressor (``decompress`` bound method), made on first use."""
        d = getattr(self._local, "d", None)
        if d is None:
            zstd = self._zstd
            d = self._local.d = zstd.ZstdDecompressor(dict_data=self._dict) \
                if self._dict is not None else zstd.ZstdDecompressor()
        self._owner, self._dctx, self._decompress = threading.get_ident(), d, d.decompress
        return d.decompress

    def where(self, f: int, label: Any = "") -> str:
        """How errors name frame ``f``."""
        if callable(label):
            label = label()
        first = self.frame_first[f]
        last = self.frame_first[f + 1] - 1 if f + 1 < len(self.frame_first) else \
            self.index.num_samples - 1
        return (f"shard {self.path}: block {self.frame_block[f]}, frame {f} (shard-local "
                f"samples {first}..{last}{'; ' + label if label else ''})")

    def frame(self, f: int, data: bytes | memoryview, label: Any = "") -> bytes:
        """Frame ``f``'s samples, from its stored bytes; checked against the index.

        ``label`` adds context to errors (e.g. the sample a reader asked for);
        a callable is only called to build an error message.
        """
        # the content size and the frame's checksum are checked; a frame that ends
        # before its slot would be an index mismatch, caught by the sha256 in `verify`
        return checked_decompress(self._decompress if self._owner == _get_ident() else
                                  self._d(), data, self.raw_len[f], lambda: self.where(f, label))

    def decode(self, block: int, data: bytes | memoryview, label: str = "") -> bytes:
        """Block ``block``'s samples back to back, from its stored bytes.

        ``label`` (the block's first sample, as the reader names it) goes into errors.
        """
        view = memoryview(data)
        f0, f1 = self.block_frame[block], self.block_frame[block + 1]
        if f1 - f0 == 1:
            return self.frame(f0, view, label)
        if self._owner != _get_ident():
            self._d()
        zstd = self._zstd
        size = self.raw_end[f1 - 1] - self.raw_start[f0]
        if size > limits.MAX_BLOCK_RAW_BYTES:
            raise _over_limit(f"shard {self.path}: block {block}", size)
        if size > len(view) * MAX_ZSTD_RATIO:  # a lying index: the frame at fault is named
            return self._frame_by_frame(view, f0, f1, label)
        try:  # every frame in one pass into one buffer, checksums checked (30 % faster
            # than multi_decompress_to_buffer + join); one byte more shows extra data
            out = self._dctx.stream_reader(view, read_across_frames=True).read(size + 1)
            if len(out) == size:
                return out
        except zstd.ZstdError:
            pass
        # something is wrong: frame by frame, so the error names the damaged frame
        return self._frame_by_frame(view, f0, f1, label)

    def _frame_by_frame(self, view: memoryview, f0: int, f1: int, label: str) -> bytes:
        """Frames ``f0..f1-1`` of a block decompressed one at a time (each checked)."""
        rs, re_ = self.rel_start, self.rel_end
        return b"".join([self.frame(f, view[rs[f]:re_[f]], label) for f in range(f0, f1)])
