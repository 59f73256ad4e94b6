"""Same-run A/B of two code states: this checkout against a git revision.

usage: python benchmarks/ab.py --base REV [--rounds 3] [--only stream,getitem,write]

Exports ``REV`` (``git archive``) to a temporary directory and runs the same
workloads through both trees, alternating base and head in every round, each in a
fresh process with ``PYTHONPATH`` at that tree and that tree's own benchmark
scripts: ``stream.py`` (tokens and tabular, 2 workers, one epoch through the
loader), ``random_access.py`` (``ds[i]`` per sample, tokens) and ``write.py``
(ShardWriter and the CLI from JSONL, tabular and tokens, 100k samples each).
``stream ... per cpu`` is batches per CPU second (main process and workers): on a
busy machine it moves less than the rates. Prints each figure per round and the median
head/base ratio (> 1: head faster). On a shared machine absolute rates drift;
compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def export(rev: str, dest: str) -> str:
    """``rev`` of this repository, extracted into ``dest`` (returned)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


#: the peer harness (workloads.py); an exported tree has no ../shared next to it
BENCH = os.environ.get("SHARDSTREAM_BENCH", os.path.join(ROOT, "..", "shared", "bench"))


def _run(tree: str, args: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": tree, "SHARDSTREAM_BENCH": os.path.abspath(BENCH)}
    done = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {tree}:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _figures(tree: str, which: set[str], data: str) -> dict[str, float]:
    """name -> rate (higher is better) for one round in ``tree``."""
    got: dict[str, float] = {}
    if "stream" in which:
        for r in _run(tree, ["benchmarks/stream.py", "--workloads", "tokens,tabular",
                             "--out", os.path.join(data, "stream")]):
            if r.get("mode") == "read":
                got[f"stream {r['workload']}"] = r["samples_per_s"]
                cpu = r.get("cpu_ms_per_batch_main", 0) + r.get("cpu_ms_per_batch_workers", 0)
                if cpu:  # batches per CPU second: steadier than rates on a shared machine
                    got[f"stream {r['workload']} per cpu"] = 1000 / cpu
    if "getitem" in which:
        for r in _run(tree, ["benchmarks/random_access.py", "--dir",
                             os.path.join(data, "ra-tokens")]):
            if r.get("mode") == "getitem":
                got["ds[i] tokens"] = r["random_getitem_per_s"]
            elif r.get("mode") == "dataloader":
                got["ds[i] loader tokens"] = r["samples_per_s"]
    if "write" in which:
        for r in _run(tree, ["benchmarks/write.py", "--workloads", "tabular,tokens",
                             "--n", "100000", "--out", os.path.join(data, "write")]):
            if "generator_w1_samples_per_s" in r:
                got[f"write {r['workload']}"] = r["generator_w1_samples_per_s"]
            elif "w1_samples_per_s" in r:
                got[f"write cli jsonl {r['workload']}"] = r["w1_samples_per_s"]
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="stream,getitem,write")
    a = ap.parse_args()
    which = set(a.only.split(","))
    with tempfile.TemporaryDirectory(prefix="ss-ab-") as tmp:
        base = os.path.join(tmp, "base")
        os.makedirs(base)
        trees = {"base": export(a.base, base), "head": ROOT}
        rows: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
        for k in range(a.rounds):
            for name in (("base", "head") if k % 2 == 0 else ("head", "base")):
                # each tree writes its own data: the on-disk format is the same, the
                # writers under test differ
                data = os.path.join(tmp, f"data-{name}")
                for key, value in _figures(trees[name], which, data).items():
                    rows[name].setdefault(key, []).append(value)
                    print(json.dumps({"round": k, "tree": name, key: value}), flush=True)
        print(f"\n{'figure':24} {'base':>12} {'head':>12} {'head/base':>10}")
        for key in sorted(rows["head"]):
            b, h = statistics.median(rows["base"].get(key, [0])), statistics.median(
                rows["head"][key])
            ratio = h / b if b else float("nan")
            print(f"{key:24} {b:12.0f} {h:12.0f} {ratio:10.3f}")


if __name__ == "__main__":
    main()
