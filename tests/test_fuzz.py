"""Seeded fuzzing of the readers: damaged datasets end in correct data or a
shardstream error that names the file; never a hang, a bare exception, a
``MemoryError``, wrong data, or a file touched outside the dataset.

Every case is a copy of a small clean dataset (raw and zstd-compressed
shardstream layouts, and indexed webdataset tars) with one mutation: bit flips
or a truncation of a shard, an index or the manifest. Each copy is read whole
by random access (``ShardDataset``), by streaming (``ShardStream``, in
process) and checked by ``verify``. Select with ``-m fuzz``; the whole file
runs in well under a minute.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import tarfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import pytest

import shardstream
from shardstream import ShardstreamError

pytestmark = pytest.mark.fuzz

SEED = 20261201
#: mutated copies per (layout, file kind, mutation)
CASES = 6
#: seconds one case may take before it counts as a hang
CASE_SECONDS = 20


def _clean_samples(n: int = 240) -> list[dict[str, Any]]:
    rng = np.random.default_rng(SEED)
    return [{"__key__": f"k{i:05d}",
             "input_ids": rng.integers(0, 50_000, size=int(rng.integers(1, 48)), dtype=np.int32),
             "label": i % 7, "text": "review " * int(rng.integers(1, 9)) + str(i)}
            for i in range(n)]


SAMPLES = _clean_samples()


def _write_own(path: str, compression: str | None) -> None:
    with shardstream.ShardWriter(path, max_samples=90, block_bytes=1024, prefix="part",
                                 compression=compression) as w:
        for s in SAMPLES:
            w.write(s)


def _write_webdataset(path: str) -> None:
    """Foreign tars as webdataset writes them: one member per field, then indexed."""
    os.makedirs(path)
    for t, lo in enumerate(range(0, len(SAMPLES), 100)):
        with tarfile.open(os.path.join(path, f"wds-{t:06d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
            for s in SAMPLES[lo:lo + 100]:
                for ext, data in (("ids.npy", _npy(s["input_ids"])),
                                  ("cls", str(s["label"]).encode()),
                                  ("txt", s["text"].encode())):
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    shardstream.build_index([os.path.join(path, n) for n in sorted(os.listdir(path))], path)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


LAYOUTS: dict[str, Callable[[str], None]] = {
    "raw": lambda p: _write_own(p, None),
    "zstd": lambda p: _write_own(p, "zstd"),
    "webdataset": _write_webdataset,
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[dict]]]:
    """layout -> (dataset dir, every sample as ShardDataset reads it when undamaged)."""
    out = {}
    for name, write in LAYOUTS.items():
        path = str(tmp_path_factory.mktemp("clean") / name)
        write(path)
        ds = shardstream.ShardDataset(path)
        out[name] = (path, [ds[i] for i in range(len(ds))])
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if type(a).__module__ == "torch" or type(b).__module__ == "torch":
        return _same(np.asarray(a), np.asarray(b))
    return type(a) is type(b) and a == b


@contextmanager
def _deadline(seconds: int, what: str) -> Iterator[None]:
    def hang(signum: int, frame: Any) -> None:
        raise AssertionError(f"{what}: still running after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _files(root: str) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with (size, mtime_ns): to see what a reader touched."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[os.path.join(d, n)] = (st.st_size, st.st_mtime_ns)
    return out


def _mutate(path: str, rng: random.Random, mutation: str) -> str:
    data = bytearray(open(path, "rb").read())
    if mutation == "truncate":
        cut = rng.randrange(len(data))
        del data[cut:]
        what = f"truncated to {cut} of {len(data)} bytes"
    else:
        flips = 1 if mutation == "flip1" else 8
        spots = [rng.randrange(len(data) * 8) for _ in range(flips)]
        for bit in spots:
            data[bit // 8] ^= 1 << (bit % 8)
        what = f"bits {spots} flipped"
    with open(path, "wb") as f:
        f.write(data)
    return what


def _target(root: str, kind: str, rng: random.Random) -> str:
    names = sorted(os.listdir(root))
    if kind == "manifest":
        return os.path.join(root, "manifest.json")
    pick = [n for n in names if n.endswith(".tar.idx" if kind == "index" else ".tar")]
    return os.path.join(root, rng.choice(pick))


def _check_error(exc: BaseException, root: str, target: str, case: str) -> None:
    assert isinstance(exc, ShardstreamError), \
        f"{case}: bare {type(exc).__name__}: {exc}"
    msg = str(exc)
    shard = os.path.basename(target).removesuffix(".idx")
    assert shard in msg or os.path.basename(target) in msg or root in msg, \
        f"{case}: {type(exc).__name__} names no file: {msg}"


def _read_random_access(root: str, expected: list[dict]) -> None:
    ds = shardstream.ShardDataset(root)
    assert len(ds) == len(expected), "a damaged dataset must not change its length silently"
    for i in range(len(ds)):
        assert _same(ds[i], expected[i]), f"ds[{i}] returned wrong data"


def _read_stream(root: str, expected: list[dict]) -> None:
    stream = shardstream.ShardStream(root, batch_size=None, shuffle=False, rank=0, world_size=1)
    got = list(stream)
    assert len(got) == len(expected), "a damaged dataset must not change its length silently"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert _same(g, e), f"streamed sample {i} is wrong data"


def _verify(root: str, expected: list[dict]) -> str:
    report = shardstream.verify(root)
    if report.ok:  # then the data must really be intact
        _read_random_access(root, expected)
    for p in report.problems:
        assert p.shard and p.reason
    return "ok" if report.ok else "problem"


def _run_case(root: str, target: str, case: str, expected: list[dict], outside: str) -> str:
    before = _files(outside)
    outcomes = []
    for reader in (_read_random_access, _read_stream):
        with _deadline(CASE_SECONDS, case):
            try:
                reader(root, expected)
                outcomes.append("data")
            except ShardstreamError as exc:
                _check_error(exc, root, target, f"{case} [{reader.__name__}]")
                outcomes.append(type(exc).__name__)
            except AssertionError:
                raise
            except BaseException as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{case} [{reader.__name__}]: bare {type(exc).__name__}: {exc}")
    with _deadline(CASE_SECONDS, case):
        try:
            outcomes.append(_verify(root, expected))
        except ShardstreamError as exc:  # only a dataset that cannot be opened may raise
            _check_error(exc, root, target, f"{case} [verify]")
            outcomes.append(type(exc).__name__)
        except AssertionError:
            raise
        except BaseException as exc:  # noqa: BLE001
            pytest.fail(f"{case} [verify]: bare {type(exc).__name__}: {exc}")
    assert _files(outside) == before, f"{case}: a reader touched files outside the dataset"
    return "/".join(outcomes)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ["shard", "index", "manifest"])
@pytest.mark.parametrize("mutation", ["flip1", "flip8", "truncate"])
def test_damaged_dataset_gives_data_or_named_error(clean: dict, tmp_path: Any, layout: str,
                                                   kind: str, mutation: str) -> None:
    src, expected = clean[layout]
    rng = random.Random(f"{SEED}-{layout}-{kind}-{mutation}")
    outside = str(tmp_path / "outside")
    os.makedirs(outside)
    with open(os.path.join(outside, "precious.txt"), "w") as f:
        f.write("must not change")
    seen = []
    for c in range(CASES):
        root = str(tmp_path / f"case{c}")
        shutil.copytree(src, root)
        target = _target(root, kind, rng)
        what = _mutate(target, rng, mutation)
        case = f"{layout}: {os.path.basename(target)} {what}"
        seen.append(_run_case(root, target, case, expected, str(tmp_path)))
        shutil.rmtree(root)
    # damage to a shard or an index must be noticed: by a reader or, where the bytes
    # hit only tar headers and padding that no reader looks at, by verify's checksums
    if kind != "manifest":
        assert all(o != "data/data/ok" for o in seen), f"a mutation went unnoticed: {seen}"


# ---------------------------------------------------------------- crafted manifests
def _manifest_doc(root: str) -> dict:
    import json
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def _write_doc(root: str, doc: dict | bytes) -> None:
    import json
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with open(os.path.join(root, "manifest.json"), "wb") as f:
        f.write(data)


def _crafted(doc: dict, how: str) -> dict | bytes:
    shards = doc["shards"]
    if how == "parent-name":
        shards[0]["name"] = "../outside/precious.txt"
    elif how == "absolute-name":
        shards[0]["index"] = "/etc/passwd"
    elif how == "nul-name":
        shards[0]["name"] = "part-000000.tar\0x"
    elif how == "duplicate-entry":
        shards.append(dict(shards[0]))
    elif how == "zero-count":
        shards[0]["num_samples"] = 0
    elif how == "negative-count":
        shards[0]["num_samples"] = -5
    elif how == "huge-count":
        shards[0]["num_samples"] = 2 ** 62
    elif how == "count-not-int":
        shards[0]["num_samples"] = "90"
    elif how == "shards-not-list":
        doc["shards"] = {"a": 1}
    elif how == "entry-not-dict":
        shards[0] = 7
    elif how == "not-utf8":
        import json
        return json.dumps(doc).encode().replace(b'"created_by"', b'"created\xff_by"')
    return doc


CRAFTED = ["parent-name", "absolute-name", "nul-name", "duplicate-entry", "zero-count",
           "negative-count", "huge-count", "count-not-int", "shards-not-list", "entry-not-dict",
           "not-utf8"]


@pytest.mark.parametrize("how", CRAFTED)
def test_crafted_manifest_is_a_manifest_error(clean: dict, tmp_path: Any, how: str) -> None:
    src, _ = clean["raw"]
    root = str(tmp_path / "ds")
    shutil.copytree(src, root)
    _write_doc(root, _crafted(_manifest_doc(root), how))
    before = _files(str(tmp_path))
    for reader in (lambda: shardstream.ShardDataset(root),
                   lambda: shardstream.ShardStream(root, batch_size=4),
                   lambda: shardstream.verify(root),
                   lambda: shardstream.load_manifest(root)):
        with _deadline(CASE_SECONDS, how):
            with pytest.raises(shardstream.ManifestError) as info:
                reader()
        assert "manifest.json" in str(info.value), str(info.value)
    assert _files(str(tmp_path)) == before


def test_overwrite_of_a_tampered_dataset_deletes_nothing_outside(clean: dict, tmp_path: Any) -> None:
    """A downloaded dataset whose manifest names ``../x``: rewriting it must not delete x."""
    src, _ = clean["raw"]
    root = str(tmp_path / "ds")
    shutil.copytree(src, root)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    doc = _manifest_doc(root)
    doc["shards"][0]["name"] = "../precious.txt"
    _write_doc(root, doc)
    try:
        shardstream.write_shards(SAMPLES[:10], root, overwrite=True)
    except shardstream.ManifestError:
        pass  # refusing a tampered dataset is fine; deleting outside it is not
    assert precious.read_text() == "keep me"


# ---------------------------------------------------------------- hostile sample bytes
@pytest.mark.parametrize("seed", range(4))
def test_random_msgpack_is_data_or_decode_error(seed: int) -> None:
    """Random and mutated msgpack: decode_sample gives a value or a DecodeError."""
    rng = random.Random(seed)
    base = [shardstream.encode_sample(s) for s in SAMPLES[:40]]
    for _ in range(400):
        data = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(len(data) + 1)]
        with _deadline(CASE_SECONDS, "decode_sample"):
            try:
                shardstream.decode_sample(bytes(data))
            except shardstream.DecodeError:
                pass
            except BaseException as exc:  # noqa: BLE001
                pytest.fail(f"seed {seed}: bare {type(exc).__name__}: {exc}")
    deep = b"\x91" * 100_000 + b"\xc0"  # 100,000 nested one-element arrays
    huge = msgpack.packb({"a": 1})[:-1] + b"\xdb\xff\xff\xff\xf0"  # str of 4 GiB declared
    for data in (deep, huge, b"\xc1", b""):
        with pytest.raises(shardstream.DecodeError):
            shardstream.decode_sample(data)
