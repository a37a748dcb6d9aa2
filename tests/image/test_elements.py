"""The elements follow diskimage-builder's conventions: dib-lint is clean, and every
DIB_* variable an element reads is documented in its README.rst with its default."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[2]
ELEMENTS = REPO / "elements"
DIB_VENV = REPO / ".venv-dib"


def edgepin_elements() -> list[Path]:
    return sorted(p for p in ELEMENTS.iterdir() if p.is_dir())


def test_dib_lint_is_clean(tmp_path: Path) -> None:
    lint = DIB_VENV / "bin" / "dib-lint"
    assert lint.exists(), "the build venv is missing: ./build.sh setup makes it"
    r = subprocess.run(
        [str(lint)],
        cwd=REPO,
        env={
            "PATH": f"{DIB_VENV / 'bin'}:/usr/bin:/bin",
            "ELEMENTS_DIR": "elements",
            # dib-lint also checks diskimage-builder's own lib folder: give it an empty one
            "LIB_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # the checks really ran, on our files
    assert "Checking elements/edgepin-provisioner/install.d/50-edgepin-provisioner" in r.stdout


@pytest.mark.parametrize("element", edgepin_elements(), ids=lambda p: p.name)
def test_every_dib_variable_is_documented_with_its_default(element: Path) -> None:
    readme = (element / "README.rst").read_text()
    used: set[str] = set()
    for path in element.rglob("*"):
        if path.is_file() and "host-shims" not in path.parts:
            used |= set(re.findall(r"\bDIB_EDGEPIN_[A-Z_]+\b", path.read_text(errors="ignore")))
    for env in (element / "environment.d").glob("*"):
        used |= set(re.findall(r"export (DIB_[A-Z_]+)=", env.read_text()))
    assert used, f"{element.name} reads no DIB_* variable?"
    for name in sorted(used):
        section = re.search(rf"^{name}\n  :Default: (.+)$", readme, re.M)
        assert section, f"{element.name}/README.rst does not document {name} with its default"
