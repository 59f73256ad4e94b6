"""Packed integer arrays left narrow until collation (``narrow=``): the batch must be
exactly the one collated from fully decoded samples, dtypes included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstream.format.codec import decode_sample, iter_samples, narrowed, widen
from shardstream.format.encode import encode_sample
from shardstream.pytorch import collation as pytorch_collation
from shardstream.pytorch.collation import Collate, Ragged, collate
from shardstream.pytorch.stream import ShardStream

INT_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]


def _same(a, b) -> None:
    """Equal trees: tensors/arrays equal with the same dtype, containers recursively."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, Ragged):
        _same(a.pad(), b.pad())
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


@st.composite
def int_array(draw, shape=None, dtype=None):
    dt = np.dtype(dtype or draw(st.sampled_from(INT_DTYPES)))
    info = np.iinfo(dt)
    lo, hi = draw(st.sampled_from([(0, 200), (-100, 100), (0, 60_000), (-40_000, 40_000),
                                   (int(info.min), int(info.max))]))
    lo, hi = max(lo, int(info.min)), min(hi, int(info.max))
    if shape is None:
        shape = (draw(st.integers(0, 24)),)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.integers(lo, hi, size=shape, dtype=dt, endpoint=True)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 6))
    ids_dtype = draw(st.sampled_from(INT_DTYPES))
    fixed = draw(st.booleans())
    out = []
    for i in range(n):
        s = {"i": i,
             "ids": draw(int_array(shape=(16,) if fixed else None, dtype=ids_dtype)),
             "m": draw(int_array(shape=(draw(st.integers(0, 5)), 3), dtype="int32")),
             "nest": {"x": draw(int_array(dtype="int64"))},
             "lst": [draw(int_array()), "txt"],
             "mixed": draw(int_array())}  # dtype differs between samples
        if draw(st.booleans()) and i:
            del s["ids"]
        out.append(s)
    return out


COLLATES = [Collate(), Collate(pad_value=-1), Collate(pad_value=7), Collate(cast_arrays=True),
            Collate(missing="mask")]


@settings(max_examples=150, deadline=None)
@given(batches(), st.sampled_from(range(len(COLLATES))), st.booleans())
def test_narrow_batches_equal_widened_batches(samples, which, ragged):
    c = COLLATES[which]
    data = [encode_sample(s, pack=True) for s in samples]
    narrow = [decode_sample(d, narrow=True) for d in data]
    try:
        expected = _padded(c([decode_sample(d) for d in data], ragged=ragged))
    except ValueError:  # a pad value the written dtype cannot hold: the same error
        with pytest.raises(ValueError, match="pad_value"):
            _padded(c(narrow, ragged=ragged, narrow=True))
        return
    _same(_padded(c(narrow, ragged=ragged, narrow=True)), expected)


def _padded(tree):
    """``Ragged`` values padded (as the main process does)."""
    if isinstance(tree, Ragged):
        return tree.pad()
    if isinstance(tree, dict):
        return {k: _padded(v) for k, v in tree.items()}
    return tree


def test_narrow_decoding_tags_packed_arrays_only():
    ids = np.arange(100, 400, dtype=np.int64)
    m = np.arange(12, dtype=np.int32).reshape(3, 4)  # not 1-d: the slow path
    data = encode_sample({"ids": ids, "m": m, "f": np.ones(9, np.float32),
                          "short": np.arange(3)}, pack=True)
    for _ in range(2):  # the second time through the fast path
        s = decode_sample(data, narrow=True)
        assert s["ids"].dtype == np.uint16 and narrowed(s["ids"]) == np.int64
        assert s["m"].dtype == np.uint8 and s["m"].shape == (3, 4) and narrowed(s["m"]) == np.int32
        assert narrowed(s["f"]) is None and narrowed(s["short"]) is None
        assert s["short"].dtype == np.int64
        w = widen(s)
        assert w["ids"].dtype == np.int64 and np.array_equal(w["ids"], ids) and narrowed(w["ids"]) is None
        assert w["m"].dtype == np.int32 and np.array_equal(w["m"], m)
    assert narrowed(decode_sample(data)["ids"]) is None  # the default: widened on decode
    got = list(iter_samples(data + data, narrow=True))
    assert all(g["ids"].dtype == np.uint16 for g in got)
    b = collate(got, narrow=True)
    assert b["ids"].dtype == torch.int64 and b["ids"][1].tolist() == ids.tolist()
    assert b["m"].dtype == torch.int32 and b["m"][0].tolist() == m.tolist()


def test_widen_walks_lists_and_dicts_in_place():
    a = decode_sample(encode_sample({"a": np.arange(300, dtype=np.int32)}, pack=True),
                      narrow=True)["a"]
    tree = {"l": [a, {"d": a}], "x": 1}
    widen(tree)
    assert tree["l"][0].dtype == np.int32 and tree["l"][1]["d"].dtype == np.int32
    other = np.arange(3, dtype=np.uint16)  # not decoded narrow: left as it is
    assert widen(other) is other


def _tokens(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"id": i, "ids": rng.integers(0, 50_000, int(rng.integers(8, 40)), dtype=np.int32),
            "small": rng.integers(0, 100, 16, dtype=np.int64), "text": f"sample {i}"}


@pytest.mark.parametrize("kw", [{}, {"shuffle": True, "seed": 3, "block_shuffle": False},
                                {"collate": Collate(pad_value=-1)},
                                {"transform": lambda s: s}])
def test_stream_of_compressed_equals_raw(make_dataset, kw):
    raw = make_dataset(300, "raw", make=_tokens)
    zst = make_dataset(300, "zst", make=_tokens, compression="zstd")
    a = list(ShardStream(raw, batch_size=32, **kw))
    b = list(ShardStream(zst, batch_size=32, **kw))
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        _same(x, y)
    assert b[0]["ids"].dtype == torch.int32 and b[0]["small"].dtype == torch.int64


def test_stream_reads_narrow_only_for_its_own_collation(make_dataset, monkeypatch):
    zst = make_dataset(100, "zst", make=_tokens, compression="zstd")
    seen = []
    s = ShardStream(zst, batch_size=10, collate=lambda b: seen.extend(b) or len(b))
    assert list(s) == [10] * 10
    assert seen[0]["ids"].dtype == np.int32  # a user's collate sees the written dtype
    calls = []
    
    real = pytorch_collation.Collate._arrays

    def spy(self, out, key, vals, ragged, narrow=False):
        calls.append(narrow and any(narrowed(v) is not None for v in vals))
        return real(self, out, key, vals, ragged, narrow)

    monkeypatch.setattr(pytorch_collation.Collate, "_arrays", spy)
    list(ShardStream(zst, batch_size=10))
    assert calls and all(calls)


def test_padding_from_an_earlier_batch_is_widened(make_dataset):
    zst = make_dataset(40, "zst", make=_tokens, compression="zstd")
    s = ShardStream(zst, batch_size=4)
    from shardstream.read.dataset import iter_dataset
    first = next(iter_dataset(zst))
    kept = decode_sample(encode_sample(first, pack=True), narrow=True)
    assert kept["ids"].dtype == np.uint16
    s._finish([kept])
    later = s._finish([None, None])  # every sample of this batch was skipped
    assert all(x["ids"].dtype == np.int32 for x in later)
    _same(collate(later, narrow=True), collate([first, first]))


def test_loader_workers_send_widened_batches(make_dataset):
    from shardstream.pytorch.loader import loader
    raw = make_dataset(300, "raw", make=_tokens)
    zst = make_dataset(300, "zst", make=_tokens, compression="zstd")
    a = list(loader(ShardStream(raw, batch_size=32), num_workers=2))
    b = list(loader(ShardStream(zst, batch_size=32), num_workers=2))
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        _same(x, y)
