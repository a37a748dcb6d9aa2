"""The results: one row per figure (value, baseline, ratio), a table and a JSON file."""

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


def write_json(directory: Path, meta: dict[str, Any], rows: list[Row], raw: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{time.strftime('%Y%m%dT%H%M%S')}.json"
    doc = {"meta": meta, "rows": [asdict(r) for r in rows], "raw": raw}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
