"""Per-block compression: the codec registry, ``compress`` and checked ``decompress``.

Each block member of a shard is compressed on its own (a zstd frame with its
content size and a content checksum), so the index still points at blocks
and a reader decompresses exactly the block it needs. Uncompressed datasets
never touch this module. A damaged frame is reported as a
:class:`~shardstream.errors.CorruptShardError` naming the shard and block; the
decompressor is never trusted blindly: the frame's declared size must match
the index, and the checksum must match the content.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from .errors import CorruptShardError

__all__ = ["CODECS", "DEFAULT_LEVEL", "Compression", "parse_compression", "BlockCompressor",
           "BlockDecoder", "decompress_block"]

#: codec name -> member name suffix (``000000.ssb.zst``)
CODECS: dict[str, str] = {"zstd": ".zst"}
DEFAULT_LEVEL = 3
_LEVELS = range(-7, 23)  # zstd's useful range: negative = faster, 22 = smallest
_local = threading.local()


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency
        raise ImportError("compressed shardstream datasets need the zstandard package: "
                          "pip install zstandard") from None
    return zstandard


@dataclass(frozen=True)
class Compression:
    """How a dataset's blocks are compressed (recorded in the manifest)."""

    codec: str = "zstd"
    level: int = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"unknown compression {self.codec!r}; use one of "
                             f"{', '.join(CODECS)} or 'none'")
        if isinstance(self.level, bool) or not isinstance(self.level, int) or \
                self.level not in _LEVELS:
            raise ValueError(f"{self.codec} level must be an int in [{_LEVELS.start}, "
                             f"{_LEVELS.stop - 1}], got {self.level!r}")

    @property
    def suffix(self) -> str:
        """What block member names end with after ``.ssb`` (``".zst"``)."""
        return CODECS[self.codec]

    def to_json(self) -> dict[str, Any]:
        return {"codec": self.codec, "level": self.level, "checksum": True}

    @classmethod
    def from_json(cls, doc: Any, *, where: str = "manifest") -> "Compression":
        if not isinstance(doc, dict) or doc.get("codec") not in CODECS:
            codec = doc.get("codec") if isinstance(doc, dict) else doc
            raise ValueError(f"{where}: compression {codec!r} is not supported by this "
                             f"shardstream (reads {', '.join(CODECS)}); upgrade shardstream")
        return cls(doc["codec"], int(doc.get("level", DEFAULT_LEVEL)))


def parse_compression(spec: "str | Compression | None", level: int | None = None
                      ) -> Compression | None:
    """``None``/``"none"`` -> None; ``"zstd"``, ``"zstd:19"`` -> :class:`Compression`.

    ``level`` (when given) overrides a level in ``spec``.
    """
    if spec is None or isinstance(spec, Compression):
        if level is not None and spec is None:
            raise ValueError("level= needs compression= (e.g. compression='zstd')")
        return spec if level is None or spec is None else Compression(spec.codec, level)
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


class BlockCompressor:
    """Compresses whole blocks: one zstd frame each, with content size and checksum."""

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        self._c = _zstd().ZstdCompressor(level=compression.level, write_checksum=True,
                                          write_content_size=True)

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)


def _decompressor() -> Any:
    d = getattr(_local, "d", None)
    if d is None:  # not thread safe: one per thread
        d = _local.d = _zstd().ZstdDecompressor()
    return d


def decompress_block(codec: str, data: bytes | memoryview, raw_size: int, *,
                     where: str) -> bytes:
    """The uncompressed bytes of one block, checked against ``raw_size`` and the checksum.

    ``where`` names the block in errors (``"shard x.tar: block 3 (samples ...)"``).
    """
    if codec not in CODECS:
        raise CorruptShardError(f"{where}: compression {codec!r} is not supported by this "
                                "shardstream; upgrade shardstream")
    zstd = _zstd()
    try:
        declared = zstd.frame_content_size(data)
        if declared != raw_size:  # checked before decompressing: never allocate a lie
            raise CorruptShardError(f"{where}: the zstd frame declares {declared} bytes, the "
                                    f"index {raw_size}; the shard is damaged: restore it or "
                                    "rewrite the dataset")
        out = _decompressor().decompress(data, allow_extra_data=False)
    except zstd.ZstdError as exc:
        raise CorruptShardError(f"{where} cannot be decompressed ({codec}: {exc}); the shard "
                                "is damaged: restore it or rewrite the dataset") from exc
    if len(out) != raw_size:
        raise CorruptShardError(f"{where}: decompressed to {len(out)} bytes, the index says "
                                f"{raw_size}; restore the shard or rewrite the dataset")
    return out


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
