"""The image manifest reads what diskimage-builder left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner import imagemanifest

pytestmark = pytest.mark.unit


def test_package_sizes_parse_the_build_record(tmp_path: Path) -> None:
    d = tmp_path / "edgepin-host.d" / "dib-manifests"
    d.mkdir(parents=True)
    (d / "edgepin-package-sizes").write_text("65432\tqemu-system-x86\n12\tbase-files\nbogus\n")
    sizes = imagemanifest.package_sizes(tmp_path, "edgepin-host")
    assert sizes == {"qemu-system-x86": 65432, "base-files": 12}


def test_no_size_record_means_no_sizes(tmp_path: Path) -> None:
    assert imagemanifest.package_sizes(tmp_path, "edgepin-host") == {}


def test_elements_come_from_the_expanded_list_in_the_log() -> None:
    log = "x\n2026 | Expanded element dependencies to: vm edgepin-host bootloader\ny\n"
    assert imagemanifest.elements_used(log) == ["bootloader", "edgepin-host", "vm"]
    assert imagemanifest.elements_used("nothing") == []


def test_a_missing_dpkg_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no dpkg manifest"):
        imagemanifest.dpkg_manifest(tmp_path, "edgepin-host")
