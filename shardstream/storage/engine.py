"""Every object-store request goes through :func:`request`: obstore in this process where
that is safe, else the node's engine process.

obstore (Rust's ``object_store`` under a tokio runtime) does not survive ``fork``: a
child forked after its parent made requests hangs on its first own request, and
DataLoader workers are forked. So a process that may use obstore
(:func:`~shardstream.storage.objstore.usable`: the main process, anything spawned)
calls it directly, from any thread; a forked worker sends the same call to the
**engine**: one server process per user, environment and interpreter, started with
``spawn`` semantics (a fresh interpreter running :func:`serve`) by the
first worker that needs it, answering on a Unix socket in a private (0700) directory,
and exiting after :data:`IDLE_S` seconds without a client. Requests and answers are
length-prefixed msgpack frames (written here, not by a library: a frame is 4 bytes of
length and one msgpack map, over a socket both ends own); errors come back as the
same :class:`StorageError` / :class:`ShardNotFoundError` with their fields.

The node cache's locks (:mod:`shardstream.storage.cache`) still decide who downloads
what; the engine only moves bytes, so one download per node holds either way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import msgpack

from shardstream.errors import ShardNotFoundError, StorageError
from shardstream.storage import objstore

__all__ = ["request", "start_soon", "OPS", "IDLE_S", "socket_path", "serve"]

#: what a request may ask: objstore's functions
OPS = ("get", "size", "exists", "list_prefix", "put_bytes", "put_file", "delete",
       "read_into")
IDLE_S = 120.0  # the engine exits this long after its last client left
_START_S = 20.0  # how long a client waits for a new engine to answer
_MAX_FRAME = 1 << 31
_ENV = ("AWS_", "GOOGLE_", "AZURE_", "AZURITE_", "GCS_", "SHARDSTREAM_ENGINE_")
_MAIN = ("import os, sys; from shardstream.storage.engine import IDLE_S, serve; "
         "serve(sys.argv[1], float(os.environ.get('SHARDSTREAM_ENGINE_IDLE_S', IDLE_S)))")


def request(op: str, url: str, storage_options: dict[str, Any] | None, **kw: Any) -> Any:
    """``objstore.<op>(url, storage_options, **kw)`` (``put_bytes``: ``data=``,
    ``put_file``: ``local=``; ``read_into``: ``fd=``, ``start=``, ``end=``, the fd passed
    to the engine with ``SCM_RIGHTS``, so it writes the bytes in place), here or in the
    engine (see the module docs)."""
    if op not in OPS:
        raise ValueError(f"unknown storage operation {op!r}")
    if objstore.usable():
        return _run(op, url, storage_options, kw)
    return _client().call(op, url, storage_options, kw)


def start_soon() -> None:
    """Start the engine in the background (the main process, before its DataLoader
    workers fork: they then find it running instead of waiting for its start-up)."""
    def start() -> None:
        with contextlib.suppress(Exception):
            _connect_or_start(socket_path()).close()
    if objstore.usable():
        threading.Thread(target=start, name="shardstream-engine-start", daemon=True).start()


def _run(op: str, url: str, opts: dict[str, Any] | None, kw: dict[str, Any]) -> Any:
    if op == "put_bytes":
        return objstore.put_bytes(kw.pop("data"), url, opts, **kw)
    if op == "put_file":
        return objstore.put_file(kw.pop("local"), url, opts, **kw)
    if op == "read_into":
        return objstore.read_into(url, opts, kw.pop("fd"), kw.pop("start"), kw.pop("end"),
                                  **kw)
    return getattr(objstore, op)(url, opts, **kw)


# ---------------------------------------------------------------- frames
def _send(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    payload = msgpack.packb(obj, use_bin_type=True)
    data = struct.pack("<I", len(payload)) + payload
    if fds:  # the descriptors ride on the frame's first bytes
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _recv(sock: socket.socket, fds: list[int] | None = None) -> Any:
    """One frame; with ``fds``, descriptors sent with it are appended there."""
    if fds is None:
        head = _recv_exact(sock, 4)
    else:
        first, got, _, _ = socket.recv_fds(sock, 4, 4)
        fds.extend(got)
        rest = _recv_exact(sock, 4 - len(first)) if first and len(first) < 4 else b""
        head = first + rest if first else None
    if head is None:
        return None
    (n,) = struct.unpack("<I", head)
    if n > _MAX_FRAME:
        raise StorageError(f"storage engine: a frame of {n} bytes; refusing it")
    body = _recv_exact(sock, n)
    if body is None:
        raise ConnectionResetError("storage engine: the connection closed mid-frame")
    return msgpack.unpackb(body, raw=False)


_FIELDS = ("errno", "url", "kind", "tries", "status", "code")


def _encode_error(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "msg": str(exc)}
    if isinstance(exc, StorageError):
        out.update({f: getattr(exc, f, None) for f in _FIELDS})
    partial = getattr(exc, "partial", None)
    if isinstance(partial, bytes):
        out["partial"] = partial
    if isinstance(getattr(exc, "written", None), int):
        out["written"] = exc.written  # type: ignore[attr-defined]
    return out


def _decode_error(err: dict[str, Any]) -> BaseException:
    msg = err.get("msg", "storage engine error")
    exc: BaseException
    if err.get("type") == "ShardNotFoundError":
        exc = ShardNotFoundError(msg)
    elif err.get("type") in ("ValueError", "TypeError"):
        exc = ValueError(msg)
    else:
        exc = StorageError(msg, **{f: err.get(f) for f in _FIELDS})
    if "partial" in err:
        exc.partial = err["partial"]  # type: ignore[attr-defined]
    if "written" in err:
        exc.written = err["written"]  # type: ignore[attr-defined]
    return exc


# ---------------------------------------------------------------- client
def socket_path() -> str:
    """The engine's socket for this user, interpreter and storage environment."""
    stamp = repr((sys.executable, sorted((k, v) for k, v in os.environ.items()
                                         if k.startswith(_ENV))))
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"shardstream-{uid}", "engine",
                        f"{digest}.sock")


class _Client:
    """Connections to the engine, one per thread of this process."""

    def __init__(self) -> None:
        self.path = socket_path()
        self._local = threading.local()

    def call(self, op: str, url: str, opts: dict[str, Any] | None, kw: dict[str, Any]) -> Any:
        sock = self._connection()
        fds = [kw.pop("fd")] if op == "read_into" else None
        try:
            _send(sock, {"op": op, "url": url, "opts": opts or {}, "kw": kw}, fds)
            answer = _recv(sock)
        except (OSError, ValueError) as exc:
            self._drop()
            raise StorageError(f"cannot {op} {url}: the storage engine at {self.path} "
                               f"stopped answering ({exc})", url=url, kind="transient") from exc
        if answer is None:
            self._drop()
            raise StorageError(f"cannot {op} {url}: the storage engine at {self.path} closed "
                               "the connection", url=url, kind="transient")
        if "err" in answer:
            raise _decode_error(answer["err"])
        return answer.get("ok")

    def _drop(self) -> None:
        sock = getattr(self._local, "sock", None)
        self._local.sock = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _connection(self) -> socket.socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = _connect_or_start(self.path)
        return sock


_clients: dict[int, _Client] = {}


def _client() -> _Client:
    pid = os.getpid()
    if pid not in _clients:
        _clients.clear()  # a parent's connections are not ours
        _clients[pid] = _Client()
    return _clients[pid]


def _try_connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None


#: Held while the engine is spawned, and by every os.fork() of this process while it
#: forks. Popen waits for its child's exec on a pipe whose write end a process forked
#: meanwhile (start_soon spawns from a thread, the main thread may be forking
#: DataLoader workers) would keep open: Popen would wait for ever, holding the start
#: lock that those workers then wait for. (Popen's own fork runs no at-fork hooks.)
_SPAWNING = threading.RLock()
os.register_at_fork(before=_SPAWNING.acquire, after_in_parent=_SPAWNING.release,
                    after_in_child=_SPAWNING.release)


def _connect_or_start(path: str) -> socket.socket:
    sock = _try_connect(path)
    if sock is not None:
        return sock
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.stat(directory).st_mode & 0o077:
        os.chmod(directory, 0o700)
    with open(path + ".lock", "a+") as lock:  # one process starts it; the rest wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _start(path)
        finally:  # explicitly: a worker forked meanwhile shares the lock's description
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start(path: str) -> socket.socket:
    """Start the engine at ``path`` (under its start lock) and connect to it."""
    sock = _try_connect(path)
    if sock is not None:
        return sock
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead engine's socket
    log = open(path + ".log", "ab")
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in [env.get("PYTHONPATH")] if p])
    with _SPAWNING:  # no fork (a DataLoader's workers) while the engine is spawned
        subprocess.Popen([sys.executable, "-c", _MAIN, path],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                         start_new_session=True, close_fds=True)
    log.close()
    deadline = time.monotonic() + _START_S
    while time.monotonic() < deadline:
        sock = _try_connect(path)
        if sock is not None:
            return sock
        time.sleep(0.02)
    raise StorageError(f"the storage engine did not start within {_START_S:.0f} s; see "
                       f"{path}.log", kind="transient")


# ---------------------------------------------------------------- server
class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Any = self.server
        server.clients += 1
        try:
            while True:
                fds: list[int] = []
                req = _recv(self.request, fds)
                if req is None:
                    return
                server.last = time.monotonic()
                kw = dict(req["kw"])
                try:
                    if req.get("op") == "read_into":
                        if len(fds) != 1:
                            raise ValueError("read_into needs one file descriptor")
                        kw["fd"] = fds[0]
                    ok = _run(req["op"], req["url"], req["opts"] or None, kw) \
                        if req.get("op") in OPS else _refuse(req.get("op"))
                    answer: dict[str, Any] = {"ok": ok}
                except Exception as exc:  # noqa: BLE001 - handed back to the caller
                    answer = {"err": _encode_error(exc)}
                finally:
                    for fd in fds:
                        os.close(fd)
                _send(self.request, answer)
        except OSError:
            return
        finally:
            server.clients -= 1
            server.last = time.monotonic()


def _refuse(op: Any) -> Any:
    raise ValueError(f"unknown storage operation {op!r}")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    clients = 0
    last = 0.0


def serve(path: str, idle_s: float = IDLE_S) -> None:
    """Answer requests on ``path`` until no client came for ``idle_s`` seconds."""
    old = os.umask(0o077)
    try:
        server = _Server(path, _Handler)
    finally:
        os.umask(old)
    server.last = time.monotonic()

    def watch() -> None:
        while not (server.clients == 0 and time.monotonic() - server.last > idle_s):
            time.sleep(min(1.0, idle_s / 4))
        with contextlib.suppress(OSError):
            os.unlink(path)
        server.shutdown()
    threading.Thread(target=watch, daemon=True).start()
    server.serve_forever(poll_interval=0.5)
    server.server_close()

