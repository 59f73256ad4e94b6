"""Raw obstore against the local emulators: SeaweedFS (S3), Azurite (Azure Blob) and
fake-gcs-server (GCS). These pin down what the obstore-based storage layer can rely on:
the store configurations that reach each emulator, and the exception classes obstore
0.12 raises (a missing object is the builtin FileNotFoundError, not the deprecated
``obstore.exceptions.NotFoundError``; a wrong key is PermissionDeniedError for object
requests but GenericError for list and bulk delete).
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

obstore = pytest.importorskip("obstore")

from obstore.exceptions import AlreadyExistsError, GenericError, PermissionDeniedError
from obstore.store import AzureStore, GCSStore, S3Store, from_url

pytestmark = pytest.mark.storage

KINDS = ("s3", "azure", "gcs")
MB = 1 << 20


def s3_config(server: Any, *, secret: str | None = None) -> dict[str, Any]:
    """``S3Store(bucket, **this)`` for the SeaweedFS fixture (path-style, plain HTTP)."""
    return {"config": {"endpoint": server.endpoint, "region": "us-east-1",
                       "access_key_id": server.KEY,
                       "secret_access_key": secret or server.SECRET,
                       "virtual_hosted_style_request": False},
            "client_options": {"allow_http": True}}


@dataclass
class Backend:
    kind: str
    url: str  # s3://bucket, az://container, gs://bucket
    server: Any

    @property
    def name(self) -> str:
        return self.url.partition("://")[2]

    def options(self) -> dict[str, Any]:
        """config + client_options for the store class or ``from_url``."""
        return s3_config(self.server) if self.kind == "s3" else self.server.obstore_config()

    def store(self) -> Any:
        cls = {"s3": S3Store, "azure": AzureStore, "gcs": GCSStore}[self.kind]
        return cls(self.name, **self.options())


@pytest.fixture(params=KINDS)
def backend(request) -> Backend:
    fixture, server = {"s3": ("s3_bucket", "s3_server"), "azure": ("azure_container",
                       "azure_server"), "gcs": ("gcs_bucket", "gcs_server")}[request.param]
    return Backend(request.param, request.getfixturevalue(fixture),
                   request.getfixturevalue(server))


def _data(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(256)) * (n // 256) + b"x" * (n % 256)


# ---------------------------------------------------------------- every backend
def test_put_get_range_head_list_delete(backend):
    store = backend.store()
    body = _data(10_000)
    put = obstore.put(store, "d/a b/one.bin", body)
    assert put["e_tag"]
    obstore.put(store, "d/two.txt", b"hello world")
    obstore.put(store, "other.txt", b"o")

    assert bytes(obstore.get(store, "d/a b/one.bin").bytes()) == body
    assert bytes(obstore.get_range(store, "d/a b/one.bin", start=100, end=300)) == body[100:300]
    assert bytes(obstore.get_range(store, "d/a b/one.bin", start=9_990, length=10)) == \
        body[9_990:]
    assert [bytes(b) for b in obstore.get_ranges(store, "d/two.txt", starts=[0, 6],
                                                 ends=[5, 11])] == [b"hello", b"world"]
    got = obstore.get(store, "d/two.txt", options={"range": {"offset": 6}})
    assert bytes(got.bytes()) == b"world"

    meta = obstore.head(store, "d/a b/one.bin")
    assert meta["size"] == len(body) and meta["e_tag"] and meta["last_modified"]
    assert meta["path"] == "d/a b/one.bin"

    listed = {m["path"]: m["size"] for m in obstore.list(store, "d").collect()}
    assert listed == {"d/a b/one.bin": len(body), "d/two.txt": 11}
    assert sorted(m["path"] for m in obstore.list(store).collect()) == \
        ["d/a b/one.bin", "d/two.txt", "other.txt"]
    tree = obstore.list_with_delimiter(store, "d")
    assert tree["common_prefixes"] == ["d/a b"]
    assert [m["path"] for m in tree["objects"]] == ["d/two.txt"]

    obstore.delete(store, "d/two.txt")
    obstore.delete(store, ["d/a b/one.bin", "other.txt"])  # bulk delete
    assert list(obstore.list(store).collect()) == []
    with pytest.raises(FileNotFoundError):
        obstore.head(store, "d/two.txt")


def test_large_put_is_multipart(backend):
    """20 MB through ``put`` (above obstore's 5 MB chunk: a multipart upload) and through
    ``open_writer``; contents checked at both ends and across a part boundary."""
    store = backend.store()
    body = _data(20 * MB, seed=3)
    obstore.put(store, "big/put.bin", body)
    with obstore.open_writer(store, "big/writer.bin", buffer_size=5 * MB) as w:
        for i in range(0, len(body), 3 * MB):
            w.write(body[i:i + 3 * MB])
    for path in ("big/put.bin", "big/writer.bin"):
        assert obstore.head(store, path)["size"] == len(body)
        assert bytes(obstore.get_range(store, path, start=0, end=1000)) == body[:1000]
        mid = 5 * MB - 500
        assert bytes(obstore.get_range(store, path, start=mid, end=mid + 1000)) == \
            body[mid:mid + 1000]
        assert bytes(obstore.get_range(store, path, start=len(body) - 10, length=10)) == \
            body[-10:]
    assert bytes(obstore.get(store, "big/put.bin").bytes()) == body
    if backend.kind == "gcs":  # went through the XML multipart upload of the front
        kinds = [kind for _, path, kind in backend.server.log if "/big%2F" in path]
        assert kinds.count("multipart-initiate") == 2 and kinds.count("multipart-complete") == 2
        assert kinds.count("multipart-part") >= 8


def test_missing_object_is_file_not_found(backend):
    """obstore 0.12 raises the builtin FileNotFoundError (NotFoundError is deprecated and
    not raised); it is no subclass of obstore.exceptions.BaseError."""
    store = backend.store()
    for call in (lambda: obstore.get(store, "nope"), lambda: obstore.head(store, "nope"),
                 lambda: obstore.get_range(store, "nope", start=0, end=10)):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert type(info.value) is FileNotFoundError
        assert not isinstance(info.value, obstore.exceptions.BaseError)
        assert "nope" in str(info.value)


def test_delete_missing_object(backend):
    """S3 answers 204 for a missing key; Azure and GCS answer 404 -> FileNotFoundError."""
    store = backend.store()
    if backend.kind == "s3":
        obstore.delete(store, "nope")
    else:
        with pytest.raises(FileNotFoundError):
            obstore.delete(store, "nope")


def test_put_create_and_copy_without_overwrite(backend):
    store = backend.store()
    obstore.put(store, "c/k", b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "c/k", b"second", mode="create")
    assert bytes(obstore.get(store, "c/k").bytes()) == b"first"
    obstore.copy(store, "c/k", "c/copy")
    assert bytes(obstore.get(store, "c/copy").bytes()) == b"first"
    if backend.kind != "s3":  # S3 needs copy_if_not_exists configured for this
        with pytest.raises(AlreadyExistsError):
            obstore.copy(store, "c/k", "c/copy", overwrite=False)
        obstore.rename(store, "c/copy", "c/renamed", overwrite=False)
        assert bytes(obstore.get(store, "c/renamed").bytes()) == b"first"


def test_from_url_with_storage_options(backend):
    """``from_url(url, config=..., client_options=...)``: storage_options split in two
    (a client key such as allow_http inside config makes obstore 0.12 panic)."""
    if backend.kind == "s3":
        opts = s3_config(backend.server)
    else:
        flat = dict(backend.server.storage_options())
        opts = {"client_options": flat.pop("client_options"), "config": flat}
    store = from_url(f"{backend.url}/pre", **opts)
    obstore.put(store, "x.txt", b"prefixed")
    assert bytes(obstore.get(backend.store(), "pre/x.txt").bytes()) == b"prefixed"
    assert [m["path"] for m in obstore.list(store).collect()] == ["x.txt"]


# ---------------------------------------------------------------- credentials
def test_azure_wrong_key_is_permission_denied(azure_server, azure_container):
    container = azure_container.partition("://")[2]
    good = AzureStore(container, **azure_server.obstore_config())
    obstore.put(good, "k", b"v")
    wrong = azure_server.KEY[:-8] + "AAAAAAA="
    bad = AzureStore(container, **azure_server.obstore_config(account_key=wrong))
    for call in (lambda: obstore.get(bad, "k"), lambda: obstore.head(bad, "k"),
                 lambda: obstore.put(bad, "k2", b"v"),
                 lambda: obstore.get(bad, "missing")):  # 403 before any 404
        with pytest.raises(PermissionDeniedError):
            call()
    with pytest.raises(GenericError, match="403"):  # list: not mapped to PermissionDenied
        obstore.list(bad).collect()


def test_s3_wrong_secret_is_permission_denied(s3_server, s3_bucket):
    bucket = s3_bucket.partition("://")[2]
    bad = S3Store(bucket, **s3_config(s3_server, secret="not-the-secret"))
    for call in (lambda: obstore.get(bad, "k"), lambda: obstore.put(bad, "k", b"v")):
        with pytest.raises(PermissionDeniedError):
            call()
    with pytest.raises(GenericError, match="403"):
        obstore.list(bad).collect()


# ---------------------------------------------------------------- emulator specifics
def test_azure_emulator_mode_reads_url_from_env(azure_server, azure_container, monkeypatch):
    """``use_emulator``: account and key are Azurite's defaults, the URL comes only from
    AZURITE_BLOB_STORAGE_URL (read when the store is built; ``endpoint`` is ignored)."""
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azure_server.blob_url)
    container = azure_container.partition("://")[2]
    store = AzureStore(container, config={"use_emulator": True},
                       client_options={"allow_http": True})
    obstore.put(store, "emu.txt", b"via use_emulator")
    blob = azure_server.service_client().get_blob_client(container, "emu.txt")
    assert blob.download_blob().readall() == b"via use_emulator"


def test_gcs_xml_writes_visible_to_json_api(gcs_server, gcs_bucket):
    """Objects obstore writes (XML API, through the front) are fake-gcs-server objects:
    JSON-API clients (gcsfs) list and read them, and obstore reads JSON uploads."""
    bucket = gcs_bucket.partition("://")[2]
    store = GCSStore(bucket, **gcs_server.obstore_config())
    obstore.put(store, "j/from-obstore.txt", b"xml")
    with urllib.request.urlopen(f"{gcs_server.url}/storage/v1/b/{bucket}/o?prefix=j/") as r:
        items = json.load(r)["items"]
    assert [(i["name"], i["size"]) for i in items] == [("j/from-obstore.txt", "3")]
    req = urllib.request.Request(
        f"{gcs_server.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name=j%2Fjson.txt",
        data=b"json", method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).close()
    assert bytes(obstore.get(store, "j/json.txt").bytes()) == b"json"
    assert obstore.head(store, "j/json.txt")["size"] == 4


def test_servers_give_env_and_options(azure_server, gcs_server):
    assert azure_server.storage_options() == {
        "account_name": "devstoreaccount1", "account_key": azure_server.KEY,
        "endpoint": azure_server.endpoint, "client_options": {"allow_http": True}}
    sa = json.loads(gcs_server.storage_options()["service_account_key"])
    assert sa["gcs_base_url"] == gcs_server.url and sa["disable_oauth"] is True
    assert gcs_server.env["STORAGE_EMULATOR_HOST"] == gcs_server.url
    assert os.environ.get("STORAGE_EMULATOR_HOST") != gcs_server.url  # nothing set globally
