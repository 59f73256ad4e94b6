"""Escape data-derived text before it reaches a terminal.

Field names, keys, shard names and ``created_by`` come from files, which
anyone can craft: printed raw, ``\\x1b[...`` sequences recolour or rewrite the
terminal, C1 controls (``\\x9b`` is a one-byte CSI) do the same on some
terminals, and bidi overrides (``\\u202e``) make text read backwards. Every
piece of text the CLI prints goes through :func:`escape` (plain text) or
:func:`escape_json` (JSON lines): C0, DEL, C1, lone surrogates, line and
paragraph separators and invisible format characters (Unicode categories
Cc, Cf, Cs, Zl, Zp) become visible escapes; printable non-ASCII such as
``é`` or ``中`` is kept as is.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache

__all__ = ["escape", "escape_json", "UNSAFE_CATEGORIES"]


UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


@lru_cache(maxsize=1)
def _unsafe() -> re.Pattern[str]:
    """One character class of every unsafe code point (built on first need, ~0.15 s)."""
    cps = [c for c in range(sys.maxunicode + 1)
           if unicodedata.category(chr(c)) in UNSAFE_CATEGORIES]
    ranges: list[str] = []
    start = prev = cps[0]
    for c in cps[1:] + [-2]:
        if c != prev + 1:
            ranges.append(re.escape(chr(start)) if start == prev else
                          f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
            start = c
        prev = c
    return re.compile("[" + "".join(ranges) + "]")


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _plain(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _SHORT:
        return _SHORT[ch]
    c = ord(ch)
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}"


def _json(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in "\n\r\t":  # JSON whitespace between tokens (json.dumps escapes them in strings)
        return ch
    c = ord(ch)
    if c < 0x10000:
        return f"\\u{c:04x}"
    c -= 0x10000  # a UTF-16 surrogate pair, as JSON spells astral characters
    return f"\\u{0xD800 + (c >> 10):04x}\\u{0xDC00 + (c & 0x3FF):04x}"


def escape(text: object) -> str:
    """``str(text)`` with unsafe characters as ``\\x1b``, ``\\x9b``, ``\\u202e`` escapes."""
    s = str(text)
    if s.isprintable():  # the common case: no work (printable excludes every unsafe class)
        return s
    return _unsafe().sub(_plain, s)


def escape_json(line: str) -> str:
    """A JSON document (as ``json.dumps`` writes it) with unsafe characters as ``\\uXXXX``
    escapes: still valid JSON and equal once parsed (outside strings only JSON's
    whitespace can occur, which is kept)."""
    if line.isprintable():
        return line
    return _unsafe().sub(_json, line)
