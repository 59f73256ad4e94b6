"""benchmarks/charts.py draws one PNG per measure from a saved comparison JSON (no peers)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
PNG = b"\x89PNG\r\n\x1a\n"


def small_json(path: str) -> dict:
    """A comparison in compare.py's schema: 3 systems, 3 measures, one value missing."""
    systems = [{"key": "shardstream", "label": "shardstream", "ours": True},
               {"key": "wds", "label": "webdataset", "ours": False},
               {"key": "hf", "label": "HF datasets", "ours": False}]
    measures = {
        "pack": {"title": "Packing", "short": "pack", "unit": "samples/s",
                 "higher_is_better": True, "notes": {},
                 "values": {"shardstream": 44776, "wds": 3160, "hf": 35243}},
        "random": {"title": "Random access", "short": "ds[i]", "unit": "/s",
                   "higher_is_better": True, "notes": {"wds": "no ds[i]"},
                   "values": {"shardstream": 338000.0, "wds": None, "hf": 7300}},
        "size": {"title": "Size on disk", "short": "on disk", "unit": "bytes",
                 "higher_is_better": False, "notes": {},
                 "values": {"shardstream": 136765346, "wds": 505000000, "hf": 132416156}}}
    data = {"schema": 1, "workload": "tokens", "n": 1000, "workload_label": "tokens, 1,000",
            "date": "2026-01-01T00:00:00+00:00", "command": "python benchmarks/compare.py",
            "machine": {"cpus": 2}, "versions": {}, "systems": systems, "measures": measures}
    with open(path, "w") as f:
        json.dump(data, f)
    return data


def check_pngs(directory: str, names: list[str]) -> None:
    assert sorted(os.listdir(directory)) == sorted(f"{n}.png" for n in names)
    for n in names:
        with open(os.path.join(directory, f"{n}.png"), "rb") as f:
            head = f.read(24)
            size = 24 + len(f.read())
        assert head[:8] == PNG and head[12:16] == b"IHDR"
        width, height = struct.unpack(">II", head[16:24])
        assert 200 < width < 2000 and 100 < height < 2000
        assert size < 100_000


def test_draw_one_png_per_measure(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    sys.path.insert(0, BENCH)
    try:
        import charts
    finally:
        sys.path.remove(BENCH)
    data = small_json(str(tmp_path / "c.json"))
    paths = charts.draw(charts.load(str(tmp_path / "c.json")), str(tmp_path / "out"))
    assert len(paths) == len(data["measures"]) == 3
    check_pngs(str(tmp_path / "out"), list(data["measures"]))
    table = charts.markdown_table(data)
    assert "| **shardstream** |" in table and "no ds[i]" in table
    assert "0.071x ours" in table and "3.7x ours" in table   # 3160 / 44776, 505 / 136.8 MB


def test_compare_plot_only(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    data = small_json(str(tmp_path / "c.json"))
    r = subprocess.run([sys.executable, os.path.join(BENCH, "compare.py"), "--plot-only",
                        str(tmp_path / "c.json"), "--charts", str(tmp_path / "charts")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check_pngs(str(tmp_path / "charts"), list(data["measures"]))
    assert sum(x.startswith("| ") for x in r.stdout.splitlines()) == len(data["systems"]) + 1
