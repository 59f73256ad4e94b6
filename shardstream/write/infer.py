"""JSON values -> typed numpy arrays (``--arrays auto``), with the field path of
anything that cannot become one, and fast JSON line parsing.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from shardstream.errors import InputError

__all__ = ["INT_MIN", "UINT_MAX", "BadValue", "DIGITS", "DIGIT_RUN", "arrays_in", "check_ints",
           "convert_arrays", "loads", "NEVER_HINT"]


try:  # optional: ~3x faster than json.loads on typical lines
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


# ---------------------------------------------------------------- exact values, arrays
INT_MIN, _INT_MAX, UINT_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_EXACT = 1 << 53  # float64 holds every integer in [-2**53, 2**53] exactly
# An integer literal follows a delimiter (or "-"); fraction and exponent digits follow
# ".", "e", "+": digits -> "0", delimiters -> " ", anything else -> "x"; a run of 19 digits
# after a delimiter is the only way to spell an integer that may not fit int64.
DIGITS = bytes(48 if 48 <= b <= 57 else 32 if b in b" \t\r\n:,[-" else 120 for b in range(256))
DIGIT_RUN = b" " + b"0" * 19
_NONE = type(None)
_NUMBERS = frozenset({int, float})
_NUMERIC_OR_NONE = frozenset({int, float, bool, _NONE})
NEVER_HINT = "or pass --arrays never (arrays='never') to keep lists as Python lists"


class BadValue(Exception):
    """A value the rules refuse; ``parts`` is its field path, filled in while unwinding."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.parts: list[str | int] = []

    def at(self, part: str | int) -> "BadValue":
        self.parts.append(part)
        return self

    def describe(self) -> str:
        path = ""
        for p in reversed(self.parts):
            path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
        return f'field "{path}": {self.message}'


def _digits(n: int) -> str:
    s = str(n)
    return s if len(s) <= 40 else f"{s[:20]}...{s[-10:]} ({len(s.lstrip('-'))} digits)"


def check_ints(obj: Any) -> None:
    """Refuse integers msgpack cannot store (outside ``[-2**63, 2**64)``)."""
    t = type(obj)
    if t is int:
        if not INT_MIN <= obj <= UINT_MAX:
            raise BadValue(f"integer {_digits(obj)} does not fit in 64 bits; store it as a string")
    elif t is dict:
        for k, v in obj.items():
            try:
                check_ints(v)
            except BadValue as bad:
                raise bad.at(str(k))
    elif t is list or t is tuple:
        for i, v in enumerate(obj):
            try:
                check_ints(v)
            except BadValue as bad:
                raise bad.at(i)


def arrays_in(d: dict) -> None:
    """Apply the lists -> arrays rule to every list in ``d``, in place."""
    for k, v in d.items():
        t = type(v)
        if t is list:
            try:
                d[k] = _as_array(v)
            except BadValue as bad:
                raise bad.at(str(k))
        elif t is dict:
            try:
                arrays_in(v)
            except BadValue as bad:
                raise bad.at(str(k))


def _items(lst: list) -> None:
    """A list that stays a list: apply the rule to the lists and dicts inside it."""
    for i, v in enumerate(lst):
        t = type(v)
        try:
            if t is list:
                lst[i] = _as_array(v)
            elif t is dict:
                arrays_in(v)
        except BadValue as bad:
            raise bad.at(i)


def _as_array(lst: list) -> Any:
    """One list under the rule: an ndarray, or the list (its items converted)."""
    if not lst:
        return lst  # no items, no dtype: an empty list stays []
    types = list(map(type, lst))
    t = types[0]
    if types.count(t) == len(types):  # one kind (count compares by identity first: fast)
        if t is float:
            return np.array(lst, np.float64)
        if t is int:
            return _int_array(lst)
        if t is bool:
            return np.array(lst, np.bool_)
        if t is list:
            return _nested(lst)
        if t is dict:
            _items(lst)
        return lst
    kinds = set(types)
    if kinds == _NUMBERS:
        return _float_array(lst)
    if _NONE in kinds and kinds <= _NUMERIC_OR_NONE:
        i = next(i for i, v in enumerate(lst) if v is None)
        raise BadValue(f"a list of numbers holds null at [{i}], so it cannot become a numpy "
                       f"array: fill the nulls (e.g. with 0 or NaN), {NEVER_HINT}")
    _items(lst)  # mixed kinds ([1, "a"], [true, 1]): a list
    return lst


def _int_array(lst: list) -> np.ndarray:
    try:
        return np.array(lst, np.int64)
    except OverflowError:
        pass
    try:
        return np.array(lst, np.uint64)
    except OverflowError:
        raise BadValue("a list of integers mixes negative values with values >= 2**63: no "
                       f"64-bit integer dtype holds them all; store them as strings, "
                       f"{NEVER_HINT}") from None


def _float_array(lst: list) -> np.ndarray:
    for i, v in enumerate(lst):
        if type(v) is int and not -_EXACT <= v <= _EXACT:
            raise BadValue(f"a list of floats holds the integer {_digits(v)} at [{i}], which "
                           f"float64 cannot hold exactly; write it as a float or a string, "
                           f"{NEVER_HINT}")
    return np.array(lst, np.float64)


def _nested(lst: list) -> Any:
    """Lists of lists: one array when every item becomes an array of one shape."""
    _items(lst)
    if not all(type(v) is np.ndarray for v in lst) or len({v.shape for v in lst}) != 1:
        return lst  # ragged (or not all numeric): a list of arrays and lists
    dtypes = {v.dtype for v in lst}
    if len(dtypes) == 1:
        return np.stack(lst)
    if dtypes == {np.dtype(np.int64), np.dtype(np.float64)}:
        for i, v in enumerate(lst):
            if v.dtype.kind == "i" and ((v < -_EXACT).any() or (v > _EXACT).any()):
                raise BadValue(f"rows of floats and integers, and the integers at [{i}] do not "
                               f"all fit float64 exactly; write them as floats, {NEVER_HINT}")
        return np.stack(lst).astype(np.float64, copy=False)
    return lst  # bool rows among number rows, int64 among uint64: a list of arrays


def convert_arrays(obj: dict, arrays: str, slow: bool, where: Callable[[], str]) -> dict:
    """Check integers (``slow``: parsed by a reader that keeps big ints) and apply the
    arrays rule; a refused value is an :class:`InputError` at ``where()``."""
    try:
        if slow:
            check_ints(obj)
        if arrays == "auto":
            arrays_in(obj)
    except BadValue as bad:
        raise InputError(f"{where()}: {bad.describe()}") from None
    return obj


def loads(line: bytes) -> tuple[Any, bool]:
    """Parse one JSON line; ``True`` with it when its integers still need checking.

    orjson turns integer literals outside 64 bits into floats silently, so a line
    with a run of 19+ digits (the only way to spell such an integer) goes to
    ``json``, which keeps them exact for :func:`_check_ints` to refuse.
    """
    if _orjson is not None and DIGIT_RUN not in line.translate(DIGITS):  # faster than a regex
        try:
            return _orjson.loads(line), False
        except ValueError:
            pass  # let json decide (NaN, BOM) and word the error
    return json.loads(line), True
