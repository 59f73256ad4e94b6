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


def torchrun_nodes(script: str, *args: str, nodes: int = 2, nproc: int = 2,
                   timeout: int = 180) -> None:
    """Run ``script`` as ``nodes`` torchrun nodes of ``nproc`` ranks on this machine
    (one torchrun command per node, started together, as on a cluster)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                               f"--nnodes={nodes}", f"--nproc_per_node={nproc}",
                               f"--node_rank={k}", "--master_addr=127.0.0.1",
                               f"--master_port={port}", script, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for k in range(nodes)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            first = out.find("Traceback")
            raise AssertionError(out[first:first + 4000] if first >= 0 else out[-4000:])


@pytest.mark.slow
def test_two_nodes_read_their_shares_exactly(make_dataset, tmp_path):
    """Two torchrun nodes x 2 ranks x 2 workers: one exact epoch (equal batches, every
    sample, fewer than 4 repeats), and each node reads about half of the shards."""
    path = make_dataset(N)  # shards of 97 samples: shard = id // 97
    out = tmp_path / "out"
    out.mkdir()
    torchrun_nodes(SCRIPT, path, str(out), "pad")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(r["world"] == 4 for r in ranks)
    shards = -(-N // 97)
    for epoch in range(2):
        counts = {len(r["epochs"][epoch]) for r in ranks}
        assert counts == {ranks[0]["len"]}
        flat = [i for r in ranks for b in r["epochs"][epoch] for i in b]
        assert set(flat) == set(range(N)) and len(flat) - N < 4
        node = [{i // 97 for r in ranks[2 * k:2 * k + 2] for b in r["epochs"][epoch] for i in b}
                for k in range(2)]
        assert len(node[0] & node[1]) <= 1  # disjoint shares but for a shard at the cut
        assert max(len(n) for n in node) <= shards / 2 + 1
    for r in ranks:
        assert r["again"] == r["epochs"][0]  # deterministic
