"""Publishing safely (#14, #15): what --overwrite may delete, the writers' lock, the
atomic manifest switch under crashes at every step, file modes, empty output dirs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from typing import Any, Callable

import pytest

import shardstream
from shardstream import (DatasetLockedError, EncodeError, ManifestError, ShardWriter, load_manifest,
                         verify, write_shards)
from shardstream.errors import ShardNotFoundError
from shardstream.format.manifest import LOCK_NAME
from shardstream.read.dataset import iter_dataset
from shardstream.storage import io as storage_io
from shardstream.storage import urls
from shardstream.write import publish
from shardstream.write import publish as pub
from shardstream.write.convert import convert

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(shardstream.__file__)))]
    + os.environ.get("PYTHONPATH", "").split(os.pathsep))}


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": i, "t": "x" * (i % 7)} for i in range(start, start + n)]


def ids(path: Any) -> list[int]:
    return [s["id"] for s in iter_dataset(str(path))]


def tree(root: Any) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def listed(path: Any) -> set[str]:
    m = load_manifest(str(path))
    return {"manifest.json"} | {n for s in m.shards for n in (s.name, s.index)}


def tamper(root: Any, **names: str) -> None:
    """Rewrite the manifest bypassing its checks (what an attacker's editor does)."""
    p = os.path.join(root, "manifest.json")
    doc = json.load(open(p))
    for k, v in names.items():
        doc["shards"][0][k] = v
    with open(p, "w") as f:
        json.dump(doc, f)


# ---------------------------------------------------------------- what --overwrite deletes
@pytest.mark.parametrize("field,name", [("name", "../precious.txt"), ("index", "ABS")])
def test_overwrite_of_a_tampered_dataset_deletes_nothing_it_cannot_prove_is_its_own(
        tmp_path, field, name):
    out = tmp_path / "ds"
    write_shards(rows(20), out, max_samples=5, fsync=False)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (out / "notes.txt").write_text("mine")  # the user's file inside the dataset dir
    (out / "shard-000001.tar.bak").write_text("a backup")  # not the writer's pattern
    tamper(out, **{field: str(precious) if name == "ABS" else name})
    with pytest.raises(ManifestError):
        load_manifest(str(out))  # a reader refuses it
    with pytest.warns(UserWarning, match="only those named like this writer's shards"):
        write_shards(rows(3, 100), out, overwrite=True, fsync=False)  # replacing it is fine
    assert precious.read_text() == "keep me"
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "shard-000001.tar.bak").exists()
    assert ids(out) == [100, 101, 102] and verify(str(out)).ok
    assert set(os.listdir(out)) == listed(out) | {"notes.txt", "shard-000001.tar.bak"}


def test_overwrite_of_indexed_foreign_tars_keeps_the_tars(tmp_path):
    import io
    import tarfile

    d = tmp_path / "wds"
    d.mkdir()
    with tarfile.open(d / "shard-000000.tar", "w") as t:  # even under the writer's pattern
        for k in range(3):
            info = tarfile.TarInfo(f"s{k}.txt")
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
    shardstream.build_index([str(d)])
    write_shards(rows(4), d, overwrite=True, fsync=False)
    assert (d / "shard-000000.tar").exists() and not (d / "shard-000000.tar.idx").exists()
    assert ids(d) == [0, 1, 2, 3]


# ---------------------------------------------------------------- the lock
def test_a_second_writer_fails_at_once_and_the_first_one_finishes(tmp_path):
    out = tmp_path / "ds"
    write_shards(rows(10), out, fsync=False)
    first = ShardWriter(out, append=True, fsync=False)
    first.write({"id": 10})
    for kw in ({"append": True}, {"overwrite": True}, {}):
        with pytest.raises(DatasetLockedError, match=f"{out} is being written by another "
                           f"writer in this process \\(pid {os.getpid()}\\)"):
            ShardWriter(out, fsync=False, **kw)
    with pytest.raises(DatasetLockedError):
        write_shards(rows(3000), out, workers=2, append=True, fsync=False)
    staging = [e for e in os.listdir(out) if e.startswith(".staging-")]
    assert staging  # a concurrent --overwrite did not delete the first writer's staging
    first.close()
    assert ids(out) == list(range(11))
    assert not [e for e in os.listdir(out) if e.startswith(".")]  # lock file gone too
    write_shards(rows(1, 11), out, append=True, fsync=False)  # free again
    assert ids(out) == list(range(12))


def test_a_concurrent_cli_append_is_refused_and_loses_nothing(tmp_path):
    out = tmp_path / "ds"
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows(50, 1000)))
    write_shards(rows(10), out, fsync=False)
    holder = ShardWriter(out, append=True, fsync=False)
    for i in range(10, 20):
        holder.write({"id": i})
    proc = subprocess.run([sys.executable, "-m", "shardstream", "write", str(src), "-o",
                           str(out), "--append", "-q", "--no-fsync"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"DatasetLockedError: {out} is being written by another writer (pid " \
           f"{os.getpid()})" in proc.stderr
    holder.close()
    proc = subprocess.run([sys.executable, "-m", "shardstream", "write", str(src), "-o",
                           str(out), "--append", "-q", "--no-fsync"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ids(out) == list(range(20)) + list(range(1000, 1050))


HOLD_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, sys, time
    from shardstream import ShardWriter
    w = ShardWriter(sys.argv[1], fsync=False, overwrite=True)
    w.write({"id": 1})
    child = mp.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()  # a forked child must not keep the parent's lock alive
    print(child.pid, flush=True)
    time.sleep(60)
""")


def test_a_killed_writer_leaves_no_lock_even_while_its_forked_children_live(tmp_path):
    out = tmp_path / "ds"
    write_shards(rows(5), out, fsync=False)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(out)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(DatasetLockedError, match=f"pid {proc.pid}"):
            ShardWriter(out, append=True, fsync=False)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert os.path.exists(out / LOCK_NAME)  # left behind, but nobody holds it
        write_shards(rows(2, 5), out, append=True, fsync=False)  # the lock is free
    finally:
        os.kill(child, signal.SIGKILL)
        proc.stdout.close()
    assert ids(out) == list(range(7))
    assert not [e for e in os.listdir(out) if e.startswith(".")]  # leftovers cleaned


def test_leftovers_of_a_killed_writer_do_not_make_a_fresh_write_refuse(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / LOCK_NAME).write_text("12345\n")
    (out / ".staging-abc").mkdir()
    (out / ".staging-abc" / "part-000000.tar").write_bytes(b"x")
    (out / ".manifest.json.1234.tmp").write_bytes(b"{")
    write_shards(rows(3), out, fsync=False)  # no --overwrite needed
    assert ids(out) == [0, 1, 2]
    assert sorted(os.listdir(out)) == sorted(listed(out))


# ---------------------------------------------------------------- empty output dirs (#15)
def test_a_failed_write_removes_the_directory_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "ds"
    with pytest.raises(EncodeError):
        write_shards([{"x": {1}}], out, fsync=False)
    assert not (tmp_path / "a").exists()  # every directory the writer made is gone
    with pytest.raises(EncodeError):
        write_shards(rows(10) + [{"x": {1}}], out, workers=2, fsync=False)
    assert not (tmp_path / "a").exists()
    write_shards(rows(2), out, fsync=False)  # and the next run is not refused
    assert ids(out) == [0, 1]


def test_a_failed_write_keeps_a_directory_it_did_not_create(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    with pytest.raises(EncodeError):
        write_shards([{"x": {1}}], out, fsync=False)
    assert out.is_dir() and os.listdir(out) == []
    with pytest.raises(ValueError):  # bad arguments after the directory was made
        ShardWriter(tmp_path / "new", max_bytes=10)
    assert not (tmp_path / "new").exists()


def test_a_bad_input_file_then_a_rerun_through_the_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{nope\n')
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardstream", "write", "-o", str(out), "-q", "--no-fsync"]
    proc = subprocess.run(cmd + [str(bad)], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "InputError" in proc.stderr
    assert not out.exists()
    bad.write_text('{"id": 1}\n')
    proc = subprocess.run(cmd + [str(bad)], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr  # not "already holds files"


# ---------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_published_files_get_the_mode_of_a_normally_created_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_shards(rows(10), tmp_path / "ds", max_samples=4, fsync=False)
        write_shards(rows(3), tmp_path / "ds", append=True, fsync=False)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in os.listdir(tmp_path / "ds"):
        assert stat.S_IMODE(os.stat(tmp_path / "ds" / name).st_mode) == want, name


# ---------------------------------------------------------------- crashes at every step
class Crash(Exception):
    """Stands in for a crash (power loss, SIGKILL) at a publish step."""


def crash_at(step: str) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == step:
            raise Crash(step)
    return hook


def do_write(mode: str, out: Any, src: Any) -> None:
    if mode == "convert":
        convert(src, out, compression="zstd", overwrite=True, fsync=False)
    else:
        write_shards(rows(7, 500), out, max_samples=2, fsync=False,
                     overwrite=mode == "overwrite", append=mode == "append")


def expected(mode: str, old: list[int]) -> list[int]:
    if mode == "append":
        return old + list(range(500, 507))
    return list(range(100, 111)) if mode == "convert" else list(range(500, 507))


def make_old(mode: str, root: Any) -> tuple[Any, Any, list[int]]:
    """(output dir, convert source, ids of the dataset there before the write)."""
    out, src = root / "out", root / "src"
    write_shards(rows(11, 100), src, max_samples=3, fsync=False)
    if mode == "fresh":
        return out, src, []
    write_shards(rows(5), out, max_samples=2, fsync=False)
    return out, src, list(range(5))


def check_whole(out: Any, want: list[int]) -> None:
    """The dataset at ``out`` is ``want`` whole (or absent when ``want`` is empty)."""
    if not want:
        with pytest.raises(ManifestError, match="does not exist"):
            load_manifest(str(out))
        return
    assert ids(out) == want
    assert verify(str(out)).ok


MODES = ["fresh", "overwrite", "append", "convert"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step", publish.FAULT_STEPS)
def test_a_crash_at_each_publish_step_leaves_old_or_new_whole(tmp_path, monkeypatch, mode,
                                                              step):
    root = tmp_path / "root"
    root.mkdir()
    out, src, old = make_old(mode, root)
    (root / "outside.txt").write_text("untouched")
    before_outside = {k: v for k, v in tree(root).items() if not k.startswith("out" + os.sep)}
    monkeypatch.setattr(pub, "_fault", crash_at(step))
    with pytest.raises(Crash):
        do_write(mode, out, src)
    switched = publish.FAULT_STEPS.index(step) >= publish.FAULT_STEPS.index("manifest")
    check_whole(out, expected(mode, old) if switched else old)
    after_outside = {k: v for k, v in tree(root).items() if not k.startswith("out" + os.sep)}
    assert after_outside == before_outside
    monkeypatch.setattr(pub, "_fault", None)
    write_shards(rows(2, 900), out, fsync=False, overwrite=True)  # cleans every leftover
    assert ids(out) == [900, 901]
    assert sorted(os.listdir(out)) == sorted(listed(out))


def test_an_old_reader_sees_missing_shards_never_a_mix(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    write_shards(rows(6), out, max_samples=2, fsync=False)
    old = load_manifest(str(out))
    seen: dict[str, set[str]] = {}

    def spy(step: str) -> None:
        seen[step] = set(os.listdir(out))
    monkeypatch.setattr(pub, "_fault", spy)
    new = write_shards(rows(4, 50), out, max_samples=2, fsync=False, overwrite=True)
    old_names = {n for s in old.shards for n in (s.name, s.index)}
    new_names = {n for s in new.shards for n in (s.name, s.index)}
    assert not old_names & new_names  # nothing was replaced in place
    assert old_names | new_names <= seen["moved"]  # both whole until the switch
    assert not old_names & set(os.listdir(out))
    with pytest.raises(ShardNotFoundError):
        list(iter_dataset_with(str(out), old))


def iter_dataset_with(root: str, manifest: Any) -> Any:
    from shardstream.read.dataset import Dataset

    ds = Dataset(root, manifest)
    for info in manifest.shards:
        path = ds.shard_path(info)
        if not os.path.exists(path):
            raise ShardNotFoundError(f"{path} does not exist")
        yield path


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from shardstream import convert, write_shards
    from shardstream.write import publish
    mode, step, out, src = sys.argv[1:5]
    def die(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
    publish._fault = die
    if mode == "convert":
        convert(src, out, compression="zstd", overwrite=True, fsync=False)
    else:
        write_shards([{"id": i, "t": "x" * (i % 7)} for i in range(500, 507)], out,
                     max_samples=2, fsync=False, overwrite=mode == "overwrite",
                     append=mode == "append")
""")


@pytest.mark.parametrize("mode,step", [("overwrite", "moving"), ("overwrite", "moved"),
                                       ("overwrite", "manifest"), ("append", "moved"),
                                       ("convert", "removed-old"), ("fresh", "moved")])
def test_sigkill_at_a_publish_step_leaves_old_or_new_whole(tmp_path, mode, step):
    root = tmp_path / "root"
    root.mkdir()
    out, src, old = make_old(mode, root)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, mode, step, str(out), str(src)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    switched = publish.FAULT_STEPS.index(step) >= publish.FAULT_STEPS.index("manifest")
    check_whole(out, expected(mode, old) if switched else old)
    if mode == "fresh":  # orphans but no manifest: a plain rerun is refused, --overwrite works
        with pytest.raises(shardstream.DatasetExistsError):
            write_shards(rows(1), out, fsync=False)
    write_shards(rows(2, 900), out, fsync=False, overwrite=True)
    assert ids(out) == [900, 901]
    assert sorted(os.listdir(out)) == sorted(listed(out))


# ---------------------------------------------------------------- object storage
def remote_state(url: str) -> tuple[list[int], set[str]]:
    """(ids via a verified local copy, object names) of the dataset at ``url``."""
    names = set(storage_io.list_prefix(url))
    m = load_manifest(url)
    for s in m.shards:
        data = storage_io.read_bytes(urls.join(url, s.name))
        assert hashlib.sha256(data).hexdigest() == s.sha256
    return [int(s.num_samples) for s in m.shards], names


@pytest.mark.parametrize("step", publish.FAULT_STEPS)
def test_remote_overwrite_crash_at_each_step(monkeypatch, step):
    url = f"memory://publish-safety/{step}"
    with ShardWriter(url, max_samples=2, fsync=False) as w:
        for r in rows(5):
            w.write(r)
    old = load_manifest(url)
    monkeypatch.setattr(pub, "_fault", crash_at(step))
    with pytest.raises(Crash):
        with ShardWriter(url, max_samples=3, fsync=False, overwrite=True) as w:
            for r in rows(7, 500):
                w.write(r)
    counts, names = remote_state(url)
    m = load_manifest(url)
    switched = publish.FAULT_STEPS.index(step) >= publish.FAULT_STEPS.index("manifest")
    assert (m.num_samples, counts) == ((7, [3, 3, 1]) if switched else (5, [2, 2, 1]))
    if not switched:
        assert m == old and names == {"manifest.json"} | {
            n for s in old.shards for n in (s.name, s.index)}  # uploads rolled back
    monkeypatch.setattr(pub, "_fault", None)
    with ShardWriter(url, fsync=False, overwrite=True) as w:
        w.write({"id": 1})
    counts, names = remote_state(url)
    assert counts == [1] and names == {"manifest.json"} | {
        n for s in load_manifest(url).shards for n in (s.name, s.index)}
