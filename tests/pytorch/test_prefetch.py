"""Tests for shardstream.pytorch.prefetch (CPU semantics here; GPU tests marked ``cuda``).

Run ``python tests/test_prefetch.py race-check DEPTH`` to run the GPU race
check standalone (used by the PYTORCH_NO_CUDA_MEMORY_CACHING test).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import subprocess
import sys
import traceback
import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from shardstream.pytorch import prefetch as prefetch_module
from shardstream.pytorch.prefetch import CUDAPrefetcher, PrefetchStats, to_device

HAS_CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
# semantic tests run on the CPU path everywhere and on the CUDA path when a GPU is present
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


class Pair(NamedTuple):
    a: Any
    b: Any


def make_batch(i: int, n: int = 1 << 10) -> dict[str, Any]:
    """Deterministic nested batch with tensor and non-tensor leaves (values exact in float32)."""
    x = ((torch.arange(n, dtype=torch.int64) * (i + 1) + 7 * i) % 1009).to(torch.float32)
    return {
        "x": x.reshape(8, -1),
        "nested": [torch.full((4,), i, dtype=torch.int64), ("meta", i)],
        "pair": Pair(torch.ones(3, dtype=torch.float16) * (i % 7), i),
        "name": f"b{i}",
        "np": np.arange(3) + i,
        "none": None,
    }


def pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pin(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(pin(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(pin(v) for v in batch)
    return batch


def check_same(out: Any, ref: Any) -> None:
    """Deep equality on the host (moves tensors to CPU)."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(out, torch.Tensor) and out.dtype == ref.dtype and out.shape == ref.shape
        assert torch.equal(out.cpu(), ref.cpu())
    elif isinstance(ref, dict):
        assert type(out) is type(ref) and out.keys() == ref.keys()
        for k in ref:
            check_same(out[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert type(out) is type(ref) and len(out) == len(ref)
        for a, b in zip(out, ref):
            check_same(a, b)
    elif isinstance(ref, np.ndarray):
        assert out is ref
    else:
        assert out == ref


def check_on(out: Any, device: torch.device) -> None:
    if isinstance(out, torch.Tensor):
        assert out.device == device
    elif isinstance(out, dict):
        for v in out.values():
            check_on(v, device)
    elif isinstance(out, (list, tuple)):
        for v in out:
            check_on(v, device)


class Source:
    """Re-iterable source whose passes are generators (records finally/close)."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.finalized = 0
        self.produced = 0
        self.error: Exception | None = None

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return self.failing_source()

    def failing_source(self):
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    self.error = RuntimeError(f"source failed at {i}")
                    raise self.error
                self.produced += 1
                yield make_batch(i)
        finally:
            self.finalized += 1


# ---------------------------------------------------------------- CPU / generic


def test_cpu_pass_through_same_objects():
    batches = [make_batch(i) for i in range(5)]
    p = CUDAPrefetcher(batches, "cpu")
    out = list(p)
    assert len(out) == 5 and all(o is b for o, b in zip(out, batches))
    assert p.device == torch.device("cpu") and not p.is_cuda


def test_no_cuda_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    for dev in (None, "cuda", "cuda:1", 0, torch.device("cuda", 0)):
        p = CUDAPrefetcher([make_batch(0)], dev)
        assert p.device == torch.device("cpu")
        (b,) = list(p)
        assert b["x"].device.type == "cpu"


def test_to_device_nesting_and_leaves():
    od = collections.OrderedDict(a=torch.ones(2), s="keep")
    dd = collections.defaultdict(list, {"t": torch.zeros(1)})
    arr = np.arange(4)
    names = ["a", "b"]
    batch = {"od": od, "dd": dd, "list": [torch.ones(1), names, None, 3], "tup": (torch.ones(1), arr),
             "pair": Pair(torch.ones(2), "x"), "plain": names}
    out = to_device(batch, "meta")
    assert type(out["od"]) is collections.OrderedDict and out["od"]["a"].device.type == "meta"
    assert out["od"]["s"] == "keep"
    assert type(out["dd"]) is collections.defaultdict and out["dd"].default_factory is list
    assert type(out["tup"]) is tuple and out["tup"][1] is arr
    assert type(out["pair"]) is Pair and out["pair"].a.device.type == "meta" and out["pair"].b == "x"
    assert out["list"][1] is names and out["list"][2] is None and out["list"][3] == 3
    assert out["plain"] is names  # untouched containers keep their identity
    assert batch["od"]["a"].device.type == "cpu"  # input not modified
    assert to_device(batch, "cpu") is batch
    assert to_device(torch.ones(1), "meta").device.type == "meta"
    assert to_device("text", "meta") == "text"


@pytest.mark.parametrize("device", DEVICES)
def test_nested_batches_round_trip(device):
    batches = [make_batch(i) for i in range(6)]
    with CUDAPrefetcher(batches, device, depth=3, pin_memory=False) as p:
        out = list(p)
    assert len(out) == 6
    for o, b in zip(out, batches):
        check_same(o, b)
        check_on(o, p.device)
        assert o["np"] is b["np"] and o["name"] == b["name"] and o["none"] is None


@pytest.mark.parametrize("device", DEVICES)
def test_transform_applied(device):
    calls = []

    def transform(b):
        calls.append(b["x"].device)
        return {**b, "x": b["x"].to(torch.float64) * 2}

    batches = [make_batch(i) for i in range(4)]
    out = list(CUDAPrefetcher(batches, device, transform=transform, pin_memory=False))
    assert len(calls) == 4 and all(d.type == torch.device(device).type for d in calls)
    for o, b in zip(out, batches):
        assert o["x"].dtype == torch.float64
        assert torch.equal(o["x"].cpu(), b["x"].to(torch.float64) * 2)


@pytest.mark.parametrize("device", DEVICES)
def test_early_close_runs_source_finally(device):
    src = Source(10)
    p = CUDAPrefetcher(src, device, depth=2, pin_memory=False)
    it = iter(p)
    next(it), next(it)
    assert src.finalized == 0
    p.close()
    assert src.finalized == 1
    with pytest.raises(StopIteration):
        next(it)
    p.close()  # idempotent
    assert src.produced <= 2 + 2
    assert len(list(p)) == 10  # a new pass works after close


@pytest.mark.parametrize("device", DEVICES)
def test_context_manager_closes(device):
    src = Source(10)
    with CUDAPrefetcher(src, device, pin_memory=False) as p:
        for i, _ in enumerate(p):
            if i == 2:
                break
    assert src.finalized == 1
    assert p.stats.batches == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_source_exception_after_preceding_batches(device, depth):
    src = Source(10, fail_at=3)
    p = CUDAPrefetcher(src, device, depth=depth, pin_memory=False)
    got = []
    with pytest.raises(RuntimeError, match="source failed at 3") as info:
        for b in p:
            got.append(b["nested"][1][1])
    assert got == [0, 1, 2]
    assert info.value is src.error
    names = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "failing_source" in names
    assert src.finalized == 1
    with pytest.raises(StopIteration):
        next(p)


@pytest.mark.parametrize("device", DEVICES)
def test_transform_exception_surfaces_at_its_batch(device):
    def transform(b):
        if b["name"] == "b2":
            raise KeyError("bad batch")
        return b

    src = Source(6)
    got = []
    with pytest.raises(KeyError, match="bad batch"):
        for b in CUDAPrefetcher(src, device, transform=transform, pin_memory=False):
            got.append(b["name"])
    assert got == ["b0", "b1"]
    assert src.finalized == 1


def test_len():
    assert len(CUDAPrefetcher([1, 2, 3], "cpu")) == 3
    assert len(CUDAPrefetcher(Source(7), "cpu")) == 7
    with pytest.raises(TypeError, match="len"):
        len(CUDAPrefetcher((i for i in range(3)), "cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_reiteration(device):
    src = Source(5)
    p = CUDAPrefetcher(src, device, pin_memory=False)
    first = [b["name"] for b in p]
    second = [b["name"] for b in p]
    assert first == second == [f"b{i}" for i in range(5)]
    it = iter(p)
    assert next(it)["name"] == "b0"
    assert src.finalized == 2
    assert [b["name"] for b in p] == first  # iter(p) restarts and closes the open pass
    assert src.finalized == 4
    gen = CUDAPrefetcher((make_batch(i) for i in range(3)), device, pin_memory=False)
    assert len(list(gen)) == 3 and list(gen) == []  # one-shot sources stay one-shot


def test_plain_iterator_next():
    p = CUDAPrefetcher([10, 20], "cpu")
    assert next(p) == 10 and next(p) == 20
    with pytest.raises(StopIteration):
        next(p)
    assert list(p) == [10, 20]


def test_stats_cpu():
    p = CUDAPrefetcher([make_batch(i) for i in range(4)], "cpu")
    assert p.stats == PrefetchStats(device="cpu")
    list(p)
    s = p.stats
    assert (s.batches, s.bytes_copied, s.copy_seconds, s.copy_bandwidth_gbps) == (4, 0, 0.0, 0.0)
    assert s.wait_seconds >= 0 and s.device == "cpu"
    assert "4 batches" in str(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batches = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 0}, {"depth": -1}, {"depth": 1.5}, {"depth": True}, {"depth": "2"},
        {"transform": 5}, {"non_blocking": "yes"}, {"pin_memory": None},
        {"device": "nonsense"}, {"device": "meta"}, {"device": -1}, {"device": 1.0},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CUDAPrefetcher([1], **kwargs)


def test_bad_iterable():
    with pytest.raises(ValueError, match="iterable"):
        CUDAPrefetcher(5)  # type: ignore[arg-type]


def test_bad_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "zero")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        CUDAPrefetcher([1])
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ValueError, match="cuda:5"):
        CUDAPrefetcher([1])


# ------------------------------------------- simulated CUDA (protocol checks on CPU)


class FakeCuda:
    """Stand-ins for torch.cuda streams/events that log every operation.

    Runs the prefetcher's CUDA code path on a CPU-only machine and lets the
    tests check the ordering protocol the real GPU relies on.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple] = []
        fake = self

        class Stream:
            def __init__(self, device: Any = None, priority: int = 0) -> None:
                self.name = "S" if fake.consumer_stream_ready else "C"

            def wait_event(self, event: Any) -> None:
                fake.log.append(("wait", self.name, event.where))

            def synchronize(self) -> None:
                fake.log.append(("sync", self.name))

        class Event:
            def __init__(self, enable_timing: bool = False, **kw: Any) -> None:
                self.where = None

            def record(self, stream: Any = None) -> None:
                self.where = (stream.name, len(fake.log))
                fake.log.append(("record", stream.name))

            def query(self) -> bool:
                return True

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, end: Any) -> float:
                return 2.0  # ms

        class StreamCtx:
            def __init__(self, stream: Any) -> None:
                self.stream = stream

            def __enter__(self) -> None:
                fake.current.append(self.stream)

            def __exit__(self, *exc: Any) -> None:
                fake.current.pop()

        self.consumer_stream_ready = False
        self.current = [Stream()]
        self.consumer_stream_ready = True
        orig_to = torch.Tensor.to

        def fake_to(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            dev = args[0] if args else kwargs.get("device")
            if isinstance(dev, torch.device) and dev.type == "cuda":
                fake.log.append(("copy", fake.current[-1].name))
                return t.clone()
            return orig_to(t, *args, **kwargs)

        def fake_pin(t: torch.Tensor) -> torch.Tensor:
            out = t.clone()
            out._fake_pinned = True  # type: ignore[attr-defined]
            return out

        m = monkeypatch
        m.setattr(prefetch_module, "_SIDE_STREAMS", {})  # never leak a fake stream into real tests
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "current_device", lambda: 0)
        m.setattr(torch.cuda, "device_count", lambda: 1)
        m.setattr(torch.cuda, "Stream", Stream)
        m.setattr(torch.cuda, "Event", Event)
        m.setattr(torch.cuda, "current_stream", lambda device=None: fake.current[-1])
        m.setattr(torch.cuda, "stream", StreamCtx)
        m.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        m.setattr(torch.Tensor, "to", fake_to)
        m.setattr(torch.Tensor, "is_pinned", lambda t: getattr(t, "_fake_pinned", False))
        m.setattr(torch.Tensor, "pin_memory", fake_pin)

    def check_protocol(self) -> None:
        """Every copy runs on S, after S waited on a fence recorded on C after the
        consumer's last action (so S cannot reuse memory C may still use)."""
        last_consume = -1
        fenced_after = -2
        for i, op in enumerate(self.log):
            if op[0] == "consume":
                last_consume = i
            elif op[0] == "wait" and op[1] == "S" and op[2][0] == "C":
                fenced_after = op[2][1]  # index at which the fence was recorded
            elif op[0] == "copy":
                assert op[1] == "S", f"copy #{i} not on the side stream"
                assert fenced_after > last_consume, f"copy #{i} not fenced after consumer op #{last_consume}"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_simulated_cuda_protocol(monkeypatch, depth):
    fake = FakeCuda(monkeypatch)
    streams_in_transform = []

    def transform(b):
        streams_in_transform.append(fake.current[-1].name)
        return b

    batches = [pin(make_batch(i)) for i in range(7)]
    p = CUDAPrefetcher(batches, depth=depth, transform=transform)
    assert p.is_cuda and p.device == torch.device("cuda", 0)
    for i, b in enumerate(p):
        # C waited on this batch's `ready` (recorded on S) before we got it
        waits = [op for op in fake.log if op[0] == "wait" and op[1] == "C"]
        assert len(waits) == i + 1 and waits[-1][2][0] == "S"
        fake.log.append(("consume", i))
        check_same(b, batches[i])
    fake.check_protocol()
    assert streams_in_transform == ["S"] * 7
    assert sum(op[0] == "copy" for op in fake.log) == 7 * 3
    s = p.stats
    assert s.batches == 7 and s.copy_seconds == pytest.approx(7 * 0.002)
    assert s.bytes_copied == sum(b["x"].nbytes + b["nested"][0].nbytes + b["pair"].a.nbytes for b in batches)
    assert s.copy_bandwidth_gbps == pytest.approx(s.bytes_copied / s.copy_seconds / 1e9)
    assert "GB/s" in str(s) and s.pinned_on_the_fly == 0


def test_simulated_cuda_read_ahead_close_and_errors(monkeypatch):
    fake = FakeCuda(monkeypatch)
    src = Source(10, fail_at=6)  # pageable tensors: pinned on the fly, one warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = CUDAPrefetcher(src, depth=3)
        it = iter(p)
        assert next(it)["name"] == "b0"
        assert src.produced == 4  # one handed out, `depth` in flight
        p.close()
        assert ("sync", "S") in fake.log and src.finalized == 1
        got = []
        with pytest.raises(RuntimeError, match="failed at 6") as info:
            for b in p:
                got.append(b["name"])
                fake.log.append(("consume", len(got)))
    assert got == [f"b{i}" for i in range(6)] and info.value is src.error
    assert len([w for w in caught if "pin_memory" in str(w.message)]) == 1
    assert p.stats.pinned_on_the_fly == 3 * (1 + 3 + 6)
    fake.check_protocol()


# ---------------------------------------------------------------- CUDA only


def race_check(depth: int, steps: int = 300, n: int = 1 << 18) -> None:
    """Stream/allocator race detector: every batch must equal a synchronous reference copy.

    The consumer modifies each batch in place and alternates between running a
    long matmul first (widens allocator-reuse races) and reading immediately
    (widens read-before-copy races). Raises AssertionError on any mismatch.
    """
    device = torch.device("cuda", torch.cuda.current_device())
    host = [pin(make_batch(i, n)) for i in range(steps)]
    refs = [to_device(b, device) for b in host]  # synchronous reference copies
    torch.cuda.synchronize(device)
    a = torch.randn(2048, 2048, device=device)
    c = torch.empty_like(a)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    seen = []
    with CUDAPrefetcher(iter(host), device, depth=depth) as p:
        for i, b in enumerate(p):
            if i % 2 == 0:
                for _ in range(3):
                    torch.matmul(a, a, out=c)
            ref = refs[i]
            b["x"].mul_(2)
            bad += (b["x"] != ref["x"] * 2).sum()
            bad += (b["nested"][0] != ref["nested"][0]).sum()
            bad += (b["pair"].a != ref["pair"].a).sum()
            b["nested"][0].add_(1)  # write too: a reused block would corrupt a later batch
            assert b["x"].device == device and b["name"] == f"b{i}" and b["nested"][1] == ("meta", i)
            seen.append(i)
    torch.cuda.synchronize(device)
    assert seen == list(range(steps)), "batches lost or reordered"
    assert bad.item() == 0, f"{bad.item()} mismatched elements (depth={depth})"


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_values_match_reference_under_races(depth):
    race_check(depth)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_values_without_caching_allocator():
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "race-check", "2"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "race-check ok" in proc.stdout


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_memory_flat(depth):
    device = torch.device("cuda", torch.cuda.current_device())
    steps, n = 2000, 1 << 16
    host = [pin({"x": torch.randn(n), "y": torch.arange(128)}) for _ in range(8)]
    batch_bytes = n * 4 + 128 * 8
    acc = torch.zeros((), device=device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    at100 = at_end = None
    p = CUDAPrefetcher((host[i % len(host)] for i in range(steps)), device, depth=depth)
    for i, b in enumerate(p):
        b["x"].mul_(2)
        acc += b["x"][:16].sum()
        if i == 100:
            at100 = torch.cuda.memory_allocated(device)
        if i == steps - 1:
            at_end = torch.cuda.memory_allocated(device)
    del b
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    assert at100 is not None and at_end is not None
    assert at_end <= at100 + batch_bytes, (at100, at_end)
    assert peak - base <= (depth + 2) * batch_bytes + (1 << 20), (peak - base, batch_bytes)
    p.close()
    assert torch.cuda.memory_allocated(device) - base <= 4096  # everything released
    assert p.stats.batches == steps


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_transform_runs_on_side_stream():
    device = torch.device("cuda", torch.cuda.current_device())
    consumer = torch.cuda.current_stream(device)
    streams = []

    def transform(b):
        streams.append(torch.cuda.current_stream(device))
        return {**b, "x": b["x"].to(torch.float16) / 2}

    host = [pin(make_batch(i)) for i in range(20)]
    for i, b in enumerate(CUDAPrefetcher(host, device, transform=transform)):
        assert b["x"].dtype == torch.float16 and b["x"].device == device
        assert torch.equal(b["x"].cpu(), host[i]["x"].to(torch.float16) / 2)
    assert len(streams) == 20 and all(s != consumer for s in streams)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_unpinned_source_warns_once():
    device = torch.device("cuda", torch.cuda.current_device())
    host = [make_batch(i) for i in range(6)]  # pageable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = CUDAPrefetcher(host, device)
        out = list(p)
        torch.cuda.synchronize(device)
    ours = [w for w in caught if "pin_memory" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert p.stats.pinned_on_the_fly == 6 * 3
    for o, b in zip(out, host):
        check_same(o, b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(CUDAPrefetcher(host, device, pin_memory=False))
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(CUDAPrefetcher([pin(b) for b in host], device))
    assert not [w for w in caught if "pin_memory" in str(w.message)]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_stats_bandwidth():
    device = torch.device("cuda", torch.cuda.current_device())
    host = [pin({"x": torch.randn(1 << 20), "y": torch.arange(10)}) for _ in range(10)]
    p = CUDAPrefetcher(host, device, depth=2)
    for b in p:
        b["x"].add_(1)
    s = p.stats
    assert s.batches == 10 and s.device == str(device)
    assert s.bytes_copied == 10 * ((1 << 20) * 4 + 10 * 8)
    assert s.copy_seconds > 0 and s.copy_bandwidth_gbps > 0
    assert "GB/s" in str(s)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_device_resolution(monkeypatch):
    idx = torch.cuda.current_device()
    assert CUDAPrefetcher([], idx).device == torch.device("cuda", idx)
    assert CUDAPrefetcher([], f"cuda:{idx}").device == torch.device("cuda", idx)
    assert CUDAPrefetcher([], "cuda").device == torch.device("cuda", idx)
    assert CUDAPrefetcher([], "cpu").device == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert CUDAPrefetcher([]).device == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")
    assert CUDAPrefetcher([]).device == torch.device("cuda", idx)
    with pytest.raises(ValueError):
        CUDAPrefetcher([], torch.cuda.device_count())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_close_mid_epoch_releases_memory():
    device = torch.device("cuda", torch.cuda.current_device())
    host = [pin({"x": torch.randn(1 << 18)}) for _ in range(20)]
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    p = CUDAPrefetcher(host, device, depth=4)
    it = iter(p)
    b = next(it)
    assert torch.cuda.memory_allocated(device) > base
    p.close()
    del b
    assert torch.cuda.memory_allocated(device) - base <= 4096
    assert [float(b["x"][0]) for b in p] == [float(h["x"][0]) for h in host]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "race-check":
        race_check(int(sys.argv[2]))
        print("race-check ok")
    else:
        sys.exit(f"usage: {sys.argv[0]} race-check DEPTH")
