"""Columnar collation rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardstream.pytorch import wire as C
from shardstream.pytorch import wire as pytorch_wire
from shardstream.pytorch.collation import Collate, collate


def test_scalars_default_dtypes():
    b = collate([{"i": 1, "f": 0.5, "b": True}, {"i": 2, "f": 1.5, "b": False}])
    assert b["i"].dtype == torch.int64 and b["i"].tolist() == [1, 2]
    assert b["f"].dtype == torch.float32 and b["f"].tolist() == [0.5, 1.5]
    assert b["b"].dtype == torch.bool and b["b"].tolist() == [True, False]


def test_int_float_mix_is_float_and_dtypes_configurable():
    c = Collate(int_dtype=torch.int32, float_dtype=torch.float64)
    b = c([{"i": 1, "x": 1}, {"i": 2, "x": 2.5}])
    assert b["i"].dtype == torch.int32 and b["x"].dtype == torch.float64
    assert b["x"].tolist() == [1.0, 2.5]


def test_equal_shapes_stack_keep_dtype():
    arrs = [np.full((2, 3), i, dtype=np.uint8) for i in range(4)]
    b = collate([{"a": a} for a in arrs])
    assert b["a"].shape == (4, 2, 3) and b["a"].dtype == torch.uint8 and "a_lengths" not in b
    assert b["a"][3].sum().item() == 18
    b["a"][0, 0, 0] = 9  # writable, not a view on read-only decoded bytes


def test_ragged_padded_with_lengths():
    vals = [np.arange(n, dtype=np.int32) + 1 for n in (3, 1, 0, 4)]
    b = Collate(pad_value=-1)([{"t": v} for v in vals])
    assert b["t"].dtype == torch.int32 and b["t"].shape == (4, 4)
    assert b["t"].tolist() == [[1, 2, 3, -1], [1, -1, -1, -1], [-1] * 4, [1, 2, 3, 4]]
    assert b["t_lengths"].dtype == torch.int64 and b["t_lengths"].tolist() == [3, 1, 0, 4]
    assert "t_lengths" not in Collate(lengths=False)([{"t": v} for v in vals])


def test_ragged_2d_pads_first_dim_and_other_shapes_list():
    b = collate([{"t": np.ones((n, 2), np.float32)} for n in (1, 3)])
    assert b["t"].shape == (2, 3, 2) and b["t"][0, 1:].sum().item() == 0
    odd = collate([{"t": np.ones((2, 2))}, {"t": np.ones((2, 3))}])
    assert isinstance(odd["t"], list) and odd["t"][1].shape == (2, 3)


def test_tensors_and_cast_arrays():
    b = Collate(cast_arrays=True)([{"t": torch.arange(3, dtype=torch.int16)},
                                   {"t": torch.arange(3, dtype=torch.int16)}])
    assert b["t"].dtype == torch.int64 and b["t"].shape == (2, 3)


def test_strings_bytes_lists_nested():
    b = collate([{"s": "a", "y": b"x", "l": [1, 2], "m": {"k": 1, "n": {"v": 0.5}}},
                 {"s": "b", "y": b"z", "l": [3], "m": {"k": 2, "n": {"v": 1.5}}}])
    assert b["s"] == ["a", "b"] and b["y"] == [b"x", b"z"] and b["l"] == [[1, 2], [3]]
    assert b["m"]["k"].tolist() == [1, 2] and b["m"]["n"]["v"].dtype == torch.float32


def test_none_and_missing_fields_become_lists():
    b = collate([{"a": 1, "b": None}, {"a": None, "b": None}, {"a": 3, "c": "only"}])
    assert b["a"] == [1, None, 3] and b["b"] == [None, None, None]
    assert b["c"] == [None, None, "only"]


def test_numpy_scalars_and_huge_ints():
    b = collate([{"x": np.float64(1.5), "h": 2**70}, {"x": np.float64(2.5), "h": 1}])
    assert b["x"].tolist() == [1.5, 2.5] and b["h"] == [2**70, 1]


def test_errors():
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(TypeError):
        Collate(int_dtype="int64")


def test_wire_round_trip():
    from shardstream.pytorch.collation import Ragged
    from shardstream.pytorch.wire import from_wire, to_wire

    vals = [{"t": np.arange(n, dtype=np.int16), "s": "x"} for n in (2, 4)]
    packed = collate(vals, ragged=True)
    assert isinstance(packed["t"], Ragged)
    wire = to_wire(packed)
    assert isinstance(wire["t_lengths"], np.ndarray)
    back = from_wire(wire)
    assert back["t"].tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]] and back["s"] == ["x", "x"]
    assert torch.equal(back["t"], collate(vals)["t"])


def _as_worker(monkeypatch):
    """Make to_wire behave as in a DataLoader worker, with a fresh slot ring."""
    

    monkeypatch.setattr(C, "_in_worker", lambda: True)
    monkeypatch.setattr(C, "_ring", None)
    monkeypatch.setattr(C, "_SHM_MIN_BYTES", 0)
    return C


def _ship(obj):
    """Pickle as the DataLoader's result queue does, and unpickle."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

    return ForkingPickler.loads(ForkingPickler.dumps(obj))


def test_shm_wire_round_trip_and_release(monkeypatch):
    import gc

    C = _as_worker(monkeypatch)
    vals = [{"t": np.arange(n, dtype=np.int32), "f": 0.5 * n, "s": "x" * n,
             "m": {"a": np.ones(3, np.uint8)}} for n in (3, 1, 0, 5)]
    expect = collate(vals)
    wire = pytorch_wire.to_wire(collate(vals))
    assert type(wire) is pytorch_wire._Wire and wire.slot is not None
    ring = pytorch_wire._ring
    assert ring.slots[0][2][0] == 1  # busy
    back = pytorch_wire.from_wire(_ship(wire))
    for k in ("t", "t_lengths", "f"):
        assert torch.equal(back[k], expect[k]) and back[k].dtype == expect[k].dtype
    assert torch.equal(back["m"]["a"], expect["m"]["a"]) and back["s"] == expect["s"]
    back["t"][0, 0] = 7  # writable
    t_view = back["t"][1:]  # a view keeps the slot busy too
    del back
    gc.collect()
    assert ring.slots[0][2][0] == 1
    assert t_view.tolist() == expect["t"][1:].tolist()
    del t_view
    gc.collect()
    assert ring.slots[0][2][0] == 0  # free again once nothing refers to the batch
    # the slot is reused, sent only once
    again = pytorch_wire.to_wire(collate(vals))
    assert type(again) is pytorch_wire._Wire and again.slot is None and again.key == wire.key
    assert torch.equal(pytorch_wire.from_wire(_ship(again))["t"], expect["t"])


def test_shm_ring_full_falls_back_to_pipe_and_kept_batches_stay(monkeypatch):
    C = _as_worker(monkeypatch)
    monkeypatch.setattr(C, "_SHM_MAX_SLOTS", 2)
    kept, expect = [], []
    for i in range(5):
        vals = [{"t": np.full(n, i, dtype=np.int64)} for n in (i + 3, 2)]
        expect.append(collate(vals))
        wire = pytorch_wire.to_wire(collate(vals))
        assert (type(wire) is pytorch_wire._Wire) == (i < 2)  # two slots, both held below
        kept.append(pytorch_wire.from_wire(_ship(wire)))
    for got, exp in zip(kept, expect):
        assert torch.equal(got["t"], exp["t"]) and torch.equal(got["t_lengths"], exp["t_lengths"])
    # a bigger batch grows a free slot in place
    del kept[0]
    big = [{"t": np.arange(100_000, dtype=np.int64)}]
    wire = pytorch_wire.to_wire(collate(big))
    assert type(wire) is pytorch_wire._Wire and wire.slot is not None
    assert torch.equal(pytorch_wire.from_wire(_ship(wire))["t"][0], torch.arange(100_000))


def test_shm_small_batches_and_switch_off(monkeypatch):
    C = _as_worker(monkeypatch)
    monkeypatch.setattr(C, "_SHM_MIN_BYTES", 1 << 20)
    assert type(pytorch_wire.to_wire(collate([{"i": 1}]))) is dict  # small: through the pipe
    monkeypatch.setattr(C, "_SHM_MIN_BYTES", 0)
    monkeypatch.setattr(C, "_SHM_ENABLED", False)
    assert type(pytorch_wire.to_wire(collate([{"t": np.ones(10)}]))) is dict


def test_pad_value_the_dtype_cannot_hold_names_the_field():
    vals = [np.arange(n, dtype=np.uint8) for n in (3, 1)]
    with pytest.raises(ValueError, match=r"field 't': pad_value -1 does not fit its dtype uint8"):
        Collate(pad_value=-1)([{"t": v} for v in vals])
    with pytest.raises(ValueError, match="pad_value 300"):
        Collate(pad_value=300)([{"t": v} for v in vals], ragged=True)
    b = Collate(pad_value=255)([{"t": v} for v in vals])  # the top of the range is fine
    assert b["t"].tolist() == [[0, 1, 2], [0, 255, 255]]
    same = [np.arange(3, dtype=np.uint8)] * 2  # equal shapes: stacked, nothing padded
    assert Collate(pad_value=-1)([{"t": v} for v in same])["t"].shape == (2, 3)
