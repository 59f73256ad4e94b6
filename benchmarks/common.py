"""Measurement loops shared by the benchmarks (imported by their child processes too)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence


def epoch(loader: Iterable[dict], t0: float, *, key: str = "id") -> dict[str, float]:
    """One pass over ``loader``: samples, seconds since ``t0`` (so start-up counts),
    time to the first batch, and the steady rate after it, as the peer harness counts."""
    n, first, last = 0, None, 0
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        last = len(b[key])
        n += last
    seconds = time.perf_counter() - t0
    first = seconds if first is None else first
    steady = (n - last) / (seconds - first) if n > last and seconds > first else 0.0
    return {"n": n, "seconds": seconds, "first_batch_s": first, "samples_per_s": n / seconds,
            "steady_samples_per_s": steady}


def best_getitem_rate(ds: Any, idx: Sequence[int], rounds: int = 3) -> float:
    """``ds[i]`` over ``idx``: one untimed pass (page cache, page tables), best of ``rounds``."""
    for i in idx:
        ds[i]
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for i in idx:
            ds[i]
        best = max(best, len(idx) / (time.perf_counter() - t))
    return best
