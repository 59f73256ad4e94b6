"""Decompression bombs and hostile codec input (issue #14): every bad input ends in a
shardstream error naming what is wrong, before anything large is allocated."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import tracemalloc
import zipfile
from types import SimpleNamespace
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import zstandard

from shardstream.errors import CorruptShardError, DecodeError
from shardstream.format import limits, members
from shardstream.format.codec import NDARRAY_EXT, PACKED_EXT, decode_sample, iter_samples
from shardstream.format.encode import encode_sample
from shardstream.format.frames import (FrameDecoder, checked_decompress, decompress_block,
                                       split_frames)
from shardstream.format.members import decode_member
from shardstream.pytorch.random_access import ShardDataset
from shardstream.read.dataset import iter_dataset
from shardstream.write.scan import scan_block_tar

pytestmark = pytest.mark.fuzz

GiB = 1 << 30
SMALL = 4 << 20  # the most a refused input may make the reader allocate


def _peak(fn: Callable[[], Any], exc: type[Exception], match: str) -> int:
    """Run ``fn``, which must raise ``exc`` matching ``match``; the traced memory peak."""
    tracemalloc.start()
    try:
        with pytest.raises(exc, match=match):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------- zstd frames
def _frame(data: bytes, **kw: Any) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True, write_dict_id=False, **kw).compress(data)


def _declaring(frame: bytes, size: int) -> bytes:
    """``frame`` (of < 1 KiB content) with a header declaring ``size`` content bytes."""
    fhd = frame[4]
    single, fcs_flag = fhd >> 5 & 1, fhd >> 6
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    body = frame[5 + (0 if single else 1) + fcs_len:]  # no dictionary id written
    # 8-byte content size, not single-segment: a 1 KiB window (content < 1 KiB)
    return frame[:4] + bytes([0xC0 | fhd & 0x04, 0x00]) + struct.pack("<Q", size) + body


PAYLOAD = b"hostile frames " * 40
FRAME = _frame(PAYLOAD)
WHERE = "shard s.tar: block 0"


def test_frame_helper_keeps_frames_valid() -> None:
    """The crafting helper only changes the declared size."""
    same = _declaring(FRAME, len(PAYLOAD))
    assert zstandard.frame_content_size(same) == len(PAYLOAD)
    assert zstandard.ZstdDecompressor().decompress(same) == PAYLOAD
    assert zstandard.frame_content_size(_declaring(FRAME, 3 * GiB)) == 3 * GiB


def test_huge_declared_size_agreed_by_the_index_is_refused_before_allocating() -> None:
    bomb = _declaring(FRAME, 3 * GiB)
    peak = _peak(lambda: decompress_block("zstd", bomb, 3 * GiB, where=WHERE),
                 CorruptShardError, f"{WHERE}: {3 * GiB} uncompressed bytes declared, more "
                                    "than the")
    assert peak < SMALL
    # within the block limit, but more than zstd can expand those bytes to
    big = _declaring(FRAME, 512 << 20)
    d = zstandard.ZstdDecompressor()
    peak = _peak(lambda: checked_decompress(d.decompress, big, 512 << 20, lambda: WHERE),
                 CorruptShardError, rf"{WHERE}: {512 << 20} uncompressed bytes declared for "
                                    rf"{len(big)} stored bytes, more than zstd can expand")
    assert peak < SMALL


def test_declared_size_must_match_the_index() -> None:
    d = zstandard.ZstdDecompressor()
    with pytest.raises(CorruptShardError, match=f"{WHERE}: the zstd frame declares {3 * GiB} "
                                                f"bytes, the index {len(PAYLOAD)}"):
        checked_decompress(d.decompress, _declaring(FRAME, 3 * GiB), len(PAYLOAD), lambda: WHERE)
    nosize = _frame(PAYLOAD, write_content_size=False)
    with pytest.raises(CorruptShardError, match=f"{WHERE}: the zstd frame does not declare its "
                                                "size"):
        checked_decompress(d.decompress, nosize, len(PAYLOAD), lambda: WHERE)


@pytest.mark.parametrize("damage", ["magic", "truncated", "short"])
def test_damaged_frames_name_the_block(damage: str) -> None:
    bad = {"magic": b"\x00" + FRAME[1:], "truncated": FRAME[:-6], "short": FRAME[:3]}[damage]
    with pytest.raises(CorruptShardError, match=f"^{WHERE}"):
        decompress_block("zstd", bad, len(PAYLOAD), where=WHERE)
    with pytest.raises(CorruptShardError, match=f"^{WHERE}"):
        split_frames(bad, b"", where=WHERE)


# ------------------------------------------------- rebuilding an index from a shard alone
def _tar(path: str, members_: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members_:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


BLOCK = encode_sample({"id": 1, "x": np.zeros(8)})


def test_rebuild_of_a_real_zstd_bomb_is_refused_over_the_limit(tmp_path, monkeypatch) -> None:
    """A real frame of 32 MiB of zeros (about 1 KB stored): over a 4 MiB block limit it
    is refused before decompressing, frame by frame (format v3) or whole (format v2)."""
    monkeypatch.setattr(limits, "MAX_BLOCK_RAW_BYTES", SMALL)
    bomb = _frame(b"\0" * (32 << 20))
    assert len(bomb) < 2000
    v3 = _tar(str(tmp_path / "v3.tar"), [("zstd.dict", b""), ("000000.ssb.zst", _frame(BLOCK) +
                                                             bomb)])
    assert _peak(lambda: scan_block_tar(v3), CorruptShardError,
                 rf"shard {v3}: block 0, frame 1 at byte \d+: {32 << 20} uncompressed bytes "
                 f"declared, more than the {SMALL}") < SMALL
    three = _frame(b"\0" * (3 << 20))  # each frame under the limit, both together over it
    v3 = _tar(str(tmp_path / "v3b.tar"), [("zstd.dict", b""), ("000000.ssb.zst", three * 2)])
    assert _peak(lambda: scan_block_tar(v3), CorruptShardError,
                 rf"shard {v3}: block 0 \(frames 0..1\): {6 << 20} uncompressed bytes "
                 "declared") < SMALL
    v2 = _tar(str(tmp_path / "v2.tar"), [("000000.ssb.zst", bomb)])
    assert _peak(lambda: scan_block_tar(v2), CorruptShardError,
                 f"shard {v2}: block 0: {32 << 20} uncompressed bytes declared") < SMALL


def test_rebuild_refuses_frames_without_a_size_or_with_a_lying_one(tmp_path) -> None:
    nosize = _frame(BLOCK, write_content_size=False)
    path = _tar(str(tmp_path / "n.tar"), [("zstd.dict", b""), ("000000.ssb.zst", nosize)])
    with pytest.raises(CorruptShardError, match=f"shard {path}: block 0, frame 0 at byte 0: "
                                                "the zstd frame does not declare its size"):
        scan_block_tar(path)
    # a header declaring fewer bytes than the frame holds: zstd stops at the declared size
    real = _frame(b"\0" * (8 << 20))
    lie = _declaring(_frame(b"x"), 100)[:14] + real[zstandard.frame_header_size(real):]
    path = _tar(str(tmp_path / "l.tar"), [("zstd.dict", b""), ("000000.ssb.zst", lie)])
    assert _peak(lambda: scan_block_tar(path), CorruptShardError,
                 f"shard {path}: block 0, frame 0 at byte 0 cannot be decompressed") < SMALL


def _dictionary() -> bytes:
    rng = np.random.default_rng(0)
    words = [f"w{i}x" for i in range(400)]
    samples = [" ".join(words[j] for j in rng.integers(0, 400, 40)).encode() for _ in range(600)]
    return zstandard.train_dictionary(4096, samples).as_bytes()


def test_damaged_dictionary_is_a_corrupt_shard(tmp_path) -> None:
    good = _dictionary()
    bad = b"\x00" + good[1:]  # flipped magic
    c = zstandard.ZstdCompressor(write_checksum=True, write_dict_id=False,
                                 dict_data=zstandard.ZstdCompressionDict(good))
    frame = c.compress(BLOCK)
    ok = _tar(str(tmp_path / "ok.tar"), [("zstd.dict", good), ("000000.ssb.zst", frame)])
    assert scan_block_tar(ok).num_samples == 1
    path = _tar(str(tmp_path / "d.tar"), [("zstd.dict", bad), ("000000.ssb.zst", frame)])
    with pytest.raises(CorruptShardError, match=f"shard {path}: block 0: the zstd dictionary "
                                                f"\\({len(bad)} bytes\\) is damaged"):
        scan_block_tar(path)
    # the reader's dictionary comes from the index: damaged there, the decoder says so
    t = SimpleNamespace(**{k: np.zeros(1, np.int64) for k in
                           ("first", "block", "rel_start", "raw_start")},
                        rel_end=np.array([len(frame)]), raw_end=np.array([len(BLOCK)]),
                        block_frame=np.array([0, 1]))
    index = SimpleNamespace(frame_table=lambda: t, num_samples=1, dictionary=good)
    assert FrameDecoder(index, "s.tar").frame(0, frame) == BLOCK
    index.dictionary = bad
    with pytest.raises(CorruptShardError, match="shard s.tar: its index: the zstd dictionary"):
        FrameDecoder(index, "s.tar")


def _stub_index(frames: list[bytes], raw_end: list[int]) -> SimpleNamespace:
    """A one-block framed index whose frames hold one sample each (raw_end from the test)."""
    ends = np.cumsum([len(f) for f in frames])
    t = SimpleNamespace(first=np.arange(len(frames)), block=np.zeros(len(frames), np.int64),
                        rel_start=ends - [len(f) for f in frames], rel_end=ends,
                        raw_start=np.array([0] + raw_end[:-1]), raw_end=np.array(raw_end),
                        block_frame=np.array([0, len(frames)]))
    return SimpleNamespace(frame_table=lambda: t, num_samples=len(frames), dictionary=b"")


def test_block_sizes_a_lying_index_declares_are_bounded_before_allocating() -> None:
    f = _frame(BLOCK)
    ok = FrameDecoder(_stub_index([f, f], [len(BLOCK), 2 * len(BLOCK)]), "s.tar")
    assert ok.decode(0, f + f) == BLOCK * 2
    lying = FrameDecoder(_stub_index([f, f], [len(BLOCK), 200 << 20]), "s.tar")
    assert _peak(lambda: lying.decode(0, f + f), CorruptShardError,
                 rf"^shard s.tar: block 0, frame 1 .*: the zstd frame declares {len(BLOCK)} "
                 rf"bytes, the index {(200 << 20) - len(BLOCK)}") < SMALL
    huge = FrameDecoder(_stub_index([f, f], [len(BLOCK), 2 * GiB]), "s.tar")
    assert _peak(lambda: huge.decode(0, f + f), CorruptShardError,
                 f"^shard s.tar: block 0: {2 * GiB} uncompressed bytes declared, more than "
                 f"the {GiB}") < SMALL


def test_legit_highly_compressible_samples_never_trip_the_bounds(make_dataset) -> None:
    """zstd's best ratio (zeros) stays under MAX_ZSTD_RATIO: such data reads back."""
    path = make_dataset(3, "zeros", make=lambda i: {"id": i, "z": np.zeros(1 << 20)},
                        compression="zstd")
    got = list(iter_dataset(path))
    assert [s["id"] for s in got] == [0, 1, 2] and all(not s["z"].any() for s in got)
    assert ShardDataset(path)[2]["z"].shape == (1 << 20,)
    for name in sorted(os.listdir(path)):
        if name.endswith(".tar"):
            assert scan_block_tar(os.path.join(path, name)).num_samples >= 1


# ---------------------------------------------------------------- npz / npy members
def _npz(arrays: dict[str, np.ndarray], compressed: bool = True) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def test_npz_still_decodes() -> None:
    a, b = np.arange(10, dtype=np.int32), np.ones((2, 3))
    for compressed in (True, False):
        out = decode_member("x.npz", _npz({"a": a, "b": b}, compressed))
        assert out.keys() == {"a", "b"} and np.array_equal(out["a"], a)
        assert np.array_equal(out["b"], b) and out["b"].flags.writeable


def test_npz_bomb_is_refused_before_inflating(monkeypatch) -> None:
    bomb = _npz({"z": np.zeros(16 << 20, np.uint8)})  # 16 MiB of zeros
    assert len(bomb) < 40_000
    monkeypatch.setattr(members, "NPZ_MAX_BYTES", 1 << 20)
    assert _peak(lambda: decode_member("x.npz", bomb, where="shard t.tar: sample 'k' member "
                                       "'x.npz'"), DecodeError,
                 r"^shard t.tar: sample 'k' member 'x.npz' \('x.npz'\) cannot be decoded: "
                 r".npz entries declare \d+ bytes or more, over the 1048576-byte limit") < SMALL


def _patch_sizes(data: bytes, size: int) -> bytes:
    """An npz (one entry) whose local and central headers declare ``size`` bytes."""
    b = bytearray(data)
    struct.pack_into("<I", b, 22, size)  # local header: uncompressed size
    cd = b.rindex(b"PK\x01\x02")
    struct.pack_into("<I", b, cd + 24, size)  # central directory: uncompressed size
    return bytes(b)


@pytest.mark.parametrize("compressed", [True, False])
def test_npz_with_a_lying_size_header(compressed: bool) -> None:
    data = _npz({"a": np.arange(1000)}, compressed)
    assert len(zipfile.ZipFile(io.BytesIO(data)).infolist()) == 1
    big = _patch_sizes(data, 0xFFFF0000)  # ~4 GiB from a few KB
    assert _peak(lambda: decode_member("x.npz", big), DecodeError,
                 r"entry 'a.npy' declares 4294901760 bytes from \d+ compressed") < SMALL
    small = _patch_sizes(data, 200)  # less than the entry holds: never read past it
    with pytest.raises(DecodeError, match=r"\('x.npz'\) cannot be decoded"):
        decode_member("x.npz", small)


def test_npz_entry_with_a_huge_npy_header() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.npy", _npy_bytes("{'descr': '<f8', 'fortran_order': False, "
                                       "'shape': (1000000000000,), }", b"\0" * 64))
    assert _peak(lambda: decode_member("x.npz", buf.getvalue()), DecodeError,
                 r"shape \(1000000000000,\) of float64 \(8000000000000 bytes\), the data "
                 "holds 64") < SMALL


def _npy_bytes(header: str, payload: bytes, version: int = 1) -> bytes:
    h = header.encode("latin1")
    lenlen = 2 if version == 1 else 4
    pad = 64 - (8 + lenlen + len(h) + 1) % 64
    h += b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + len(h).to_bytes(lenlen, "little") + h + payload


def _hdr(descr: str, shape: str, fortran: bool = False) -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"


@pytest.mark.parametrize("data, match", [
    (_npy_bytes(_hdr("'<i8'", "(-1,)"), b"\0" * 80), r"bad .npy shape \(-1,\)"),
    (_npy_bytes(_hdr("'<i8'", "(1099511627776, 1099511627776)"), b"\0" * 8),
     r"shape \(1099511627776, 1099511627776\) of int64"),
    (_npy_bytes(_hdr("'<i8'", "(100000000, 100)", True), b"\0" * 8), "truncated or damaged"),
    (_npy_bytes(_hdr("'|O'", "(1,)"), b"\0" * 8), "object arrays"),
    (_npy_bytes(_hdr("[('a', '<i4'), ('b', '|O')]", "(1,)"), b"\0" * 12), "object arrays"),
    (_npy_bytes(_hdr("'<i8'", "(True,)"), b"\0" * 8), r"bad .npy shape \(True,\)"),
    (_npy_bytes(_hdr("'|V0'", "(5,)"), b""), "has no size"),
    (_npy_bytes(_hdr("'<i8'", "(2,)"), b"")[:12], "bad .npy header"),
    (b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{'descr'", "bad .npy header"),  # 2 GiB header length
    (_npy_bytes("{'descr': " + "[" * 5000 + "]" * 5000 + "}", b""), "bad .npy header"),
    (b"\x93NUMP", "bad magic"),
], ids=["negative-dim", "product-overflow", "fortran-huge", "object", "struct-object", "bool-dim",
        "zero-itemsize", "truncated-header", "2GiB-header-len", "deep-header", "bad-magic"])
def test_crafted_npy_headers(data: bytes, match: str) -> None:
    for _ in range(2):  # the second time from the header cache, if cached at all
        assert _peak(lambda: decode_member("a.npy", data), DecodeError,
                     rf"^member \('a.npy'\) cannot be decoded: .*{match}") < SMALL


def test_cached_npy_header_still_checks_the_length() -> None:
    arr = np.arange(100, dtype=np.int64)
    buf = io.BytesIO()
    np.save(buf, arr)
    assert np.array_equal(decode_member("a.npy", buf.getvalue()), arr)
    with pytest.raises(DecodeError, match="the data holds 792"):
        decode_member("a.npy", buf.getvalue()[:-8])


@pytest.mark.parametrize("ext, data, match", [
    ("a.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("a.json", b'{"a": \xff}', "UnicodeDecodeError|JSONDecodeError"),
    ("a.txt", b"caf\xe9", "UnicodeDecodeError"),
    ("a.cls", b"seven", "ValueError"),
    ("a.cls", b"9" * 100_000, "ValueError"),
    ("a.msgpack", b"\x91" * 100_000 + b"\xc0", "nested deeper than 1024 levels"),
    ("a.mpk", b"\xdd\xff\xff\xff\xff\xc0", "exceeds max_array_len"),
    ("a.mpk", b"\xdf\xff\xff\xff\xff\xc0", "exceeds max_map_len"),
    ("a.mp", b"\xdb\xff\xff\xff\xff" + b"x" * 10, "incomplete input"),
    ("a.msg", b"\xc6\xff\xff\xff\xff" + b"x" * 10, "incomplete input"),
    ("a.msgpack", b"\x81\x90\xc0", "unhashable"),
], ids=["json-deep", "json-utf8", "txt-utf8", "cls-text", "cls-digits", "msgpack-deep",
        "array32", "map32", "str32", "bin32", "list-key"])
def test_hostile_members(ext: str, data: bytes, match: str) -> None:
    assert _peak(lambda: decode_member(ext, data, where=f"sample 'k' member {ext!r}"),
                 DecodeError, f"^sample 'k' member {ext!r} .*cannot be decoded: .*{match}"
                 ) < SMALL


# ---------------------------------------------------------------- msgpack ext types
def _ext(code: int, payload: bytes) -> bytes:
    return msgpack.packb({"a": msgpack.ExtType(code, payload)})


def _packed(own: str, stored: str, values: bytes, shape: tuple[int, ...] = (8,)) -> bytes:
    own_b, st_b = np.dtype(own).str.encode(), np.dtype(stored).str.encode()
    return _ext(PACKED_EXT, bytes([1, len(own_b)]) + own_b + bytes([len(st_b)]) + st_b +
                bytes([len(shape)]) + struct.pack(f"<{len(shape)}Q", *shape) + values)


@pytest.mark.parametrize("own, stored", [("<f8", "u1"), ("<i2", "<i4"), ("<u4", "i1"),
                                         ("<i8", "<f4"), ("<i8", "<i8"), ("<i8", ">i2")])
@pytest.mark.parametrize("narrow", [False, True])
def test_bad_packed_arrays_fail_every_time(own: str, stored: str, narrow: bool) -> None:
    """The header is checked before it is cached: the same bytes never pass later."""
    data = _packed(own, stored, bytes(8 * np.dtype(stored).itemsize))
    for _ in range(3):
        with pytest.raises(DecodeError, match=f"packed array stored as {np.dtype(stored)} "
                                              f"for dtype {np.dtype(own)}"):
            decode_sample(data, narrow=narrow)


def test_good_packed_arrays_still_decode() -> None:
    ids = np.arange(100, 300, dtype=np.int64)
    data = encode_sample({"ids": ids}, pack=True)
    for _ in range(2):
        out = decode_sample(data)["ids"]
        assert out.dtype == np.int64 and np.array_equal(out, ids)


def _nd(dtype: bytes, shape: tuple[int, ...], values: bytes) -> bytes:
    return _ext(NDARRAY_EXT, bytes([1, len(dtype)]) + dtype + bytes([len(shape)]) +
                struct.pack(f"<{len(shape)}Q", *shape) + values)


@pytest.mark.parametrize("data, match", [
    (_nd(b"|O", (1,), bytes(8)), "dtype object is not allowed"),
    (_nd(b"<i4,<i4", (1,), bytes(8)), "is not allowed"),
    (_nd(b"[('a', '|O')]", (1,), bytes(8)), "bad ndarray dtype"),
    (_nd(b"<M8[ns]", (1,), bytes(8)), "is not allowed"),
    (_nd(b"<i3", (1,), bytes(3)), "bad ndarray dtype"),
    (_nd(b"\xff\xfe", (1,), bytes(3)), "bad ndarray dtype"),
    (_nd(b"<i4", (1 << 32, 1 << 32), bytes(16)), "does not match its data bytes"),
    (_nd(b"<i4", ((1 << 64) - 1, 0), b""), "Maximum allowed dimension"),
    (_nd(b"<i4", (1,) * 200, bytes(4)), "malformed ndarray"),
    (_nd(b"<i4", (1 << 62,), bytes(16)), "does not match its data bytes"),
    (_ext(NDARRAY_EXT, b"\x01\x03<i4\x01\x05"), "malformed ndarray"),  # truncated shape
    (_ext(NDARRAY_EXT, b"\x02\x03<i4\x01" + bytes(8)), "unknown ndarray layout 2"),
    (_ext(9, b"x"), "unknown msgpack ext type 9"),
], ids=["object", "struct", "struct-object", "datetime", "i3", "non-ascii", "shape-product",
        "huge-dim", "ndim-200", "huge-1d", "truncated-shape", "layout", "ext-code"])
def test_bad_ndarrays(data: bytes, match: str) -> None:
    for decode in (decode_sample, lambda d: decode_member("x.msgpack", d)):
        for _ in range(2):
            assert _peak(lambda: decode(data), DecodeError, match) < SMALL


def test_short_payload_after_a_cached_header() -> None:
    """A header the fast path knows, then too few bytes: a DecodeError, not struct.error."""
    good = encode_sample({"a": np.arange(20, dtype=np.int32)})
    assert decode_sample(good)["a"].sum() == 190
    short = _ext(NDARRAY_EXT, b"\x01\x03<i4\x01" + bytes(6))  # 6 of the length's 8 bytes
    packed = encode_sample({"a": np.arange(20, dtype=np.int64)}, pack=True)
    assert decode_sample(packed)["a"].sum() == 190
    p_short = _ext(PACKED_EXT, b"\x01\x03<i8\x03|u1\x01" + bytes(5))
    for data in (short, p_short):
        for decode in (decode_sample, lambda d: decode_member("x.msgpack", d)):
            with pytest.raises(DecodeError, match="malformed|does not match"):
                decode(data)


@pytest.mark.parametrize("data, match", [
    (b"\x81\xa1a" + b"\x91" * 5000 + b"\xc0", "nested deeper than 1024 levels"),
    (b"\x81\xa1a" + b"\x81\xa1a" * 5000 + b"\xc0", "nested deeper than 1024 levels"),
    (b"\x81\xa1a\xdb\xff\xff\xff\xff" + b"x" * 10, "incomplete input"),
    (b"\x81\xa1a\xc6\xff\xff\xff\xff" + b"x" * 10, "incomplete input"),
    (b"\x81\xa1a\xdd\xff\xff\xff\xff" + b"\xc0" * 10, "exceeds max_array_len"),
    (b"\x81\xa1a\xdf\xff\xff\xff\xff" + b"\xc0" * 10, "exceeds max_map_len"),
    (b"\x81\xa1a\xc9\xff\xff\xff\xff\x01" + b"x" * 10, "exceeds max_ext_len"),
    (b"\x81\x01\xc0", "int is not allowed for map key"),
], ids=["deep-list", "deep-map", "str32", "bin32", "array32", "map32", "ext32", "int-key"])
def test_hostile_msgpack_samples(data: bytes, match: str) -> None:
    assert _peak(lambda: decode_sample(data), DecodeError, f"^not a valid sample: .*{match}"
                 ) < SMALL
    with pytest.raises(DecodeError, match=f"not a valid block: .*{match}|block ends inside"):
        list(iter_samples(data + encode_sample({"b": 1})))



def test_writer_refuses_compressed_blocks_readers_would_refuse(tmp_path) -> None:
    """A compressed block over the readers' 1 GiB bound is refused when writing, not reading."""
    from shardstream import ShardWriter
    from shardstream.format.limits import MAX_BLOCK_RAW_BYTES

    with pytest.raises(ValueError, match="at most .* when compressing"):
        ShardWriter(str(tmp_path / "big"), block_bytes=MAX_BLOCK_RAW_BYTES + 1, compression="zstd")
    assert not (tmp_path / "big").exists()
    with ShardWriter(str(tmp_path / "raw"), block_bytes=MAX_BLOCK_RAW_BYTES + 1) as w:
        w.write({"a": 1})  # raw blocks carry no declared raw size: any block_bytes <= 2**31


def test_rebuilding_a_block_of_zeros_refuses_the_first_byte(tmp_path) -> None:
    """A compressed block of zeros passes every size bound; the rebuild must not then
    record one 'sample' per zero byte (each byte is a valid msgpack int)."""
    from shardstream.errors import CorruptShardError
    from shardstream.write.scan import _sample_offsets

    with pytest.raises(CorruptShardError, match=r"block 3 is damaged: byte 0 \(0x00\)"):
        _sample_offsets(b"\0" * (1 << 20), "x.tar", 3)
    good = b"".join(msgpack.packb({"a": i}) for i in range(3))
    assert _sample_offsets(good, "x.tar", 0) == [0, 4, 8]
