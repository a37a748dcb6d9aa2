"""The image manifest reads what diskimage-builder left behind."""

from __future__ import annotations

import json
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


def _built_out(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    d = out / "edgepin-host.d" / "dib-manifests"
    d.mkdir(parents=True)
    (d / "dib-manifest-dpkg-edgepin-host").write_text(
        json.dumps({"packages": [{"package": "base-files", "version": "13", "arch": "amd64"}]})
    )
    wheel = tmp_path / "edgepin-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    return out, wheel


def test_the_manifest_records_the_root_squashfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imagemanifest, "git_commit", lambda repo: "0" * 40)
    out, wheel = _built_out(tmp_path)
    digest = "ab" * 32
    args = ["--out", str(out), "--name", "edgepin-host", "--elements-dir", str(tmp_path)]
    args += ["--wheel", str(wheel), "--verity-root-hash", "cd" * 32]
    assert imagemanifest.main([*args, "--root-image", "123456", digest]) == 0
    manifest = json.loads((out / "edgepin-host.manifest.json").read_text())
    assert manifest["root_image"] == {"format": "squashfs", "bytes": 123456, "sha256": digest}
    assert manifest["verity_root_hash"] == "cd" * 32
    # without it (an image built before the root was a squashfs): no root image
    assert imagemanifest.main(args) == 0
    assert json.loads((out / "edgepin-host.manifest.json").read_text())["root_image"] is None
    for bad in (["12x", digest], ["12", "AB" * 32], ["12", "ab"]):
        with pytest.raises(SystemExit):
            imagemanifest.main([*args, "--root-image", *bad])
