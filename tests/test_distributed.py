"""Real multi-process runs: torchrun, 2 ranks (gloo, CPU) x 2 DataLoader workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_stream.py")
N = 2003  # 21 shards of <= 97 samples: uneven on purpose


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 120) -> None:
    """Run ``script`` on ``nproc`` ranks; one retry if the free port was taken meanwhile."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "--master_addr=127.0.0.1", script, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0:
            return
        if "address already in use" not in out.lower() or attempt:
            first = out.find("Traceback")
            raise AssertionError(out[first:first + 4000] if first >= 0 else out[-4000:])


@pytest.mark.slow
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_two_ranks_two_workers(make_dataset, tmp_path, remainder):
    path = make_dataset(N)
    out = tmp_path / "out"
    out.mkdir()
    torchrun(SCRIPT, path, str(out), remainder)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    per_rank = N // 2 if remainder == "drop" else -(-N // 2)
    for epoch in range(2):
        counts = [len(r["epochs"][epoch]) for r in ranks]
        assert counts[0] == counts[1] == ranks[0]["len"] == -(-per_rank // 16)
        flat = [i for r in ranks for b in r["epochs"][epoch] for i in b]
        assert len(flat) == 2 * per_rank
        if remainder == "drop":
            assert len(set(flat)) == len(flat) == N - 1  # one sample dropped
        else:
            assert set(flat) == set(range(N)) and len(flat) == N + 1  # one repeated
    for r in ranks:
        assert r["epochs"][0] != r["epochs"][1]  # a new order each epoch
        assert r["again"] == r["epochs"][0]  # same seed and epoch: same order
