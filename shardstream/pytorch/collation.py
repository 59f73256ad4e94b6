"""Columnar collation: a list of sample dicts -> one dict of tensors.

One pass per field, not per sample. Rules (first non-None value decides):

==========================  ===============================================
value                       batch value
==========================  ===============================================
bool                        ``torch.bool`` tensor ``[n]``
int                         ``int_dtype`` tensor (default ``torch.int64``)
float (or int/float mix)    ``float_dtype`` tensor (default ``torch.float32``)
ndarray / tensor, one shape stacked ``[n, *shape]``, dtype kept
ndarray / tensor, ragged    right-padded with ``pad_value`` along dim 0 (other
dim 0, same trailing dims   dims equal) + ``<field>_lengths`` int64 tensor
str, bytes, list            a Python list
dict                        collated recursively (nested dict)
None / missing somewhere    a Python list with ``None`` at those positions
==========================  ===============================================

Arrays whose shapes differ in other ways come back as a list of tensors.

``missing="mask"`` (the default collate of a mixture, whose sources may have
different schemas) treats a field that is None or missing in some samples
differently: the absent rows are filled with a blank of the present values'
kind (``0``, ``0.0``, ``False``, a zero array of the same shape, or an empty
array when the present arrays are ragged) and collated by the rules above,
and a ``<field>_present`` bool tensor ``[n]`` marks the real rows (only in
batches where the field is absent somewhere). Fields of
other kinds (str, bytes, list, dict) stay a list with None, plus the mask.
A field absent from every sample of a batch is absent from that batch.

``narrow=True`` (samples from :func:`shardstream.format.codec.iter_samples` with
``narrow=True``): integer arrays of compressed shards decoded in their stored,
narrower dtype are stacked or padded as they are and widened to the dtype they
were written with in one cast per batch; the batch is the same as for widened
samples.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_
from typing import Any, Sequence

import numpy as np
import torch

from shardstream.format.codec import narrowed, widen

__all__ = ["Collate", "Ragged", "collate"]


_dtype_of = attrgetter("dtype")
_shape_of = attrgetter("shape")
_NP_OF_TORCH = {torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
                torch.int8: np.int8, torch.uint8: np.uint8, torch.float64: np.float64,
                torch.float32: np.float32, torch.float16: np.float16}


class Collate:
    """Configurable collate function (see the module docstring for the rules).

    ``cast_arrays=True`` also casts integer/float arrays to ``int_dtype`` /
    ``float_dtype``; by default arrays keep the dtype they were written with.
    """

    def __init__(self, *, int_dtype: torch.dtype = torch.int64,
                 float_dtype: torch.dtype = torch.float32, pad_value: int | float = 0,
                 lengths: bool = True, cast_arrays: bool = False,
                 missing: str = "none") -> None:
        if missing not in ("none", "mask"):
            raise ValueError(f"missing must be 'none' or 'mask', got {missing!r}")
        for name, dt in (("int_dtype", int_dtype), ("float_dtype", float_dtype)):
            if not isinstance(dt, torch.dtype):
                raise TypeError(f"{name} must be a torch.dtype, got {dt!r}")
        self.int_dtype = int_dtype
        self.float_dtype = float_dtype
        self.pad_value = pad_value
        self.lengths = lengths
        self.cast_arrays = cast_arrays
        self.missing = missing

    def __repr__(self) -> str:
        return (f"Collate(int_dtype={self.int_dtype}, float_dtype={self.float_dtype}, "
                f"pad_value={self.pad_value!r}, lengths={self.lengths}, "
                f"cast_arrays={self.cast_arrays}, missing={self.missing!r})")

    def __call__(self, samples: Sequence[dict], *, ragged: bool = False,
                 narrow: bool = False) -> dict[str, Any]:
        """Collate ``samples``. ``ragged=True`` (used in DataLoader workers) leaves
        ragged arrays unpadded as :class:`Ragged`; :func:`from_wire` pads them.
        ``narrow``: ``samples`` may hold arrays decoded narrow (module docstring)."""
        out = self._collate(samples, ragged, narrow)
        if narrow:  # narrow arrays the columns did not take (in lists, ...)
            widen(out)
        return out

    def _collate(self, samples: Sequence[dict], ragged: bool, narrow: bool) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        first = samples[0]
        keys0 = first.keys()
        keys: Any = keys0
        uniform = True
        for s in samples:
            if s.keys() != keys0:
                uniform = False
                break
        if not uniform:
            merged: dict[str, None] = {}
            for s in samples:
                merged.update(dict.fromkeys(s))
            keys = merged
        out: dict[str, Any] = {}
        for k in keys:
            vals = [s[k] for s in samples] if uniform else [s.get(k) for s in samples]
            self._field(out, k, vals, ragged, narrow)
        return out

    # -- one column --------------------------------------------------------
    def _field(self, out: dict[str, Any], key: str, vals: list, ragged: bool,
               narrow: bool = False) -> None:
        v0 = vals[0]
        if v0 is None or self.missing == "mask" and any(map(is_, vals, repeat(None))):
            if narrow:  # blanks take the present rows' dtype: widen those first
                vals = [widen(v) for v in vals]
            v0 = next((v for v in vals if v is not None), None)
            if v0 is None:
                out[key] = vals
                return
            if self.missing == "mask":
                self._masked(out, key, vals, ragged)
                return
            out[key] = vals  # some None: keep a list (documented)
            return
        t = type(v0)
        if t is int or t is float or t is bool:
            out[key] = self._scalars(vals, t)
        elif t is np.ndarray or t is torch.Tensor:
            self._arrays(out, key, vals, ragged, narrow)
        elif t is dict:
            if all(type(v) is dict for v in vals):
                out[key] = self._collate(vals, ragged, narrow)
            else:
                out[key] = vals
        elif isinstance(v0, np.generic):
            out[key] = self._scalars([v.item() if isinstance(v, np.generic) else v
                                      for v in vals], type(v0.item()))
        else:  # str, bytes, list, anything else
            out[key] = vals

    def _masked(self, out: dict[str, Any], key: str, vals: list, ragged: bool) -> None:
        """``missing="mask"``: fill absent rows with a blank, add ``<key>_present``."""
        present = np.fromiter((v is not None for v in vals), dtype=np.bool_, count=len(vals))
        blank = _blank([v for v in vals if v is not None])
        if blank is None:
            out[key] = vals
        else:
            self._field(out, key, [blank if v is None else v for v in vals], ragged)
        out[f"{key}_present"] = torch.from_numpy(present)

    def _scalars(self, vals: list, t: type) -> Any:
        try:
            if t is bool:
                arr = np.array(vals)
                if arr.dtype != np.bool_:
                    return vals
                return torch.from_numpy(arr)
            arr = np.array(vals)
        except (OverflowError, ValueError, TypeError):
            return vals
        kind = arr.dtype.kind
        if kind in "iu":
            return _to_torch(arr, self.int_dtype)
        if kind == "f":
            return _to_torch(arr, self.float_dtype)
        if kind == "b":
            return torch.from_numpy(arr)
        return vals  # None mixed in, str mixed in, huge ints: object dtype

    def _arrays(self, out: dict[str, Any], key: str, vals: list, ragged: bool,
                narrow: bool = False) -> None:
        try:
            arrs = [v if type(v) is np.ndarray else _as_numpy(v) for v in vals]
        except TypeError:
            out[key] = vals
            return
        dt0 = arrs[0].dtype
        one_dtype = len(set(map(_dtype_of, arrs))) == 1
        own = None  # rows decoded narrow: the dtype to widen the batch to
        if narrow:
            if all(a.dtype is dt0 for a in arrs):  # the usual case: one dtype object
                own = narrowed(arrs[0])  # a tagged dtype: one stored and one own dtype
                if own is not None and not _fits(self.pad_value, dt0):
                    arrs, own = [a.astype(own) for a in arrs], None
                    dt0 = arrs[0].dtype
            else:  # equal dtypes may still differ in their tags: widen the tagged ones
                owns = [narrowed(a) for a in arrs]
                if owns.count(None) != len(owns):
                    arrs = [a if o is None else a.astype(o) for a, o in zip(arrs, owns)]
                    dt0 = arrs[0].dtype
                    one_dtype = len(set(map(_dtype_of, arrs))) == 1
        shapes = set(map(_shape_of, arrs))
        if one_dtype and len(shapes) == 1:
            stacked = np.stack(arrs)
            out[key] = self._cast(torch.from_numpy(stacked if own is None else stacked.astype(own)))
            return
        if not (one_dtype and arrs[0].ndim >= 1 and len(set(map(len, shapes))) == 1
                and len({s[1:] for s in shapes}) == 1):
            out[key] = [torch.from_numpy(np.array(a, dtype=own)) for a in arrs]
            return
        if type(self.pad_value) is int and dt0.kind in "iu" and not _fits(self.pad_value, dt0):
            raise ValueError(f"field {key!r}: pad_value {self.pad_value} does not fit its "
                             f"dtype {np.dtype(dt0.str)} (range {np.iinfo(dt0).min}.."
                             f"{np.iinfo(dt0).max}); pass a pad_value that does, or write "
                             "the field in a wider integer dtype")
        lens = np.fromiter(map(len, arrs), dtype=np.int64, count=len(arrs))
        if ragged:
            values = np.concatenate(arrs)
            out[key] = Ragged(values if own is None else values.astype(own), lens,
                              self.pad_value, self._cast_to(dt0))
        else:
            out[key] = _pad_rows(arrs, lens, self.pad_value, self._cast_to(dt0), own)
        if self.lengths:
            out[f"{key}_lengths"] = torch.from_numpy(lens)

    def _cast_to(self, dtype: np.dtype) -> torch.dtype | None:
        if not self.cast_arrays or dtype.kind == "b":
            return None
        return self.float_dtype if dtype.kind in "fc" else self.int_dtype

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cast_arrays or t.dtype == torch.bool:
            return t
        if t.is_floating_point():
            return t.to(self.float_dtype)
        return t.to(self.int_dtype)


class Ragged:
    """Ragged rows (concatenated ``values`` + ``lengths``) not yet padded: half the
    bytes of a padded batch on the way out of a worker."""

    __slots__ = ("values", "lengths", "pad_value", "cast")

    def __init__(self, values: np.ndarray, lengths: np.ndarray, pad_value: int | float,
                 cast: torch.dtype | None) -> None:
        self.values, self.lengths, self.pad_value, self.cast = values, lengths, pad_value, cast

    def __reduce__(self) -> tuple:
        return (Ragged, (self.values, self.lengths, self.pad_value, self.cast))

    def pad(self) -> torch.Tensor:
        """Right-pad along dim 0 into one preallocated buffer, one vectorised copy."""
        lens = self.lengths
        tail = self.values.shape[1:]
        width = int(lens.max()) if len(lens) else 0
        buf = np.full((len(lens), width, *tail), self.pad_value, dtype=self.values.dtype)
        buf[np.arange(width) < lens[:, None]] = self.values
        t = torch.from_numpy(buf)
        return t if self.cast is None else t.to(self.cast)


def _pad_rows(arrs: list, lens: np.ndarray, pad_value: int | float,
              cast: torch.dtype | None, widen_to: np.dtype | None = None) -> torch.Tensor:
    """Right-pad ``arrs`` (equal trailing dims and dtype) into one buffer, row by row
    (cheaper than concatenating and scattering through a mask); ``widen_to``: cast
    the buffer to this numpy dtype (rows decoded narrow)."""
    a0 = arrs[0]
    width = int(lens.max()) if len(lens) else 0
    shape = (len(arrs), width, *a0.shape[1:])
    if pad_value == 0:
        buf = np.zeros(shape, dtype=a0.dtype)
    else:
        buf = np.full(shape, pad_value, dtype=a0.dtype)
    for row, a in zip(buf, arrs):
        row[:len(a)] = a
    t = torch.from_numpy(buf if widen_to is None else buf.astype(widen_to))
    return t if cast is None else t.to(cast)


def _fits(pad_value: int | float, dtype: np.dtype) -> bool:
    """Can ``dtype`` hold the pad value exactly (so padding before widening is the same)?"""
    if pad_value == 0:
        return True
    if type(pad_value) is not int:
        return False
    info = np.iinfo(dtype)
    return info.min <= pad_value <= info.max


def _blank(present: list) -> Any:
    """A stand-in for absent rows matching the present values' kind (None: keep None)."""
    v0 = present[0]
    t = type(v0)
    if t is bool or t is int or t is float:
        return t()
    if isinstance(v0, np.generic):
        return type(v0)(0)
    if t is np.ndarray or t is torch.Tensor:
        try:
            arrs = [_as_numpy(v) for v in present]
        except TypeError:
            return None
        a0 = arrs[0]
        if all(a.shape == a0.shape and a.dtype == a0.dtype for a in arrs):
            return np.zeros(a0.shape, dtype=a0.dtype)
        if a0.ndim >= 1:
            return np.zeros((0, *a0.shape[1:]), dtype=a0.dtype)
    return None


def _as_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v
    raise TypeError(type(v).__name__)


def _to_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    np_dt = _NP_OF_TORCH.get(dtype)
    if np_dt is not None:
        return torch.from_numpy(arr.astype(np_dt, copy=False))
    return torch.from_numpy(arr).to(dtype)


_default = Collate()


def collate(samples: Sequence[dict], *, ragged: bool = False,
            narrow: bool = False) -> dict[str, Any]:
    """Collate with the default rules (int64, float32, pad 0, lengths)."""
    return _default(samples, ragged=ragged, narrow=narrow)
