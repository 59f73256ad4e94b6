"""Same-run comparison with the peers: packing, streaming, random access, size on disk.

usage: python benchmarks/compare.py --peers /tmp/peers-venv/bin/python
                                    [--out benchmarks/results/compare.json]
                                    [--charts docs/charts] [--samples N] [--quick]
                                    [--repeat R] [--draws D] [--ours-src CHECKOUT]
       python benchmarks/compare.py --plot-only JSON [--charts docs/charts]

One workload (default ``tokens`` from the harness in ``../shared/bench``) goes
through shardstream and each peer (webdataset, MosaicML streaming, LitData, HF
datasets; the peers run in their own venv, ``../shared/bench/setup.sh``), every
step in a fresh process, all in one run:

- pack: samples/s from the workload's generator to files on disk (generation
  timed, imports not, for every system; ``write.py``'s child, ``peers.py write``);
- size: bytes on disk of what pack wrote;
- stream: one epoch through a torch DataLoader, 2 workers, batch 256, collated
  to tensors (``stream.py``'s reader, the harness's ``peers.py read``): samples/s
  from the start of the process, imports included, and steady after the first batch;
- random access: ``ds[i]`` per second over the same random draws for every
  system, one untimed pass, best of ``--rounds`` (webdataset has no ``ds[i]``).

``--repeat R`` alternates stream and random access R times and keeps the
medians. Writes the figures, machine, date, versions and command as JSON, then
draws one chart per measure (``charts.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import charts  # noqa: E402
from stream import READ  # noqa: E402
from write import BENCH, child  # noqa: E402

SYSTEMS = {"shardstream": "shardstream", "wds": "webdataset", "mds": "MosaicML streaming",
           "litdata": "LitData", "hf": "HF datasets"}
#: how each system opens a dataset for ``ds[i]`` (the peers' lines as in the harness's
#: random_access.py, which has its paths written in)
OPEN = {"shardstream": "from shardstream.pytorch.random_access import ShardDataset\n"
                       "ds = ShardDataset(d)",
        "mds": "from streaming import StreamingDataset\n"
               "ds = StreamingDataset(local=d, shuffle=False)",
        "litdata": "from litdata import StreamingDataset\nds = StreamingDataset(input_dir=d)",
        "hf": "import datasets\nds = datasets.load_from_disk(d).with_format('numpy')"}
RANDOM = """
import json, sys, time
import numpy as np
sys.path.insert(0, {here!r})
from common import best_getitem_rate
d = {d!r}
t = time.perf_counter()
{open}
idx = np.random.default_rng(1).integers(0, len(ds), {draws}).tolist()
ds[idx[0]]
open_s = time.perf_counter() - t
print(json.dumps({{"n": len(ds), "open_s": open_s,
                  "random_getitem_per_s": best_getitem_rate(ds, idx, {rounds})}}))
"""
PACK = """
import sys
sys.path.insert(0, {bench!r})
import {lib}
import peers
sys.argv = ["peers.py", "write", {system!r}, {name!r}, "{n}", {d!r}]
peers.main()
"""
LIBS = {"wds": "webdataset", "mds": "streaming", "litdata": "litdata", "hf": "datasets"}
PEER_VERSIONS = ("webdataset", "mosaicml-streaming", "litdata", "datasets", "pyarrow", "torch",
                 "numpy")
LABELS = {"tokens": "32-511 int32 ids + text + label", "tabular": "5 scalars",
          "vectors": "1024 float32", "images": "3x224x224 uint8"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def last_json(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its last JSON line, or ``{"error": stderr tail}``."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        return {"error": (r.stderr or r.stdout)[-800:]}
    return json.loads(lines[-1])


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def pack(system: str, py: str, name: str, n: int, d: str) -> dict[str, Any]:
    """One write from the generator in a fresh process, the library imported before the
    timer starts for every system (``write.py``'s child; the harness's ``peers.py write``)."""
    if system == "shardstream":
        r = child("gen", name, n, d, 1)
    else:
        cache = tempfile.mkdtemp(prefix="ss-compare-hf-cache-")   # HF: no cached dataset
        code = PACK.format(bench=BENCH, lib=LIBS[system], system=system, name=name, n=n, d=d)
        try:
            r = last_json([py, "-c", code], env=dict(os.environ, HF_DATASETS_CACHE=cache,
                                                     HF_HOME=cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    if "error" not in r:
        r["bytes"] = dir_bytes(d)
    return r


def stream(system: str, py: str, name: str, d: str, workers: int, batch: int) -> dict[str, Any]:
    if system == "shardstream":
        code = READ.format(out=d, batch=batch, shuffle=False, workers=workers, name=name)
        r = last_json([sys.executable, "-c", code])
    else:
        r = last_json([py, os.path.join(BENCH, "peers.py"), "read", system, name, d,
                       "--workers", str(workers), "--batch", str(batch)])
    if "error" not in r:
        r["steady_samples_per_s"] = round((r["n"] - batch) / (r["seconds"] - r["first_batch_s"]))
    return r


def random_access(system: str, py: str, d: str, draws: int, rounds: int) -> dict[str, Any]:
    code = RANDOM.format(here=HERE, d=d, open=OPEN[system], draws=draws, rounds=rounds)
    return last_json([sys.executable if system == "shardstream" else py, "-c", code])


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


VERSIONS = """
import importlib.metadata as m, json, os
v = {{}}
if {ours}:
    import shardstream
    v = {{"shardstream": shardstream.__version__,
         "shardstream_path": os.path.dirname(os.path.dirname(shardstream.__file__))}}
for p in {pkgs!r}:
    try:
        v[p] = m.version(p)
    except m.PackageNotFoundError:
        v[p] = None
print(json.dumps(v))
"""


def versions(peers: str | None) -> dict[str, Any]:
    """Ours as the children import it (``--ours-src`` or the installed package), its git
    commit and modified files, torch and numpy; the peers venv's packages."""
    code = VERSIONS.format(ours=True, pkgs=("torch", "numpy"))
    out = last_json([sys.executable, "-c", code])
    src = out.get("shardstream_path")
    if src:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", src, *args], capture_output=True,
                                  text=True).stdout.strip()
        out["git_head"] = git("rev-parse", "HEAD")
        out["package_modified_files"] = len(git("status", "--porcelain", "--",
                                                "shardstream").splitlines())
    if peers:
        code = VERSIONS.format(ours=False, pkgs=PEER_VERSIONS)
        out["peers_venv"] = last_json([peers, "-c", code])
    return out


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return round(statistics.median(vals)) if vals else None


#: measure -> (step whose rows hold it, key, title, short name, unit, higher is better)
MEASURES = {"pack": ("pack", "samples_per_s", "Packing from a generator", "pack", "samples/s",
                     True),
            "stream": ("stream", "samples_per_s",
                       "Streaming one epoch from process start, 2 workers, batch 256",
                       "stream epoch", "samples/s", True),
            "stream_steady": ("stream", "steady_samples_per_s",
                              "Streaming after the first batch, 2 workers, batch 256",
                              "stream steady", "samples/s", True),
            "random": ("random", "random_getitem_per_s", "Random access ds[i], one process",
                       "ds[i]", "/s", True),
            "size": ("pack", "bytes", "Size on disk", "on disk", "bytes", False)}


def figures(raw: dict[str, dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    """The measures (one value per system, None where missing) from the raw rows."""
    def get(s: str, step: str, key: str) -> float | None:
        r = raw[s].get(step)
        if isinstance(r, list):
            return median(r, key)
        return r.get(key) if r and "error" not in r else None

    out = {}
    for m, (step, key, title, short, unit, higher) in MEASURES.items():
        values = {s: get(s, step, key) for s in systems}
        notes = {s: "no ds[i]" if step == "random" and s not in OPEN else "failed"
                 for s, v in values.items() if v is None}
        out[m] = {"title": title, "short": short, "unit": unit, "higher_is_better": higher,
                  "values": values, "notes": notes}
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, BENCH)
    from workloads import SIZES
    n = a.samples or (10_000 if a.quick else SIZES[a.workload])
    systems = ["shardstream"] + ([s for s in a.systems.split(",") if s] if a.peers else [])
    root = a.data or tempfile.mkdtemp(prefix="ss-compare-")
    dirs = {s: os.path.join(root, f"{s}-{a.workload}") for s in systems}
    raw: dict[str, dict[str, Any]] = {s: {"stream": [], "random": []} for s in systems}
    load0, t0 = os.getloadavg(), time.time()
    try:
        for s in systems:
            log(f"pack {s}")
            shutil.rmtree(dirs[s], ignore_errors=True)
            raw[s]["pack"] = pack(s, a.peers, a.workload, n, dirs[s])
        for rnd in range(a.repeat):
            for s in systems:
                log(f"stream {s} (round {rnd + 1})")
                raw[s]["stream"].append(stream(s, a.peers, a.workload, dirs[s], 2, 256))
            for s in systems:
                if s in OPEN:
                    log(f"random access {s} (round {rnd + 1})")
                    raw[s]["random"].append(random_access(s, a.peers, dirs[s], a.draws, a.rounds))
    finally:
        if not a.data:
            shutil.rmtree(root, ignore_errors=True)
    return {"schema": 1, "workload": a.workload, "n": n,
            "workload_label": f"{a.workload} ({LABELS.get(a.workload, '')}), {n:,} samples",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": a.command,
            "wall_s": round(time.time() - t0, 1),
            "machine": dict(machine(), loadavg_start=load0, loadavg_end=os.getloadavg()),
            "versions": versions(a.peers),
            "settings": {"stream_workers": 2, "batch": 256, "draws": a.draws, "rounds": a.rounds,
                         "repeat": a.repeat},
            "systems": [{"key": s, "label": SYSTEMS[s], "ours": s == "shardstream"}
                        for s in systems],
            "measures": figures(raw, systems), "raw": raw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=None, help="python of the peers venv")
    ap.add_argument("--systems", default="wds,mds,litdata,hf", help="peers to run")
    ap.add_argument("--workload", default="tokens")
    ap.add_argument("--samples", type=int, default=None, help="default: the harness size")
    ap.add_argument("--quick", action="store_true", help="10k samples, 2,000 draws, 1 round")
    ap.add_argument("--draws", type=int, default=None, help="random ds[i] draws (20,000)")
    ap.add_argument("--rounds", type=int, default=None, help="timed ds[i] passes (3)")
    ap.add_argument("--repeat", type=int, default=1, help="stream/random rounds (medians)")
    ap.add_argument("--ours-src", default=None,
                    help="import shardstream from this checkout (e.g. a clone at a commit)")
    ap.add_argument("--data", default=None, help="keep the datasets in DIR")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compare.json"))
    ap.add_argument("--charts", default=os.path.join(HERE, "..", "docs", "charts"))
    ap.add_argument("--plot-only", metavar="JSON", default=None)
    a = ap.parse_args()
    a.command = shlex.join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
    for k in ("out", "charts", "plot_only", "data"):   # before a chdir to --ours-src
        if getattr(a, k):
            setattr(a, k, os.path.abspath(getattr(a, k)))
    if a.ours_src:   # children run ``python -c`` here, so "" on their path is this checkout
        src = os.path.abspath(a.ours_src)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        os.chdir(src)
    if a.plot_only:
        data = charts.load(a.plot_only)
    else:
        a.draws = a.draws or (2_000 if a.quick else 20_000)
        a.rounds = a.rounds or (1 if a.quick else 3)
        data = run(a)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(data, f, indent=1)
        log(f"wrote {a.out}")
    for p in charts.draw(data, a.charts):
        log(f"chart {p} ({os.path.getsize(p)} bytes)")
    print(charts.markdown_table(data))


if __name__ == "__main__":
    main()
