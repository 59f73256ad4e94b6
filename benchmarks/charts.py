"""Charts and a Markdown table from the peer comparison's JSON (``compare.py`` writes it).

    python benchmarks/charts.py benchmarks/results/compare.json docs/charts

One PNG per measure: horizontal bars, ours highlighted, each bar labelled with its
value and its ratio to ours (system / ours). Only matplotlib (Agg) is needed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

OURS_COLOR, PEER_COLOR, NONE_COLOR = "#d6604d", "#8c9bab", "#bbbbbb"


def load(path: str) -> dict[str, Any]:
    """The comparison JSON at ``path``."""
    with open(path) as f:
        return json.load(f)


def human(value: float, unit: str) -> str:
    """``136765346, "bytes"`` -> ``136.8 MB``; ``44776, "samples/s"`` -> ``44.8k/s``."""
    if unit == "bytes":
        for div, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= div:
                return f"{value / div:.1f} {suffix}"
        return f"{value:.0f} B"
    rate = unit.endswith("/s")
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= div:
            return f"{value / div:.3g}{suffix}" + ("/s" if rate else "")
    return f"{value:.3g}" + ("/s" if rate else "")


def ratio(value: float | None, ours: float | None) -> float | None:
    """``value / ours``, or None when either is missing."""
    if value is None or not ours:
        return None
    return value / ours


def _ratio_text(r: float | None) -> str:
    if r is None:
        return ""
    return (f"{r:.0f}" if r >= 10 else f"{r:.2g}") + "x ours"


def ours_key(data: dict[str, Any]) -> str:
    """The key of the system marked ``"ours": true``."""
    return next(s["key"] for s in data["systems"] if s.get("ours"))


def draw(data: dict[str, Any], out_dir: str, *, dpi: int = 80) -> list[str]:
    """One PNG per entry of ``data["measures"]`` in ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    ours = ours_key(data)
    systems = data["systems"]
    paths = []
    for name, m in data["measures"].items():
        vals = m["values"]
        known = [v for v in vals.values() if v is not None]
        top = max(known) if known else 1.0
        fig, ax = plt.subplots(figsize=(7.2, 0.5 * len(systems) + 1.3), dpi=dpi)
        labels = []
        for row, s in enumerate(systems):
            v = vals.get(s["key"])
            labels.append(s["label"])
            if v is None:
                ax.text(top * 0.01, row, m.get("notes", {}).get(s["key"], "n/a"), va="center",
                        color="#666666", fontsize=9, style="italic")
                continue
            color = OURS_COLOR if s["key"] == ours else PEER_COLOR
            ax.barh(row, v, color=color, height=0.65)
            text = human(v, m["unit"])
            if s["key"] != ours:
                text += "  (" + _ratio_text(ratio(v, vals.get(ours))) + ")"
            ax.text(v + top * 0.01, row, text, va="center", fontsize=9,
                    fontweight="bold" if s["key"] == ours else "normal")
        ax.set_yticks(range(len(systems)), labels)
        ax.invert_yaxis()
        for tick, s in zip(ax.get_yticklabels(), systems):
            if s["key"] == ours:
                tick.set_fontweight("bold")
        ax.set_xlim(0, top * 1.45)
        ax.set_xticks([])
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
        better = "higher" if m.get("higher_is_better", True) else "lower"
        ax.set_title(f"{m['title']} ({better} is better)\n{data['workload_label']}, same run",
                     fontsize=10, loc="left")
        fig.text(0.99, 0.01, f"{data['date'][:10]}, {data['machine'].get('cpus')} CPUs; "
                 "benchmarks/compare.py", ha="right", va="bottom", fontsize=7, color="#666666")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown_table(data: dict[str, Any]) -> str:
    """One row per system, one column per measure: value and ratio to ours."""
    ours = ours_key(data)
    measures = data["measures"]
    head = "| system | " + " | ".join(m["short"] for m in measures.values()) + " |"
    lines = [head, "|---" * (len(measures) + 1) + "|"]
    for s in data["systems"]:
        cells = []
        for m in measures.values():
            v = m["values"].get(s["key"])
            if v is None:
                cells.append(m.get("notes", {}).get(s["key"], "n/a"))
                continue
            cell = human(v, m["unit"])
            if s["key"] != ours:
                cell += f" ({_ratio_text(ratio(v, m['values'].get(ours)))})"
            cells.append(f"**{cell}**" if s["key"] == ours else cell)
        name = f"**{s['label']}**" if s["key"] == ours else s["label"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit(__doc__)
    data = load(args[0])
    for p in draw(data, args[1]):
        print(p, os.path.getsize(p), "bytes")
    print(markdown_table(data))


if __name__ == "__main__":
    main()
