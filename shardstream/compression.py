"""Compression: the codec registry, frame compression and checked decompression.

Format v3 (written now): every block member is a run of small zstd *frames*,
each holding one or more whole samples (about ``frame_bytes`` of encoded
samples; a larger sample is a frame of its own), all compressed with one zstd
dictionary trained on the writer's first samples and stored in every shard
and its index. The index records where each frame starts, so ``ds[i]``
decompresses one frame (about a sample), and the stream reader decompresses a
block frame by frame. Integer arrays are narrowed inside frames
(:data:`~shardstream.codec.PACKED_EXT`).

Format v2 (read only): every block member is one zstd frame.

Uncompressed datasets never touch this module. A damaged frame is reported as
a :class:`~shardstream.errors.CorruptShardError` naming the shard, block and
samples; the decompressor is never trusted blindly: the frame's declared size
must match the index, and its checksum must match the content.

Untrusted input cannot make a reader allocate without bound: a frame must declare
its content size (the writer always writes it), which must match the index and be
at most :data:`~shardstream.index.MAX_ZSTD_RATIO` times its stored size; a block
(or, rebuilding an index from a shard alone, all its frames together) may hold at
most :data:`~shardstream.index.MAX_BLOCK_RAW_BYTES`. Both are checked before
anything is decompressed.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import index as _index
from .errors import CorruptShardError
from .index import MAX_ZSTD_RATIO

__all__ = ["CODECS", "DEFAULT_LEVEL", "DEFAULT_FRAME_BYTES", "DEFAULT_DICT_BYTES", "Compression",
           "parse_compression", "FrameCompressor", "train_dictionary", "FrameDecoder", "split_frames",
           "BlockDecoder", "decompress_block", "declared_size", "load_dictionary"]

#: codec name -> member name suffix (``000000.ssb.zst``)
CODECS: dict[str, str] = {"zstd": ".zst"}
DEFAULT_LEVEL = 3
#: encoded sample bytes per zstd frame (format v3): what one ``ds[i]`` decompresses at most
#: (unless the sample itself is larger)
DEFAULT_FRAME_BYTES = 256
#: size of the trained zstd dictionary (0: none)
DEFAULT_DICT_BYTES = 32 * 1024
#: name of the dictionary member at the start of a format-v3 shard
DICT_MEMBER = "zstd.dict"
_LEVELS = range(-7, 23)  # zstd's useful range: negative = faster, 22 = smallest
_local = threading.local()
_get_ident = threading.get_ident


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency
        raise ImportError("compressed shardstream datasets need the zstandard package: "
                          "pip install zstandard") from None
    return zstandard


@dataclass(frozen=True)
class Compression:
    """How a dataset's blocks are compressed (recorded in the manifest).

    ``frame_bytes``: encoded sample bytes per zstd frame (format v3); ``0``
    marks a format-v2 dataset (one frame per block), which this version reads
    but no longer writes. ``dict_bytes``: size of the trained dictionary
    (``0``: no dictionary).
    """

    codec: str = "zstd"
    level: int = DEFAULT_LEVEL
    frame_bytes: int = DEFAULT_FRAME_BYTES
    dict_bytes: int = DEFAULT_DICT_BYTES

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"unknown compression {self.codec!r}; use one of "
                             f"{', '.join(CODECS)} or 'none'")
        if isinstance(self.level, bool) or not isinstance(self.level, int) or \
                self.level not in _LEVELS:
            raise ValueError(f"{self.codec} level must be an int in [{_LEVELS.start}, "
                             f"{_LEVELS.stop - 1}], got {self.level!r}")
        for name in ("frame_bytes", "dict_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 30:
                raise ValueError(f"{name} must be an int in [0, 2**30], got {v!r}")

    @property
    def framed(self) -> bool:
        """Format v3 (frames of samples); False: format v2 (one frame per block)."""
        return self.frame_bytes > 0

    @property
    def suffix(self) -> str:
        """What block member names end with after ``.ssb`` (``".zst"``)."""
        return CODECS[self.codec]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"codec": self.codec, "level": self.level, "checksum": True}
        if self.framed:
            doc.update(frame_bytes=self.frame_bytes, dict_bytes=self.dict_bytes,
                       packed_ints=True)
        return doc

    @classmethod
    def from_json(cls, doc: Any, *, where: str = "manifest") -> "Compression":
        if not isinstance(doc, dict) or doc.get("codec") not in CODECS:
            codec = doc.get("codec") if isinstance(doc, dict) else doc
            raise ValueError(f"{where}: compression {codec!r} is not supported by this "
                             f"shardstream (reads {', '.join(CODECS)}); upgrade shardstream")
        # format v2 manifests have no frame_bytes: one frame per block
        return cls(doc["codec"], int(doc.get("level", DEFAULT_LEVEL)),
                   int(doc.get("frame_bytes", 0)), int(doc.get("dict_bytes", 0)))

    def spec(self) -> str:
        """The ``--compress`` spelling (``"zstd:3"``)."""
        return f"{self.codec}:{self.level}"


def parse_compression(spec: "str | Compression | None", level: int | None = None
                      ) -> Compression | None:
    """``None``/``"none"`` -> None; ``"zstd"``, ``"zstd:19"`` -> :class:`Compression`.

    ``level`` (when given) overrides a level in ``spec``.
    """
    if spec is None or isinstance(spec, Compression):
        if level is not None and spec is None:
            raise ValueError("level= needs compression= (e.g. compression='zstd')")
        return spec if level is None or spec is None else \
            Compression(spec.codec, level, spec.frame_bytes, spec.dict_bytes)
    if not isinstance(spec, str):
        raise TypeError(f"compression must be a str like 'zstd' or 'zstd:19', got "
                        f"{type(spec).__name__}")
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*(?::\s*(-?\d+)\s*)?", spec.lower())
    if not m:
        raise ValueError(f"invalid compression {spec!r}: use 'zstd', 'zstd:LEVEL' or 'none'")
    if m.group(1) == "none":
        if m.group(2) is not None or level is not None:
            raise ValueError("compression 'none' takes no level")
        return None
    lvl = level if level is not None else int(m.group(2)) if m.group(2) else DEFAULT_LEVEL
    return Compression(m.group(1), lvl)


def _frames(samples: list[bytes], frame_bytes: int) -> list[list[bytes]]:
    """Consecutive samples grouped until a group holds ``frame_bytes``."""
    out: list[list[bytes]] = []
    cur: list[bytes] = []
    size = 0
    for data in samples:
        cur.append(data)
        size += len(data)
        if size >= frame_bytes:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def train_dictionary(samples: list[bytes], compression: Compression) -> bytes:
    """A zstd dictionary for frames of ``samples`` (b"" when there is too little to learn).

    Deterministic (one thread), so the same input writes the same shards.
    """
    size = compression.dict_bytes
    frames = [b"".join(g) for g in _frames(samples, compression.frame_bytes)]
    total = sum(map(len, frames))
    if size == 0 or len(frames) < 32 or total < 4 * size:
        return b""
    zstd = _zstd()
    try:
        d = zstd.train_dictionary(size, frames, level=compression.level)
    except zstd.ZstdError:  # e.g. samples too uniform to learn from: go without
        return b""
    return d.as_bytes()


class FrameCompressor:
    """Compresses a block's samples as frames of about ``frame_bytes`` (format v3).

    Frames carry their content size and a checksum, not the dictionary id (the
    shard's index names the dictionary).
    """

    def __init__(self, compression: Compression, dictionary: bytes = b"") -> None:
        zstd = _zstd()
        self.compression, self.dictionary = compression, dictionary
        kw: dict[str, Any] = dict(level=compression.level, write_checksum=True,
                                  write_content_size=True, write_dict_id=False)
        if dictionary:
            d = zstd.ZstdCompressionDict(dictionary, dict_type=zstd.DICT_TYPE_FULLDICT)
            d.precompute_compress(level=compression.level)
            kw["dict_data"] = d
        self._c = zstd.ZstdCompressor(**kw)

    def compress_block(self, samples: list[bytes]) -> tuple[bytes, list[int], list[int]]:
        """(stored block, samples per frame, offset of each frame in the stored block)."""
        parts, counts, offsets = [], [], []
        pos = 0
        for group in _frames(samples, self.compression.frame_bytes):
            frame = self._c.compress(b"".join(group))
            parts.append(frame)
            counts.append(len(group))
            offsets.append(pos)
            pos += len(frame)
        return b"".join(parts), counts, offsets


def _decompressor() -> Any:
    d = getattr(_local, "d", None)
    if d is None:  # not thread safe: one per thread
        d = _local.d = _zstd().ZstdDecompressor()
    return d


def checked_decompress(decompress: Callable[[Any], bytes], data: bytes | memoryview,
                       expected: int, where: Callable[[], str]) -> bytes:
    """``decompress(data)`` of one zstd frame that must hold ``expected`` bytes.

    The declared content size is checked before decompressing (never allocate a
    lie: it must equal ``expected`` and fit :data:`MAX_ZSTD_RATIO`), the frame's
    checksum while decompressing, the length after; every failure is a
    :class:`CorruptShardError` starting with ``where()``.
    """
    zstd = _zstd()
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
    limit = _index.MAX_BLOCK_RAW_BYTES
    return CorruptShardError(f"{where}: {raw} uncompressed bytes declared, more than the "
                             f"{limit} one block may hold (shardstream.index."
                             "MAX_BLOCK_RAW_BYTES); the shard is damaged or was not written "
                             "by shardstream: restore it or rewrite the dataset")


def declared_size(data: bytes | memoryview, *, where: str) -> int:
    """The content size the zstd frame at the start of ``data`` declares, checked:
    present (shardstream always writes it), within :data:`MAX_ZSTD_RATIO` of ``data``
    and :data:`~shardstream.index.MAX_BLOCK_RAW_BYTES`. For reading without an index."""
    zstd = _zstd()
    try:
        n = zstd.frame_content_size(data)
    except zstd.ZstdError as exc:
        raise _not_a_frame(where, exc) from exc
    if n < 0:
        raise CorruptShardError(f"{where}: the zstd frame does not declare its size; not "
                                "written by shardstream (or damaged): restore it or rewrite "
                                "the dataset")
    if n > _index.MAX_BLOCK_RAW_BYTES:
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
    zstd = _zstd()
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
    if raw_size > _index.MAX_BLOCK_RAW_BYTES:
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
    :data:`~shardstream.index.MAX_BLOCK_RAW_BYTES`, checked before each is decompressed.
    """
    zstd = _zstd()
    d = load_dictionary(dictionary, where=where)
    d = zstd.ZstdDecompressor(dict_data=d) if d is not None else zstd.ZstdDecompressor()
    view = memoryview(data)
    out: list[tuple[int, bytes]] = []
    pos = total = 0
    while pos < len(view):
        at = f"{where}, frame {len(out)} at byte {pos}"
        size = declared_size(view[pos:], where=at)
        total += size
        if total > _index.MAX_BLOCK_RAW_BYTES:
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
        zstd = _zstd()
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
        if size > _index.MAX_BLOCK_RAW_BYTES:
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
