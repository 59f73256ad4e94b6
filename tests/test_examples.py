"""Every example runs unattended (examples/*.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args: list[str], tmp_path, timeout: int = 240) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.slow
def test_quickstart_packs_streams_and_learns(tmp_path):
    out = run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"),
               "--out", str(tmp_path / "ds")], tmp_path)
    assert "packed 2000 samples into 4 shards" in out
    assert "epoch 2:" in out and out.rstrip().endswith("done")


@pytest.mark.slow
def test_train_ddp_example_under_torchrun(tmp_path):
    script = os.path.join(ROOT, "examples", "train_ddp.py")
    if not os.path.exists(script):
        pytest.skip("examples/train_ddp.py not present")
    from socket import socket
    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={port}", "--master_addr=127.0.0.1", script], tmp_path)
