"""The results: one row per figure (value, baseline, ratio), a table, and a JSON file with
a Markdown copy of the table beside it that names the run (command, commit, time, load):
the tables in docs/performance.md are pasted from those files, one run each."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Row:
    section: str
    metric: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    goal: str = ""


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def table(rows: list[Row]) -> Table:
    t = Table(title="edgepin benchmarks (ratios against baselines measured in this run)")
    for col in ("section", "metric", "value", "baseline", "ratio", "goal"):
        t.add_column(col, justify="right" if col in ("value", "ratio") else "left")
    for r in rows:
        base = f"{r.baseline} = {_fmt(r.baseline_value)}" if r.baseline else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        t.add_row(r.section, r.metric, f"{_fmt(r.value)} {r.unit}".strip(), base, ratio, r.goal)
    return t


def print_table(rows: list[Row]) -> None:
    Console(width=160).print(table(rows))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(meta: dict[str, Any], rows: list[Row], name: str) -> str:
    """The table as Markdown, headed by what produced it."""
    load = "-".join(f"{meta.get(k, [0.0])[0]:.1f}" for k in ("loadavg_start", "loadavg_end"))
    head = (
        f"Run `{name}`: `{meta.get('command', '?')}` at commit {meta.get('commit', 'unknown')}, "
        f"{meta.get('started', '?')} to {meta.get('finished', '?')}, "
        f"{meta.get('cpus', '?')} CPUs, load average {load}"
    )
    if "failed" in meta:
        head += f"; FAILED: {meta['failed']}"
    lines = [
        head,
        "",
        "| section | metric | value | baseline | ratio | goal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = f"{r.baseline} = {_fmt(r.baseline_value)}" if r.baseline else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        value = f"{_fmt(r.value)} {r.unit}".strip()
        cells = (r.section, r.metric, value, base, ratio, r.goal)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(directory: Path, meta: dict[str, Any], rows: list[Row], raw: dict[str, Any]) -> Path:
    """``<timestamp>.json`` (every figure with its raw samples) and ``<timestamp>.md``."""
    directory.mkdir(parents=True, exist_ok=True)
    name = time.strftime("%Y%m%dT%H%M%S")
    path = directory / f"{name}.json"
    doc = {"meta": meta, "rows": [asdict(r) for r in rows], "raw": raw}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (directory / f"{name}.md").write_text(markdown(meta, rows, name))
    return path
