"""The test bed, the benchmarks and the demo (``tests/testbed/``, ``benchmarks/``) import no
test module: what they share with the tests lives in the test bed, which the tests import."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIERS = ("tests.unit", "tests.integration", "tests.image")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_test_bed_and_the_benchmarks_import_no_test_module() -> None:
    files = sorted(
        [*(REPO / "tests" / "testbed").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    )
    assert len(files) > 10, files
    found = [
        f"{f.relative_to(REPO)}: {name}"
        for f in files
        for name in sorted(imported(f))
        if any(name == t or name.startswith(t + ".") for t in TIERS)
    ]
    assert found == []
