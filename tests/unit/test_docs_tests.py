"""The tests the docs point at exist: every trust claim names the test that proves it, and a
claim whose test was renamed or removed would point at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `tests/integration/test_node.py::test_x`, `test_tpm.py::test_y`, `test_node_image.py::test_3_…`
REFERENCE = re.compile(r"((?:tests/[a-z_/]+/)?test_[a-z0-9_]+\.py)(?:::(test_[A-Za-z0-9_]*…?))?")


def _file(name: str) -> Path | None:
    if "/" in name:
        path = ROOT / name
        return path if path.is_file() else None
    found = sorted((ROOT / "tests").rglob(name))
    return found[0] if len(found) == 1 else None


def _tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
    }


def test_every_test_the_docs_name_exists() -> None:
    problems, seen = [], 0
    for doc in DOCS:
        # a reference may be wrapped over two lines inside its backticks
        text = re.sub(r"/\n\s*", "/", doc.read_text())
        for m in REFERENCE.finditer(text):
            seen += 1
            where = f"{doc.relative_to(ROOT)}: {m.group(0)}"
            path = _file(m.group(1))
            if path is None:
                problems.append(f"{where}: no such test file (or more than one of that name)")
                continue
            name = m.group(2)
            if name is None:
                continue
            tests = _tests(path)
            if name.endswith("…"):
                if not any(t.startswith(name[:-1]) for t in tests):
                    problems.append(f"{where}: no test in {path.name} starts so")
            elif name not in tests:
                problems.append(f"{where}: {path.name} has no such test")
    assert seen > 20, f"only {seen} references found: the pattern no longer matches the docs"
    assert not problems, "\n".join(problems)
