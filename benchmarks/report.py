"""Turning rows into the printed table, the JSON record and the PNG chart.

The PNG needs matplotlib (``pip install -e '.[bench]'``); without it the run still prints
the table and writes the JSON, and says how to get the chart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from .scenarios import Row

__all__ = ["table", "markdown_table", "write_json", "write_png", "RESULTS"]

RESULTS: Final = Path(__file__).resolve().parent / "results"
TARGETS: Final = ("direct", "pgbouncer", "pgguard")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("tps", "conn/s", "1/s", "clients", "sessions"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.3f}"
    if unit in ("KiB",):
        return f"{value:.2f}"
    if unit == "MB/s":
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _ratio_text(row: Row) -> str:
    single = row.values.get("single")
    if row.baseline == "single" and single is not None:  # the cluster rows: vs one pgguard
        added = f"{row.details['added_ms']:+.3f} ms, " if "added_ms" in row.details else ""
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x "
        return f"{added}{ratio}single ({_fmt(single, row.unit)})"
    if "added_us" in row.details:
        return f"{row.details['added_us']:+.0f} us"
    if row.ratio is None or row.baseline is None:
        return ""
    return f"{row.ratio:.2f}x {row.baseline}"


def _result(row: Row) -> str:
    return {True: "PASS", False: "MISS", None: ""}[row.passed]


def _cells(row: Row, targets: Sequence[str]) -> list[str]:
    values = [_fmt(row.values.get(t), row.unit) if t in row.values else "n/a" for t in targets]
    if row.scenario.startswith("storm admission wait"):
        values = []
        for t in targets:
            d = row.details.get(t)
            values.append("/".join(f"{d[p]:.0f}" for p in ("p50", "p99", "max")) if d else "n/a")
    return [row.scenario, f"{row.metric} ({row.unit})", *values, _ratio_text(row), row.target, _result(row)]


def _header(targets: Sequence[str]) -> list[str]:
    return ["scenario", "metric", *targets, "pgguard vs", "target", "result"]


def table(rows: Sequence[Row], targets: Sequence[str] = TARGETS) -> str:
    """A fixed-width text table of every row."""
    lines = [_header(targets), *(_cells(r, targets) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i < 2 or i >= len(line) - 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: Sequence[Row], targets: Sequence[str] = TARGETS) -> str:
    """The same table as GitHub markdown, for docs/benchmarks.md."""
    head = _header(targets)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        out.append("| " + " | ".join(_cells(row, targets)) + " |")
    return "\n".join(out)


def write_json(path: Path, machine: dict[str, Any], settings: dict[str, Any],
               rows: Sequence[Row], notes: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, "settings": settings, "notes": list(notes),
           "rows": [r.as_dict() for r in rows]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def _summary(row: Row) -> str:
    if row.scenario.startswith("storm admission wait"):
        vals = ", ".join(
            f"{k} " + "/".join(f"{d[p]:.0f}" for p in ("p50", "p99", "max")) for k, d in row.details.items()
        )
        return f"{row.scenario} p50/p99/max ms: {vals}"
    vals = ", ".join(f"{k} {_fmt(v, row.unit)}" for k, v in row.values.items())
    return f"{row.scenario}: {row.metric} {vals} {row.unit}  [{row.target}] {_result(row)}"


def write_png(path: Path, machine: dict[str, Any], rows: Sequence[Row], notes: Sequence[str]) -> str | None:
    """Draw pgguard's standing per scenario against its goal; return why not, if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install -e '.[bench]')"
    charted = [r for r in rows if r.score is not None and r.goal is not None]
    others = [r for r in rows if r not in charted]
    footer = [_summary(r) for r in others] + [f"note: {n}" for n in notes]
    chart_h = 0.9 + 0.55 * max(1, len(charted))
    text_h = 0.2 + 0.16 * len(footer)
    fig, (ax, tx) = plt.subplots(
        2, 1, figsize=(11, chart_h + text_h), gridspec_kw={"height_ratios": [chart_h, text_h]}
    )
    ys = list(range(len(charted)))
    scores = [float(r.score) for r in charted]  # type: ignore[arg-type]
    goals = [float(r.goal) for r in charted]  # type: ignore[arg-type]
    colours = ["#2e7d32" if r.passed else "#c62828" for r in charted]
    ax.barh(ys, scores, color=colours, height=0.55, left=0)
    for y, score, goal, r in zip(ys, scores, goals, charted, strict=True):
        ax.plot([goal, goal], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(max(score, goal) * 1.02, y, f"  {score:.2f}x {_result(r)}", va="center", fontsize=8)
    ax.set_yticks(ys, [f"{r.scenario}\n{r.target}" for r in charted], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    if charted:
        ax.set_xlim(min([0.5, *scores, *goals]) * 0.8, max([2.0, *scores, *goals]) * 2.5)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("pgguard relative to its baseline (log scale; higher is better; "
                  "black tick = target; latency shown as speed)", fontsize=8)
    ax.set_title(
        f"pgguard benchmark {machine.get('date', '')}: {machine.get('nproc')} cores "
        f"({machine.get('cpu_model', '')}), Python {machine.get('python')}, "
        f"uvloop {machine.get('uvloop')}; proxies reach PostgreSQL by "
        f"{machine.get('proxies_reach_server_by', 'tcp')}",
        fontsize=9,
    )
    tx.axis("off")
    tx.text(0, 1, "\n".join(footer), fontsize=7, va="top", family="monospace", transform=tx.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
