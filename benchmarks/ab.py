"""Same-run A/B of two code states: this checkout against a git revision.

usage: python benchmarks/ab.py --base REV [--rounds 3] [--only stream,getitem,write]

Exports ``REV`` (``git archive``) to a temporary directory and runs the same
workloads through both trees, alternating base and head in every round, each in a
fresh process with ``PYTHONPATH`` at that tree and that tree's own benchmark
scripts: ``stream.py`` (tokens and tabular, 2 workers, one epoch through the
loader), ``random_access.py`` (``ds[i]`` per sample, tokens) and ``write.py``
(ShardWriter and the CLI from JSONL, tabular and tokens, 100k samples each). Prints each figure per round and the median
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


def _export(rev: str, dest: str) -> str:
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def _run(tree: str, args: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, *args], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _figures(tree: str, which: set[str], data: str) -> dict[str, float]:
    """name -> rate (higher is better) for one round in ``tree``."""
    got: dict[str, float] = {}
    if "stream" in which:
        for r in _run(tree, ["benchmarks/stream.py", "--workloads", "tokens,tabular",
                             "--out", os.path.join(data, "stream")]):
            got[f"stream {r['workload']}"] = r["samples_per_s"]
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
        trees = {"base": _export(a.base, base), "head": ROOT}
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
