"""Compression: the codec registry, frame compression and checked decompression.

Format v3 (written now): every block member is a run of small zstd *frames*,
each holding one or more whole samples (about ``frame_bytes`` of encoded
samples; a larger sample is a frame of its own), all compressed with one zstd
dictionary trained on the writer's first samples and stored in every shard
and its index. The index records where each frame starts, so ``ds[i]``
decompresses one frame (about a sample), and the stream reader decompresses a
block frame by frame. Integer arrays are narrowed inside frames
(:data:`~shardstream.format.codec.PACKED_EXT`).

Format v2 (read only): every block member is one zstd frame.

Uncompressed datasets never touch this module. A damaged frame is reported as
a :class:`~shardstream.errors.CorruptShardError` naming the shard, block and
samples; the decompressor is never trusted blindly: the frame's declared size
must match the index, and its checksum must match the content.

Untrusted input cannot make a reader allocate without bound: a frame must declare
its content size (the writer always writes it), which must match the index and be
at most :data:`~shardstream.format.limits.MAX_ZSTD_RATIO` times its stored size; a block
(or, rebuilding an index from a shard alone, all its frames together) may hold at
most :data:`~shardstream.format.limits.MAX_BLOCK_RAW_BYTES`. Both are checked before
anything is decompressed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shardstream.format.frames import CODECS, zstandard

__all__ = ["DEFAULT_LEVEL", "DEFAULT_FRAME_BYTES", "DEFAULT_DICT_BYTES", "Compression",
           "parse_compression", "FrameCompressor", "train_dictionary"]


DEFAULT_LEVEL = 3
#: encoded sample bytes per zstd frame (format v3): what one ``ds[i]`` decompresses at most
#: (unless the sample itself is larger)
DEFAULT_FRAME_BYTES = 256
#: size of the trained zstd dictionary (0: none)
DEFAULT_DICT_BYTES = 32 * 1024
#: name of the dictionary member at the start of a format-v3 shard
DICT_MEMBER = "zstd.dict"
_LEVELS = range(-7, 23)  # zstd's useful range: negative = faster, 22 = smallest


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
    zstd = zstandard()
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
        zstd = zstandard()
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
