"""Weighted mixtures of several datasets: exact per-epoch counts, deterministic, resumable.

A :class:`Mixture` fixes how many samples ``c_i`` each source contributes to
one epoch (from weights and a stopping rule, or from per-source ``repeat`` /
``samples``). The epoch's global sequence ``G`` (length ``T = sum(c_i)``) is
an interleaving of the per-source sequences:

* **Source sequences.** Source ``i``'s samples come in its own single-source
  order (:class:`~shardstream.read.order.EpochOrder` with the stream's seed) for
  *source epochs* ``q = 0, 1, 2, ...``. An upsampled source (``c >= N``)
  starts every mixture epoch ``e`` at a fresh pass: source epochs
  ``e*K .. e*K+K-1`` (``K = ceil(c / N)``) cut to ``c`` samples, so each
  sample appears at least ``c // N`` times. A downsampled source (``c < N``)
  continues where the previous mixture epoch stopped: epoch ``e`` takes
  positions ``[e*c, (e+1)*c)`` of its endless sequence, so successive epochs
  see disjoint slices and every sample once per ``~N/c`` epochs.
* **Interleave.** ``G`` is cut into windows of ``window`` slots. How many
  slots of the first ``b`` belong to each source is the closed form
  :meth:`MixOrder.prefix` (a nested, seeded floor division: exact totals,
  monotone, within a few samples of ``c_i * b / T`` at every ``b``), so each
  window holds its exact share; inside a window the sources' slots are placed
  by a permutation seeded by ``(seed, epoch, window)`` (``shuffle=False``:
  evenly spread). Any position of ``G`` maps to (source, ordinal) in O(window).

``G`` depends on (seed, epoch) only, so the stream deals it to ranks and
workers and resumes from a consumed count exactly as for one source.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from shardstream.read.blocks import BlockReader
from shardstream.read.dataset import Dataset
from shardstream.read.mixorder import MixOrder, MixSequence
from shardstream.read.shards import shard_refs
from shardstream.read.sources import open_source

__all__ = ["Source", "Mixture", "MixOrder", "MixtureReader", "epoch_counts", "STOP_RULES"]


STOP_RULES = ("exhaust_all", "first_exhausted")


@dataclass(frozen=True)
class Source:
    """One mixture member: a dataset (directory or ``manifest.json``) and how much of it.

    Give at most one of ``weight`` (share of the epoch, with the mixture's
    stopping rule), ``repeat`` (samples per epoch = ``round(repeat * N)``:
    ``2.0`` upsamples, ``0.5`` downsamples) or ``samples`` (a fixed count).
    """

    path: Any
    weight: float | None = None
    repeat: float | None = None
    samples: int | None = None
    name: str | None = None


def _apportion(total: int, p: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``total`` by proportions ``p`` (sum 1); exact sum."""
    quotas = [total * x for x in p]
    out = [math.floor(q) for q in quotas]
    order = sorted(range(len(p)), key=lambda i: (-(quotas[i] - out[i]), i))
    for i in order[:total - sum(out)]:
        out[i] += 1
    return out


def epoch_counts(sizes: Sequence[int], weights: Sequence[float], *, stop: str = "exhaust_all",
                 epoch_size: int | None = None) -> list[int]:
    """Samples each source contributes to one epoch.

    ``epoch_size``: split exactly ``epoch_size`` by the weights. Else ``stop``:
    ``"exhaust_all"`` makes the epoch just long enough that every source
    contributes at least its size (the others upsampled to keep the weights);
    ``"first_exhausted"`` ends it when the first source has contributed its
    size at its weighted rate (the others downsampled).
    """
    total_w = float(sum(weights))
    p = [w / total_w for w in weights]
    if epoch_size is not None:
        return _apportion(epoch_size, p)
    ratios = [n / x for n, x in zip(sizes, p)]
    if stop == "exhaust_all":
        counts = _apportion(math.ceil(max(ratios) - 1e-9), p)
        return [max(c, n) for c, n in zip(counts, sizes)]
    if stop == "first_exhausted":
        limit = min(range(len(sizes)), key=lambda i: ratios[i])
        counts = [min(c, n) for c, n in zip(_apportion(math.floor(ratios[limit] + 1e-9), p),
                                            sizes)]
        counts[limit] = sizes[limit]
        return counts
    raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")


def _default_names(datasets: Sequence[Dataset]) -> list[str]:
    names = [os.path.basename(os.path.normpath(d.root)) for d in datasets]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(d.root) for d in datasets]


class Mixture:
    """Several datasets read as one, with exact per-epoch counts (see the module docs).

    ``sources``: paths (dataset directories or ``manifest.json``) or :class:`Source`.
    Either ``weights`` (or ``Source.weight``) with a stopping rule -- ``stop=
    "exhaust_all"`` (default), ``"first_exhausted"`` or a fixed ``epoch_size`` --
    or per-source ``repeat`` / ``samples`` (plain paths then count once).
    ``window``: interleave window in slots (proportions are exact per window).
    """

    def __init__(self, sources: Sequence[Any], weights: Sequence[float] | None = None, *,
                 stop: str | None = None, epoch_size: int | None = None,
                 names: Sequence[str] | None = None, window: int = 1024) -> None:
        if isinstance(sources, (str, os.PathLike)) or not len(sources):
            raise ValueError("a mixture needs a non-empty list of sources")
        srcs = [s if isinstance(s, Source) else Source(s) for s in sources]
        if weights is not None:
            if len(weights) != len(srcs):
                raise ValueError(f"{len(weights)} weights for {len(srcs)} sources")
            if any(s.weight is not None for s in srcs):
                raise ValueError("give weights either in weights= or in Source(weight=), "
                                 "not both")
            srcs = [Source(s.path, float(w), s.repeat, s.samples, s.name)
                    for s, w in zip(srcs, weights)]
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if epoch_size is not None and epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1, got {epoch_size}")
        self.datasets = [open_source(s.path) for s in srcs]
        self.sizes = [d.manifest.num_samples for d in self.datasets]
        for s, n in zip(srcs, self.sizes):
            if n == 0:
                raise ValueError(f"mixture source {s.path!r} is empty")
        self.names = self._names(srcs, names)
        self.window = window
        self.stop = stop
        self.epoch_size = epoch_size
        self.counts = self._counts(srcs, stop, epoch_size)
        self.num_samples = sum(self.counts)
        if self.num_samples == 0:
            raise ValueError("every source contributes 0 samples per epoch")

    def _names(self, srcs: Sequence[Source], names: Sequence[str] | None) -> list[str]:
        if names is not None and len(names) != len(srcs):
            raise ValueError(f"{len(names)} names for {len(srcs)} sources")
        default = _default_names(self.datasets)
        out = [str(names[i]) if names is not None else s.name or default[i]
               for i, s in enumerate(srcs)]
        if len(set(out)) != len(out):
            raise ValueError(f"source names must be unique, got {out}; pass names=")
        return out

    def _counts(self, srcs: Sequence[Source], stop: str | None,
                epoch_size: int | None) -> list[int]:
        weighted = [s.weight is not None for s in srcs]
        for s in srcs:
            if (s.weight is not None) + (s.repeat is not None) + (s.samples is not None) > 1:
                raise ValueError(f"source {s.path!r}: give one of weight, repeat or samples")
            if s.weight is not None and not (math.isfinite(s.weight) and s.weight > 0):
                raise ValueError(f"source {s.path!r}: weight must be a finite number > 0, got "
                                 f"{s.weight!r} (drop a source rather than weighting it 0)")
            if s.repeat is not None and not (math.isfinite(s.repeat) and s.repeat >= 0):
                raise ValueError(f"source {s.path!r}: repeat must be >= 0, got {s.repeat!r}")
            if s.samples is not None and s.samples < 0:
                raise ValueError(f"source {s.path!r}: samples must be >= 0, got {s.samples!r}")
        if any(weighted):
            if not all(weighted):
                raise ValueError("give every source a weight, or none (then use repeat/"
                                 "samples per source)")
            if stop is not None and epoch_size is not None:
                raise ValueError("give stop= or epoch_size=, not both")
            if stop is not None and stop not in STOP_RULES:
                raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
            return epoch_counts(self.sizes, [s.weight for s in srcs],  # type: ignore[misc]
                                stop=stop or "exhaust_all", epoch_size=epoch_size)
        if stop is not None or epoch_size is not None:
            raise ValueError("stop= and epoch_size= apply to weighted mixtures; give weights, "
                             "or drop them and size sources with repeat/samples")
        return [s.samples if s.samples is not None else round((1.0 if s.repeat is None
                                                               else s.repeat) * n)
                for s, n in zip(srcs, self.sizes)]

    @property
    def proportions(self) -> list[float]:
        """Each source's exact share of an epoch (``counts[i] / num_samples``)."""
        return [c / self.num_samples for c in self.counts]

    def signature(self) -> list[list[Any]]:
        """What a resume state must match: [name, size, count] per source, and the window."""
        return [[n, s, c] for n, s, c in zip(self.names, self.sizes, self.counts)] + \
            [["window", self.window]]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {c}/{s}" for n, c, s in zip(self.names, self.counts, self.sizes))
        return f"Mixture({parts}; {self.num_samples} samples per epoch)"


class MixtureReader:
    """Reads positions of one epoch's mixed G: interleave, then each source's own order.

    All sources' shards sit in one :class:`BlockReader` (one block cache of
    ``cache_bytes``); a batch is read in (shard, ordinal) order, in one call.
    ``source_field``: when set, each sample gets its source index (int) there.
    ``order(block_firsts)``: the sequence to read (a node's, see
    :class:`~shardstream.read.mixorder.MixSequence`); default: the whole epoch's.
    """

    def __init__(self, mixture: Mixture, *, epoch: int, seed: int, shuffle: bool,
                 block_shuffle: bool, shuffle_buffer: int, on_error: str, cache_bytes: int,
                 on_skip: Callable[[int], None] | None = None, verify_blocks: bool | None = None,
                 source_field: str | None = None, remote: Any = None,
                 order: Callable[[Callable[[int], np.ndarray]], Any] | None = None) -> None:
        self.epoch = epoch
        self.source_field = source_field
        refs = [shard_refs(d) for d in mixture.datasets]
        self.offsets = np.cumsum([0] + [len(r) for r in refs[:-1]])
        self.reader = BlockReader([ref for rs in refs for ref in rs], on_error=on_error,
                                  cache_bytes=cache_bytes, on_skip=on_skip, remote=remote,
                                  verify_blocks=verify_blocks)
        if order is None:
            self.order = MixSequence(mixture, epoch=epoch, seed=seed, shuffle=shuffle,
                                     block_shuffle=block_shuffle, shuffle_buffer=shuffle_buffer,
                                     block_firsts=self.reader.block_firsts)
        else:
            self.order = order(self.reader.block_firsts)

    def read(self, positions: np.ndarray, narrow: bool = False) -> list[Any]:
        """Decoded samples at ``positions`` of G (``None`` where skipped after errors);
        ``narrow``: packed arrays stay narrow (see :mod:`shardstream.format.codec`)."""
        shards, local = self.order.locate(positions)
        n = len(shards)
        idx = np.argsort((shards << 40) | local, kind="stable")
        got = self.reader.read(shards[idx], local[idx], narrow=narrow)
        out: list[Any] = [None] * n
        for k, sample in zip(idx.tolist(), got):
            out[k] = sample
        if self.source_field is not None:
            src = np.searchsorted(self.offsets, shards, side="right") - 1
            for sample, i in zip(out, src.tolist()):
                if sample is not None:
                    sample[self.source_field] = i
        return out

    def close(self) -> None:
        self.reader.close()
