"""Codec: exact round trips (property tests), arrays, tensors, and clear errors."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shardstream import DecodeError, EncodeError, decode_sample, encode_sample, iter_samples
from shardstream.format.codec import NDARRAY_EXT, PACKED_EXT
from shardstream.format.encode import repack

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.one_of(st.none(), st.booleans(), INT64, st.floats(allow_nan=True),
                    st.text(), st.binary())
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=20)
samples = st.dictionaries(st.text(max_size=12), values, max_size=8)

DTYPES = st.one_of(hnp.boolean_dtypes(), hnp.integer_dtypes(endianness="="),
                   hnp.unsigned_integer_dtypes(endianness="="),
                   hnp.floating_dtypes(endianness="="), hnp.complex_number_dtypes(endianness="="),
                   hnp.integer_dtypes(endianness=">"), hnp.floating_dtypes(endianness=">"))
arrays = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))


def same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN and tuples as lists."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(samples)
def test_plain_values_round_trip_exactly(sample):
    assert same(sample, decode_sample(encode_sample(sample)))


@settings(max_examples=300, deadline=None)
@given(arrays)
def test_arrays_round_trip_with_dtype_and_shape(arr):
    out = decode_sample(encode_sample({"a": arr}))["a"]
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype.newbyteorder("<") or out.dtype == arr.dtype
    assert out.dtype.byteorder in "<|="
    np.testing.assert_array_equal(out, arr)


def test_non_contiguous_and_big_endian_inputs_are_normalised():
    base = np.arange(24, dtype=">f8").reshape(4, 6)
    view = base[::2, ::3]
    out = decode_sample(encode_sample({"x": view}))["x"]
    assert out.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(out, view)
    fortran = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    np.testing.assert_array_equal(decode_sample(encode_sample({"f": fortran}))["f"], fortran)


def test_decoded_arrays_are_zero_copy_views_of_the_sample_bytes():
    out = decode_sample(encode_sample({"x": np.arange(1000, dtype=np.int64)}))["x"]
    assert not out.flags.owndata and not out.flags.writeable
    assert isinstance(out.base, bytes)


def test_zero_d_and_empty_arrays():
    s = {"scalar": np.array(3.5, dtype=np.float32), "empty": np.zeros((0, 7), np.uint8)}
    out = decode_sample(encode_sample(s))
    assert out["scalar"].shape == () and out["scalar"] == np.float32(3.5)
    assert out["empty"].shape == (0, 7) and out["empty"].dtype == np.uint8


def test_cpu_tensors_travel_as_arrays():
    t = torch.arange(12, dtype=torch.float16).reshape(3, 4).t()  # non-contiguous
    out = decode_sample(encode_sample({"t": t, "g": torch.ones(2, requires_grad=True)}))
    np.testing.assert_array_equal(out["t"], t.numpy())
    assert out["t"].dtype == np.float16
    np.testing.assert_array_equal(out["g"], np.ones(2, np.float32))


def test_numpy_scalars_become_python_scalars():
    out = decode_sample(encode_sample({"i": np.int32(7), "f": np.float32(0.5), "b": np.bool_(1)}))
    assert out == {"i": 7, "f": 0.5, "b": True}
    assert type(out["i"]) is int and type(out["b"]) is bool


def test_int64_range_edges_round_trip():
    s = {"lo": -(2**63), "hi": 2**64 - 1, "nan": float("nan"), "inf": float("-inf")}
    out = decode_sample(encode_sample(s))
    assert out["lo"] == -(2**63) and out["hi"] == 2**64 - 1
    assert math.isnan(out["nan"]) and out["inf"] == float("-inf")


@pytest.mark.parametrize("sample, path", [
    ({"meta": {"tags": {1, 2}}}, "meta.tags"),
    ({"a": [1, 2, {"b": object()}]}, "a[2].b"),
    ({"big": 2**64}, "big"),
    ({"neg": -(2**63) - 1}, "neg"),
    ({"x": {"y": {3: "int key"}}}, "x.y.3"),
    ({"l": [{"ok": 1}, {(1, 2): 0}]}, "l[1].(1, 2)"),
    ({"s": np.array(["a", "b"])}, "s"),
    ({"o": np.array([object()])}, "o"),
    ({"bf": torch.ones(2, dtype=torch.bfloat16)}, "bf"),
    ({"e": msgpack.ExtType(1, b"forged")}, "e"),
    ({"t": [1, msgpack.Timestamp(0)]}, "t[1]"),
])
def test_unencodable_values_name_sample_and_field_path(sample, path):
    with pytest.raises(EncodeError) as info:
        encode_sample(sample, key="k42")
    assert info.value.path == path
    assert "'k42'" in str(info.value) and path in str(info.value)


def test_sample_must_be_a_dict():
    with pytest.raises(EncodeError, match="must be a dict"):
        encode_sample([1, 2])  # type: ignore[arg-type]


def test_decode_never_unpickles_and_rejects_unknown_ext():
    import pickle

    evil = msgpack.packb({"x": msgpack.ExtType(99, pickle.dumps(object))}, use_bin_type=True)
    with pytest.raises(DecodeError, match="unknown msgpack ext type 99"):
        decode_sample(evil)


@pytest.mark.parametrize("payload", [
    b"", b"\x02\x03<i4\x01", b"\x01\x03|O8\x00", b"\x01\x03<i4\x01" + (5).to_bytes(8, "little"),
])
def test_malformed_ndarray_ext_is_a_decode_error(payload):
    data = msgpack.packb({"x": msgpack.ExtType(NDARRAY_EXT, payload)})
    with pytest.raises(DecodeError):
        decode_sample(data)


@pytest.mark.parametrize("cut", [1, 3, 8, 12])
def test_damaged_1d_array_after_fast_path_warmup_is_a_decode_error(cut):
    good = encode_sample({"x": np.arange(10, dtype=np.int32)})
    decode_sample(good)  # primes the fast path for this header
    ext = msgpack.unpackb(good, ext_hook=lambda c, d: msgpack.ExtType(c, d))["x"]
    damaged = msgpack.packb({"x": msgpack.ExtType(NDARRAY_EXT, ext.data[:-cut])})
    with pytest.raises(DecodeError):
        decode_sample(damaged)


@pytest.mark.parametrize("data", [b"\xc1", b"\x81\xa1", msgpack.packb([1, 2])])
def test_garbage_is_a_decode_error(data):
    with pytest.raises(DecodeError):
        decode_sample(data)


def test_iter_samples_decodes_a_block_in_order():
    blobs = [encode_sample({"i": i, "a": np.full(i, i)}) for i in range(5)]
    out = list(iter_samples(b"".join(blobs)))
    assert [s["i"] for s in out] == list(range(5))
    np.testing.assert_array_equal(out[3]["a"], [3, 3, 3])
    with pytest.raises(DecodeError, match="truncated"):
        list(iter_samples(b"".join(blobs)[:-3]))
    with pytest.raises(DecodeError):
        list(iter_samples(b"".join(blobs) + b"\xc1"))


# ---------------------------------------------------------------- packed integers (frames)
INT_ARRAYS = hnp.arrays(
    st.one_of(hnp.integer_dtypes(endianness="="), hnp.unsigned_integer_dtypes(endianness="="),
              hnp.integer_dtypes(endianness=">")),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=20))


@settings(max_examples=300, deadline=None)
@given(INT_ARRAYS)
def test_packed_int_arrays_round_trip_exactly(arr):
    """pack=True (inside compressed frames) narrows int arrays; decoding restores the dtype."""
    out = decode_sample(encode_sample({"a": arr, "n": [arr]}, pack=True))
    for got in (out["a"], out["n"][0]):
        assert got.shape == arr.shape
        assert got.dtype == arr.dtype.newbyteorder("<") or got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)


@settings(max_examples=200, deadline=None)
@given(samples)
def test_pack_changes_nothing_without_int_arrays(sample):
    assert encode_sample(sample, pack=True) == encode_sample(sample)


@pytest.mark.parametrize("values, stored", [
    ([0, 255] * 8, "u1"), ([-128, 127] * 8, "i1"), ([0, 65535] * 8, "<u2"),
    ([-1, 40000] * 8, "<i4"), ([0, 2**32 - 1] * 8, "<u4"), ([-(2**31), 2**31 - 1] * 8, "<i4"),
    ([0, 2**63 - 1] * 8, None), ([0, 2**64 - 1] * 8, None)])
def test_packing_picks_the_narrowest_type_that_fits(values, stored):
    arr = np.array(values, dtype=np.uint64 if max(values) >= 2**63 else np.int64)
    data = encode_sample({"x": arr}, pack=True)
    obj = msgpack.unpackb(data, ext_hook=lambda code, payload: (code, payload))
    code, payload = obj["x"]
    if stored is None:
        assert code == NDARRAY_EXT
    else:
        assert code == PACKED_EXT and stored.encode() in payload
    out = decode_sample(data)["x"]
    assert out.dtype == arr.dtype and out.tolist() == values


def test_packed_tensors_and_short_arrays():
    t = torch.arange(100, dtype=torch.int64)
    out = decode_sample(encode_sample({"t": t, "short": np.arange(3)}, pack=True))
    assert out["t"].dtype == np.int64 and out["t"].tolist() == list(range(100))
    assert out["short"].tolist() == [0, 1, 2]  # too short to narrow: stored as is
    assert len(encode_sample({"t": t}, pack=True)) < len(encode_sample({"t": t})) // 4


def test_repack_both_ways_is_exact():
    s = {"id": 7, "ids": np.arange(1000, dtype=np.int32), "f": np.ones(3, np.float32)}
    plain = encode_sample(s)
    packed = repack(plain, True)
    assert len(packed) < len(plain) and repack(packed, False) == plain


@pytest.mark.parametrize("cut", [1, 4, 9, 20])
def test_damaged_packed_array_is_a_decode_error(cut):
    data = encode_sample({"x": np.arange(50, dtype=np.int64)}, pack=True)
    decode_sample(data)  # warm the fast path
    obj = msgpack.unpackb(data, ext_hook=lambda code, payload: (code, payload))
    payload = obj["x"][1]
    bad = msgpack.packb({"x": msgpack.ExtType(PACKED_EXT, payload[:-cut])})
    with pytest.raises(DecodeError):
        decode_sample(bad)
    bad = msgpack.packb({"x": msgpack.ExtType(PACKED_EXT, payload[:cut])})
    with pytest.raises(DecodeError):
        decode_sample(bad)
