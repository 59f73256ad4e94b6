"""The storage engine: obstore in-process where it is safe, else (a forked worker after
its parent made requests) through the node's engine process, with the same answers and
the same errors."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest

from shardstream.errors import ShardNotFoundError, StorageError
from shardstream.storage import engine, objstore

from servers import HTTPTestServer

pytestmark = pytest.mark.storage


def _in_child(fn, *args):
    """Run ``fn(*args)`` in a forked child; (result, error type name, message)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def run():
        try:
            q.put((fn(*args), None, None, objstore.usable()))
        except BaseException as exc:  # noqa: BLE001
            q.put((None, type(exc).__name__, f"{exc} kind={getattr(exc, 'kind', None)}",
                   objstore.usable()))
    p = ctx.Process(target=run)
    p.start()
    try:
        return q.get(timeout=60)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()


def _get(url, start=None, end=None):
    return engine.request("get", url, None, start=start, end=end)


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSTREAM_ENGINE_IDLE_S", "3")
    (tmp_path / "obj.bin").write_bytes(bytes(range(256)) * 4096)
    with HTTPTestServer(str(tmp_path), forbidden={"secret.bin"}) as srv:
        (tmp_path / "secret.bin").write_bytes(b"x")
        yield srv


def test_in_process_when_safe(served):
    assert objstore.usable()
    assert _get(served.url("obj.bin"), 10, 20) == (bytes(range(256)) * 4096)[10:20]
    assert engine.request("size", served.url("obj.bin"), None) == 256 * 4096


def test_a_forked_worker_goes_through_the_engine_with_the_same_answers(served):
    url = served.url("obj.bin")
    data = _get(url)  # the parent used obstore: a forked child must not
    assert len(data) == 256 * 4096
    got, err, msg, usable = _in_child(_get, url, 1000, 5000)
    assert err is None, msg
    assert not usable  # it was the engine that answered
    assert got == data[1000:5000]
    assert os.path.exists(engine.socket_path())
    got, err, msg, _ = _in_child(_get, url)
    assert got == data  # a whole 1 MiB object over the socket


def test_errors_come_back_with_their_kind_and_url(served):
    _get(served.url("obj.bin"))
    _, err, msg, _ = _in_child(_get, served.url("missing.bin"))
    assert err == "ShardNotFoundError" and "missing.bin" in msg
    _, err, msg, _ = _in_child(_get, served.url("secret.bin"))
    assert err == "StorageError" and "secret.bin" in msg and "kind=auth" in msg


def test_the_engine_exits_when_idle_and_a_new_one_starts(served):
    url = served.url("obj.bin")
    _get(url)
    assert _in_child(_get, url, 0, 4)[0] == bytes(range(4))
    deadline = time.monotonic() + 20
    while os.path.exists(engine.socket_path()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(engine.socket_path())  # idle for 3 s: gone
    assert _in_child(_get, url, 4, 8)[0] == bytes(range(4, 8))


def test_unknown_operations_are_refused():
    with pytest.raises(ValueError, match="unknown storage operation"):
        engine.request("rm_rf", "s3://b/k", None)


def test_storage_errors_rebuild_with_fields():
    err = engine._decode_error(engine._encode_error(
        StorageError("cannot read s3://b/k: denied", url="s3://b/k", kind="auth", status=403)))
    assert isinstance(err, StorageError) and err.kind == "auth" and err.status == 403
    assert isinstance(engine._decode_error(engine._encode_error(ShardNotFoundError("x"))),
                      ShardNotFoundError)


def _read_into_file(url, path, lo, hi):
    from shardstream.storage.backends import ObjectFS
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        return ObjectFS(None, 30).read_into(url, fd, lo, hi)
    finally:
        os.close(fd)


def test_a_forked_worker_gets_ranges_written_in_place_by_the_engine(served, tmp_path):
    url = served.url("obj.bin")
    data = _get(url)
    dest = str(tmp_path / "copy.bin")
    got, err, msg, usable = _in_child(_read_into_file, url, dest, 4096, 70000)
    assert err is None, msg
    assert not usable and got == 70000 - 4096
    with open(dest, "rb") as f:
        f.seek(4096)
        assert f.read() == data[4096:70000]  # at the object's own offsets


def test_no_fork_while_the_engine_is_being_spawned():
    """A fork (a DataLoader starting its workers) waits until Popen has returned: a
    child forked meanwhile would hold the pipe Popen waits on, and both would hang."""
    spawned = threading.Event()
    done: list[float] = []

    def spawn() -> None:  # what _start does around Popen
        with engine._SPAWNING:
            spawned.set()
            time.sleep(0.3)
            done.append(time.monotonic())

    t = threading.Thread(target=spawn)
    t.start()
    spawned.wait()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    forked = time.monotonic()
    os.waitpid(pid, 0)
    t.join()
    assert done and forked >= done[0]
