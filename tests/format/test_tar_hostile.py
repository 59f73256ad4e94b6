"""Hostile tars and crafted webdataset indexes: every one a CorruptShardError naming the
file (and the byte offset of the bad header), within a short time, never a hang."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tarfile

import msgpack
import numpy as np
import pytest

from shardstream.errors import CorruptShardError
from shardstream.format.codec import decode_sample
from shardstream.format.encode import encode_sample
from shardstream.format.tar import list_members, list_members_tarfile
from shardstream.format.webdataset import load_any_index, load_foreign_index
from shardstream.write.reindex import build_index
from shardstream.write.scan import scan_foreign_tar

pytestmark = pytest.mark.fuzz

END = bytes(1024)


# ---------------------------------------------------------------- crafting tars
def header(name: bytes, size: int = 0, kind: bytes = b"0", *, size_field: bytes | None = None,
           checksum_delta: int = 0) -> bytes:
    """A ustar header with a correct checksum (plus ``checksum_delta``)."""
    h = bytearray(512)
    h[0:len(name[:100])] = name[:100]
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % (sum(h) + checksum_delta)
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return header(name, len(data), kind) + pad(data)


def record(key: bytes, value: bytes) -> bytes:
    """One well-formed pax record ``LEN KEY=VALUE\\n``."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def extended(records: bytes, kind: bytes = b"x") -> bytes:
    return header(b"PaxHeader", len(records), kind) + pad(records)


GOOD = member(b"a.txt", b"hello")  # 1024 bytes: whatever follows starts at byte 1024
B = member(b"b.txt", b"x")


def _cases() -> dict[str, tuple[bytes, int]]:
    """name -> (tar bytes, byte offset of the bad header)."""
    pax_bad = {
        "pax_length_zero": b"0 path=x\n",
        "pax_length_negative": b"-1536 path=x\n",
        "pax_length_not_a_number": b"ab path=x\n",
        "pax_length_past_blob": b"99 path=x\n",
        "pax_no_equals": b"12 pathxyzab\n",
        "pax_no_newline": record(b"path", b"c.txt")[:-1] + b"x",
        "pax_no_space": b"12path=c.txt",
        "pax_size_negative": record(b"size", b"-1536"),
        "pax_size_huge": record(b"size", b"9" * 30),
        "pax_size_not_a_number": record(b"size", b"abc"),
        "pax_size_past_eof": record(b"size", b"1000000"),
        "pax_path_nul": record(b"path", b"c\0d.txt"),
        "pax_path_newline": record(b"path", b"c\nd.txt"),
        "pax_path_not_utf8": record(b"path", b"\xff\xfe.txt"),
        "pax_path_dotdot": record(b"path", b"x/../../etc/passwd.txt"),
        "pax_path_absolute": record(b"path", b"/etc/passwd.txt"),
    }
    cases = {k: (GOOD + extended(v) + B + END, 1024) for k, v in pax_bad.items()}
    cases["pax_global_bad_record"] = (GOOD + extended(b"0 comment=x\n", b"g") + B + END, 1024)
    cases["pax_not_followed_by_member"] = (GOOD + extended(record(b"path", b"c.txt")) + END,
                                           1024)
    cases["pax_header_past_eof"] = (GOOD + header(b"PaxHeader", 1 << 40, b"x") + END, 1024)
    cases["pax_header_huge"] = (GOOD + header(b"PaxHeader", 3 << 20, b"x") + bytes(3 << 20)
                                + B + END, 1024)
    for kind in (b"L", b"K"):
        cases[f"gnu_{kind.decode()}_size_past_eof"] = (
            GOOD + header(b"././@LongLink", 10 ** 9, kind) + B + END, 1024)
    cases["gnu_long_name_empty"] = (GOOD + header(b"././@LongLink", 0, b"L") + B + END, 1024)
    cases["gnu_long_name_nul"] = (GOOD + member(b"././@LongLink", b"c\0d.txt\0", b"L") + B
                                  + END, 1024)
    cases["base256_size_negative"] = (GOOD + header(b"c.txt", size_field=b"\xff" * 12) + B
                                      + END, 1024)
    cases["base256_size_huge"] = (GOOD + header(b"c.txt", size_field=b"\x80" + b"\xff" * 11)
                                  + B + END, 1024)
    cases["octal_size_not_a_number"] = (GOOD + header(b"c.txt", size_field=b"0000000001x\0")
                                        + B + END, 1024)
    cases["octal_size_signed"] = (GOOD + header(b"c.txt", size_field=b"-0000000001\0") + B
                                  + END, 1024)
    cases["checksum_mismatch"] = (GOOD + header(b"c.txt", 1, checksum_delta=1) + pad(b"x") + END,
                                  1024)
    cases["size_past_eof"] = (GOOD + header(b"c.txt", 10 ** 6) + pad(b"x") + END, 1024)
    cases["data_runs_past_eof"] = (GOOD + header(b"c.txt", 2000) + bytes(700), 1024)
    cases["truncated_header"] = (GOOD + header(b"c.txt", 1)[:300], 1024)
    cases["no_end_marker"] = (GOOD + B, 2048)
    cases["half_end_marker"] = (GOOD + B + bytes(512), 2048)
    cases["sparse_member"] = (GOOD + member(b"c.txt", b"x", b"S") + END, 1024)
    cases["pax_sparse_member"] = (GOOD + extended(record(b"GNU.sparse.map", b"0,1")) + B + END,
                                  1024)
    for key, name in {"name_dotdot": b"../evil.txt", "name_absolute": b"/etc/evil.txt",
                      "name_control": b"a\x01b.txt", "name_del": b"a\x7fb.txt",
                      "name_not_utf8": b"\xff\xfe.txt", "name_inner_dotdot": b"x/../y.txt"
                      }.items():
        cases[key] = (GOOD + member(name, b"x") + END, 1024)
    cases["duplicate_name"] = (GOOD + B + member(b"a.txt", b"again") + END, 2048)
    return cases


CASES = _cases()


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (rather than hang) when the body runs longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the walk does not terminate")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write(tmp_path, name: str, data: bytes) -> str:
    path = str(tmp_path / f"{name}.tar")
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------- the header walker
def test_crafted_tars_are_well_formed_controls(tmp_path):
    """The helpers make tars tarfile and the walker read (so each case tests one defect)."""
    ext = GOOD + extended(record(b"path", b"c" * 150 + b".txt") + record(b"size", b"1"))
    path = write(tmp_path, "ok", ext + B + member(b"././@LongLink", b"d" * 120 + b".txt\0", b"L")
                 + header(b"ignored.txt", 1) + pad(b"y") + END)
    got = list_members(path)
    assert [m.name for m in got] == ["a.txt", "c" * 150 + ".txt", "d" * 120 + ".txt"]
    assert got == list_members_tarfile(path)
    assert [m.size for m in got] == [5, 1, 1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_tar_names_file_and_offset(tmp_path, case):
    data, offset = CASES[case]
    path = write(tmp_path, case, data)
    with deadline(5), pytest.raises(CorruptShardError) as err:
        list_members(path)
    msg = str(err.value)
    assert path in msg and re.search(rf"byte {offset}\b", msg), msg


@pytest.mark.parametrize("case", ["pax_length_zero", "pax_size_negative", "name_not_utf8",
                                  "pax_path_not_utf8", "pax_size_not_a_number"])
def test_hostile_tar_through_index(tmp_path, case):
    """``build_index`` (``shardstream index``) meets the same errors, not bare ones."""
    path = write(tmp_path, case, CASES[case][0])
    with deadline(5), pytest.raises(CorruptShardError, match=re.escape(path)):
        build_index([path], str(tmp_path / "idx"))


def test_cli_index_of_zero_length_pax_record_ends(tmp_path):
    """The reported 3 KB tar: ``shardstream index`` used to spin forever on it."""
    path = write(tmp_path, "zero", CASES["pax_length_zero"][0])
    assert os.path.getsize(path) <= 4096
    proc = subprocess.run([sys.executable, "-m", "shardstream", "index", path, "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "CorruptShardError" in proc.stderr and path in proc.stderr \
        and "byte 1024" in proc.stderr, proc.stderr


def test_negative_pax_size_does_not_loop_in_a_child(tmp_path):
    """Run where a regression can only time out: the old walk went backwards forever."""
    path = write(tmp_path, "neg", CASES["pax_size_negative"][0])
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from shardstream.format.tar import list_members\n"
            "from shardstream.errors import CorruptShardError\n"
            "try:\n    list_members(sys.argv[1])\n"
            "except CorruptShardError as e:\n    print('OK', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.startswith("OK") and "byte 1024" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("case", ["pax_size_negative", "pax_size_past_eof", "name_not_utf8",
                                  "pax_path_not_utf8", "name_dotdot", "name_absolute",
                                  "duplicate_name", "size_past_eof", "sparse_member",
                                  "checksum_mismatch", "no_end_marker"])
def test_tarfile_reference_refuses_too(tmp_path, case):
    path = write(tmp_path, case, CASES[case][0])
    with deadline(5), pytest.raises(CorruptShardError, match=re.escape(path)):
        list_members_tarfile(path)


def test_random_header_damage_never_escapes(tmp_path):
    """Seeded fuzz: damaged headers (checksums re-fixed half of the time) give members
    inside the file with clean names, or a CorruptShardError -- nothing else."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for k in range(6):
            ti = tarfile.TarInfo(f"s{k}/" + "é" * (k * 20) + f"k{k}.txt")
            ti.size = k * 300
            tf.addfile(ti, io.BytesIO(bytes(ti.size)))
    base = buf.getvalue()
    heads = [i for i in range(0, len(base) - 512, 512) if base[i + 257:i + 262] == b"ustar"]
    rng = random.Random(1234)
    path = str(tmp_path / "fuzz.tar")
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(base)
        h = rng.choice(heads)
        for _ in range(rng.randint(1, 4)):
            at = h + rng.choice([rng.randrange(512), 124 + rng.randrange(12),
                                 512 + rng.randrange(40)])
            data[at] = rng.choice([0, 0x20, 0x30, 0x37, 0x2D, 0xFF, rng.randrange(256)])
        if rng.random() < 0.5:
            blk = bytearray(data[h:h + 512])
            blk[148:156] = b" " * 8
            blk[148:156] = b"%06o\0 " % sum(blk)
            data[h:h + 512] = blk
        with open(path, "wb") as f:
            f.write(data)
        try:
            with deadline(5):
                got = list_members(path)
        except CorruptShardError as exc:
            assert path in str(exc)
            outcomes["refused"] += 1
            continue
        outcomes["ok"] += 1
        assert all(m.offset_data + m.size <= len(data) and m.size >= 0 for m in got)
        assert all(".." not in m.name.split("/") and "\0" not in m.name for m in got)
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes


def test_scan_foreign_tar_names_stay_data(tmp_path):
    """Names are never joined onto a path: an index of a tar with odd but legal names
    writes only ``<tar>.idx`` and the manifest."""
    path = write(tmp_path, "odd", member(b"dir/sub/k0.txt", b"a") + member(b"-k1.json", b"{}")
                 + member(b"k2 x.cls", b"3") + END)
    out = tmp_path / "out"
    build_index([path], str(out))
    assert sorted(os.listdir(out)) == ["manifest.json", "odd.tar.idx"]
    idx = scan_foreign_tar(path)
    assert [idx.key(j) for j in range(idx.num_samples)] == ["dir/sub/k0", "-k1", "k2 x"]


# ---------------------------------------------------------------- crafted foreign indexes
@pytest.fixture
def foreign_index(tmp_path):
    """(tar path, index dict) of a small valid webdataset tar."""
    parts = [member(f"k{j:03d}.{e}".encode(), str(j).encode()) for j in range(5)
             for e in ("cls", "txt")]
    path = write(tmp_path, "wds", b"".join(parts) + END)
    return path, decode_sample(scan_foreign_tar(path).to_bytes())


DELETE = object()


def _u8(values) -> np.ndarray:
    return np.array(values, dtype="<u8")


def _crafted(d: dict, size: int) -> dict[str, dict]:
    m = len(d["member_offset"])
    big = (1 << 64) - 16
    edits = {
        "not_a_map": None,
        "version_str": {"version": "1"},
        "num_samples_str": {"num_samples": "5"},
        "num_samples_float": {"num_samples": 5.0},
        "num_samples_bool": {"num_samples": True},
        "num_samples_negative": {"num_samples": -1},
        "num_samples_huge": {"num_samples": 10 ** 12},
        "shard_bytes_negative": {"shard_bytes": -1},
        "shard_bytes_str": {"shard_bytes": "big"},
        "sha256_int": {"shard_sha256": 7},
        "sha256_not_hex": {"shard_sha256": "z" * 64},
        "exts_str": {"exts": "cls"},
        "exts_int_items": {"exts": [1, 2]},
        "exts_slash": {"exts": ["cls", "../txt"]},
        "exts_duplicate": {"exts": ["cls", "cls"]},
        "key_blob_str": {"key_blob": "k000k001"},
        "key_blob_not_utf8": {"key_blob": b"\xff" * len(d["key_blob"])},
        "key_blob_control": {"key_blob": b"\x01" * len(d["key_blob"])},
        "key_offset_list": {"key_offset": list(range(6))},
        "key_offset_2d": {"key_offset": np.zeros((2, 3), "<u8")},
        "key_offset_float": {"key_offset": np.asarray(d["key_offset"], "<f8")},
        "key_offset_short": {"key_offset": d["key_offset"][:-1]},
        "key_offset_decreasing": {"key_offset": _u8([0, 8, 4, 12, 16, 20])},
        "key_offset_past_blob": {"key_offset": _u8([0, 4, 8, 12, 16, 99])},
        "member_first_unordered": {"member_first": _u8([0, 4, 2, 6, 8, 10])},
        "member_first_not_zero": {"member_first": _u8([1, 2, 4, 6, 8, 10])},
        "member_first_none": {"member_first": None},
        "member_offset_past_file": {"member_offset": _u8(list(d["member_offset"][:-1])
                                                         + [size + 1])},
        "member_offset_wraps": {"member_offset": _u8(list(d["member_offset"][:-1]) + [big]),
                                "member_size": _u8(list(d["member_size"][:-1]) + [32])},
        "member_size_huge": {"member_size": _u8([1 << 63] * m)},
        "member_size_negative": {"member_size": np.full(m, -1, "<i8")},
        "member_overlap": {"member_offset": _u8([512] * m)},
        "member_ext_out_of_range": {"member_ext": np.full(m, 7, "<u2")},
        "member_ext_length": {"member_ext": np.zeros(m + 1, "<u2")},
        "missing_field": {"member_size": DELETE},
    }
    out = {}
    for name, edit in edits.items():
        if edit is None:
            out[name] = [1, 2, 3]
            continue
        e = dict(d)
        for k, v in edit.items():
            if v is DELETE:
                del e[k]
            else:
                e[k] = v
        out[name] = e
    return out


def test_crafted_foreign_indexes_are_refused(foreign_index, tmp_path):
    path, d = foreign_index
    good = str(tmp_path / "good.idx")
    with open(good, "wb") as f:
        f.write(encode_sample(d, check=False))
    assert load_foreign_index(good).num_samples == 5  # the unedited dict is accepted
    failures = []
    for name, crafted in _crafted(d, os.path.getsize(path)).items():
        idx = str(tmp_path / f"{name}.idx")
        with open(idx, "wb") as f:
            f.write(encode_sample(crafted, check=False) if isinstance(crafted, dict)
                    else msgpack.packb(crafted))
        for load in (load_foreign_index, load_any_index):
            try:
                with deadline(5):
                    load(idx)
                failures.append(f"{name}: accepted")
            except CorruptShardError as exc:
                if idx not in str(exc):
                    failures.append(f"{name}: message does not name the file: {exc}")
            except Exception as exc:  # noqa: BLE001 - the point: nothing else escapes
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
