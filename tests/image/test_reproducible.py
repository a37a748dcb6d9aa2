"""Two builds of the host image from the same inputs give the same root, byte for byte.

The inputs: the same elements and provisioner (this checkout), the same pin file (the
first build's ``edgepin-host.pins.json``), the same ``SOURCE_DATE_EPOCH`` and the same
settings. The root partition is a squashfs made from the files alone
(``elements/edgepin-readonly/squash-root``), so the same files give the same bytes, the
same dm-verity root hash, and with it the same kernel command line, which GRUB measures
into PCR 8; the two host updates hold the same root, hash tree and kernel. What still
differs between two builds (the boot partition's initramfs, ext4
metadata of the boot and state partitions): docs/host-image.md#reproducibility.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from provisioner import hostupdate
from tests.image.compare_builds import compare, partition_sha256
from tests.testbed import disk
from tests.testbed.hostimage import ImageSigner, build_image, image_args

pytestmark = pytest.mark.image

VERITY_CFG = "EFI/edgepin/verity-a.cfg"


def test_two_builds_of_the_same_inputs_give_the_same_root_bytes_and_root_hash(
    host_image: Path,
    image_signer: ImageSigner,
    cache_dir: Path,
    tmp_path: Path,
    results_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if os.environ.get("EDGEPIN_HOST_IMAGE"):
        pytest.skip("EDGEPIN_HOST_IMAGE names an image built elsewhere: its inputs are unknown")
    first = json.loads(host_image.with_name("edgepin-host.manifest.json").read_text())
    pins = host_image.with_name("edgepin-host.pins.json")
    epoch = first["inputs"]["settings"]["source_date_epoch"]
    out = cache_dir / "image-tier" / "again"
    shutil.rmtree(out, ignore_errors=True)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
    try:
        again = build_image(out, [*image_args(image_signer), "--pins", str(pins)])
        second = json.loads(again.with_name("edgepin-host.manifest.json").read_text())
        # the same packages, at the same versions, went in
        assert [p["version"] for p in second["packages"]] == [
            p["version"] for p in first["packages"]
        ]
        root = first["root_image"]
        assert root["format"] == "squashfs" and root["bytes"] > 0, root
        assert second["root_image"] == root, (first["root_image"], second["root_image"])
        assert second["verity_root_hash"] == first["verity_root_hash"]
        # the host updates of the two builds: the same root, hash tree, kernel and version
        update_a = hostupdate.read(host_image.with_name("edgepin-host.update.tar"))
        update_b = hostupdate.read(again.with_name("edgepin-host.update.tar"))
        assert update_a.verity == update_b.verity
        assert update_a.host_version == update_b.host_version == int(epoch)
        for name in (hostupdate.ROOT, hostupdate.VERITY, hostupdate.KERNEL):
            assert update_a.member(name) == update_b.member(name), name
        # what GRUB reads from the ESP and puts on the measured command line
        raw_a, raw_b = tmp_path / "a.raw", tmp_path / "b.raw"
        disk.to_raw(host_image, raw_a)
        disk.to_raw(again, raw_b)
        assert disk.esp_file(raw_a, VERITY_CFG) == disk.esp_file(raw_b, VERITY_CFG)
        # and the root partitions themselves, every byte, the zeros after the squashfs too
        assert partition_sha256(raw_a) == partition_sha256(raw_b)
        raw_a.unlink()
        raw_b.unlink()
        # file by file, for the record (docs/host-image.md#reproducibility): the root has
        # no difference; what differs elsewhere is kept in the results
        report = compare(host_image, again)
        (results_dir / "reproducibility.json").write_text(json.dumps(report, indent=2) + "\n")
        root_report = report["root"]
        assert isinstance(root_report, dict)
        assert root_report["differ"] == [], root_report["differ"][:10]
        assert root_report["only_in_a"] == root_report["only_in_b"] == []
        assert report["root_partition_identical"] is True
    finally:
        shutil.rmtree(out, ignore_errors=True)
