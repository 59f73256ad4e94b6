"""Bounds on sizes read from disk, checked before anything is allocated.

Module attributes, read at each check, so tests (and a user who must) can change them.
"""

from __future__ import annotations

__all__ = ["MAX_BLOCK_RAW_BYTES"]


#: the largest uncompressed block an index may declare (the writer refuses larger
#: compressed samples): a damaged index cannot make a reader allocate more
MAX_BLOCK_RAW_BYTES = 1 << 30
#: zstd cannot expand a frame more than this (a 4-byte RLE block holds 128 KiB at most)
MAX_ZSTD_RATIO = 1 << 15
