"""The anchored ledger: what a person holding the disk can do to node.json, and power cuts.

The anchor here is a stand-in with the NV index's rules (a value, or none when undefined);
tests/integration/test_tpm.py and test_node.py run the same code against a real swtpm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioner.errors import (
    ConfigError,
    StateError,
    TrustError,
    VerificationError,
)
from provisioner.node import config, ledger, model, reconcile
from provisioner.node.model import Guest, ImageRecord, Ledger
from tests.unit.fakes import IMAGE_A, IMAGE_B, enrollment_record, json_values

pytestmark = pytest.mark.unit


class FakeAnchor:
    """The NV index: undefined until written; a write failure models a changed boot state."""

    def __init__(self) -> None:
        self.value: ledger.AnchorValue | None = None
        self.writes = 0
        self.fail_writes = False

    def read(self) -> ledger.AnchorValue | None:
        return self.value

    def write(self, value: ledger.AnchorValue) -> None:
        if self.fail_writes:
            raise TrustError("the TPM refused to write the anchor")
        self.value = ledger.AnchorValue.from_bytes(value.to_bytes())
        self.writes += 1


def enrollment() -> model.Enrollment:
    return ledger.enrollment(enrollment_record())


def entry(image_id: str, generation: int) -> Guest:
    return Guest(image_id, generation, vcpus=1, memory_mb=64, version="1")


def enrolled(tmp_path: Path) -> tuple[FakeAnchor, Ledger]:
    anchor = FakeAnchor()
    book = Ledger(enrollment())
    assert ledger.save(tmp_path, anchor, book)
    return anchor, book


def test_a_saved_ledger_loads_and_an_unchanged_one_writes_nothing(tmp_path: Path) -> None:
    anchor, book = enrolled(tmp_path)
    assert ledger.load(tmp_path, anchor) == book
    assert not ledger.save(tmp_path, anchor, book)
    assert anchor.writes == 1
    book = dataclasses.replace(
        book,
        highest_generation=3,
        floor_image_id=IMAGE_A,
        current=entry(IMAGE_A, 3),
        images={IMAGE_A: ImageRecord("d" * 128, 10, "e" * 64)},
    )
    assert ledger.save(tmp_path, anchor, book)
    assert anchor.value is not None and anchor.value.floor == 3
    assert ledger.load(tmp_path, anchor) == book


def test_an_edited_ledger_is_refused(tmp_path: Path) -> None:
    anchor, _ = enrolled(tmp_path)
    path = tmp_path / ledger.LEDGER_NAME
    data = json.loads(path.read_text())
    data["images"][IMAGE_B] = {"sha512": "f" * 128, "size": 1, "key_sha256": "0" * 64}
    data["current"] = entry(IMAGE_B, 9).as_dict()
    path.write_bytes(ledger.encode(ledger.parse(json.dumps(data).encode())))
    with pytest.raises(TrustError, match="does not match the record in the TPM"):
        ledger.load(tmp_path, anchor)


def test_an_older_copy_is_refused_and_the_floor_survives(tmp_path: Path) -> None:
    anchor, book = enrolled(tmp_path)
    book = dataclasses.replace(book, highest_generation=1, current=entry(IMAGE_A, 1))
    ledger.save(tmp_path, anchor, book)
    old = tmp_path / "old-copy"
    shutil.copy(tmp_path / ledger.LEDGER_NAME, old)
    book = dataclasses.replace(
        book, highest_generation=2, previous=book.current, current=entry(IMAGE_B, 2)
    )
    ledger.save(tmp_path, anchor, book)
    shutil.copy(old, tmp_path / ledger.LEDGER_NAME)  # the attacker restores the old one
    with pytest.raises(TrustError, match="older copy"):
        ledger.load(tmp_path, anchor)
    assert anchor.value is not None and anchor.value.floor == 2
    book = dataclasses.replace(book, highest_generation=1)
    with pytest.raises(StateError, match="lower the generation floor"):
        ledger.save(tmp_path, anchor, book)


def test_a_removed_ledger_is_refused_and_no_anchor_means_not_enrolled(tmp_path: Path) -> None:
    anchor, _ = enrolled(tmp_path)
    (tmp_path / ledger.LEDGER_NAME).unlink()
    with pytest.raises(TrustError, match="removed"):
        ledger.load(tmp_path, anchor)
    with pytest.raises(TrustError, match="never enrolled"):
        ledger.load(tmp_path, FakeAnchor())


@pytest.mark.parametrize("cut", ["before-anchor", "after-anchor", "after-rename"])
def test_a_power_cut_at_any_step_of_a_save_loses_nothing(
    tmp_path: Path, cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    anchor, book = enrolled(tmp_path)
    new = dataclasses.replace(book, highest_generation=5, current=entry(IMAGE_A, 5))

    class Cut(BaseException):
        pass

    real_write, real_replace = anchor.write, ledger.os.replace

    def write(value: ledger.AnchorValue) -> None:
        if cut == "before-anchor":
            raise Cut
        real_write(value)

    def replace(src: Any, dst: Any) -> None:
        final = Path(dst).name == ledger.LEDGER_NAME  # not the temp file of the .next write
        if final and cut == "after-anchor":
            raise Cut
        real_replace(src, dst)
        if final and cut == "after-rename":
            raise Cut

    monkeypatch.setattr(anchor, "write", write)
    monkeypatch.setattr(ledger.os, "replace", replace)
    with pytest.raises(Cut):
        ledger.save(tmp_path, anchor, new)
    monkeypatch.undo()
    loaded = ledger.load(tmp_path, anchor)
    assert loaded == (book if cut == "before-anchor" else new)
    assert not (tmp_path / ledger.NEXT_NAME).exists()


def test_a_planted_next_file_is_not_taken(tmp_path: Path) -> None:
    anchor, book = enrolled(tmp_path)
    forged = dataclasses.replace(book, highest_generation=0, current=entry(IMAGE_B, 0))
    (tmp_path / ledger.NEXT_NAME).write_bytes(ledger.encode(forged))
    assert ledger.load(tmp_path, anchor) == book
    assert not (tmp_path / ledger.NEXT_NAME).exists()


def test_the_anchor_value_round_trips_and_refuses_other_sizes() -> None:
    value = ledger.AnchorValue(7, hashlib.sha256(b"x").digest())
    assert ledger.AnchorValue.from_bytes(value.to_bytes()) == value
    with pytest.raises(TrustError):
        ledger.AnchorValue.from_bytes(b"\x00" * 39)
    with pytest.raises(TrustError):
        ledger.AnchorValue.from_bytes(b"\xff" * 40)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_the_ledger_parser_returns_a_ledger_or_its_own_error(data: bytes) -> None:
    try:
        parsed = ledger.parse(data)
    except TrustError:
        return
    assert ledger.parse(ledger.encode(parsed)) == parsed


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(list(ledger.as_dict(Ledger(enrollment())))),
        json_values,
        max_size=8,
    )
)
def test_a_ledger_with_any_field_replaced_parses_or_is_refused(fields: dict[str, Any]) -> None:
    raw = {**ledger.as_dict(Ledger(enrollment())), **fields}
    try:
        data = json.dumps(raw, allow_nan=False).encode()
    except ValueError:  # NaN and the like cannot even be written
        return
    try:
        ledger.parse(data)
    except TrustError:
        pass


def test_an_empty_pcr_selection_is_refused(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "edgepin"
    etc.mkdir(parents=True)
    (etc / "edgepin.conf").write_text("EDGEPIN_PCRS=\n")
    with pytest.raises(ConfigError, match="without a PCR policy"):
        config.load(tmp_path, environ={})


def test_a_local_copy_is_started_only_if_it_is_what_was_verified(tmp_path: Path) -> None:
    cfg = config.NodeConfig(root=tmp_path)
    cfg.images_dir.mkdir(parents=True)
    disk = cfg.images_dir / f"{IMAGE_A}.qcow2"
    disk.write_bytes(b"verified bytes" * 1000)
    data = disk.read_bytes()
    known = ImageRecord(hashlib.sha512(data).hexdigest(), len(data))
    reconcile.check_local_copy(cfg, known, IMAGE_A)
    disk.write_bytes(b"attacker's bytes" * 1000)
    with pytest.raises(VerificationError, match="is not what this node verified") as e:
        reconcile.check_local_copy(cfg, known, IMAGE_A)
    assert e.value.fields["expected"] == known.sha512
    assert e.value.fields["got"] == hashlib.sha512(disk.read_bytes()).hexdigest()
    disk.unlink()
    with pytest.raises(VerificationError, match="missing"):
        reconcile.check_local_copy(cfg, known, IMAGE_A)
    with pytest.raises(VerificationError, match="no record"):
        reconcile.check_local_copy(cfg, None, IMAGE_B)


def test_a_ledger_of_the_previous_format_is_migrated(tmp_path: Path) -> None:
    """node.json as the previous release wrote it (no floor_image_id) loads, and the
    generation that the current guest runs at keeps naming its image."""
    old = ledger.as_dict(
        Ledger(
            enrollment(),
            highest_generation=4,
            current=entry(IMAGE_A, 4),
            images={IMAGE_A: ImageRecord("d" * 128, 10, "e" * 64)},
        )
    )
    old["format"] = 2
    del old["floor_image_id"]
    data = (json.dumps(old, indent=2, sort_keys=True) + "\n").encode()
    anchor = FakeAnchor()
    anchor.value = ledger.AnchorValue(4, hashlib.sha256(data).digest())
    (tmp_path / ledger.LEDGER_NAME).write_bytes(data)
    book = ledger.load(tmp_path, anchor)
    assert book.floor_image_id == IMAGE_A and book.current == entry(IMAGE_A, 4)
    assert ledger.save(tmp_path, anchor, book)  # saved in the current format
    assert json.loads((tmp_path / ledger.LEDGER_NAME).read_text())["format"] == 3
    assert ledger.load(tmp_path, anchor) == book


def test_the_host_image_gates_cloud_init_on_the_provisioners_anchor_index() -> None:
    """The cloud-init gate (shell, on the image) and the image test name the index that
    provisioner.tpm defines at enrollment; the three must not drift apart."""
    from provisioner import tpm

    root = Path(__file__).resolve().parents[2]
    for script in (
        root / "elements/edgepin-hardening/static/usr/lib/edgepin-host/cloud-init-gate",
        root / "tests/image/check.sh",
    ):
        line = next(ln for ln in script.read_text().splitlines() if "ENROLLED_INDEX=" in ln)
        assert int(line.split("=", 1)[1], 16) == tpm.ANCHOR_NV_INDEX, script


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["network", "usb", "pci", "health_marker", "version", "vcpus"]),
        st.one_of(
            json_values,
            st.sampled_from(["vlan:42", "host", "vlan:0"]),
            st.lists(st.sampled_from(["0000:03:00.0", "class:0c03", "class:0c", "0627:0001"])),
        ),
        max_size=3,
    )
)
def test_a_guest_with_any_field_replaced_parses_or_is_refused(fields: dict[str, Any]) -> None:
    book = Ledger(enrollment(), current=entry(IMAGE_A, 1))
    raw = ledger.as_dict(book)
    raw["current"] = {**raw["current"], **fields}
    try:
        data = json.dumps(raw, allow_nan=False).encode()
    except ValueError:
        return
    try:
        parsed = ledger.parse(data)
    except TrustError:
        return
    assert parsed.current is not None and ledger.parse(ledger.encode(parsed)) == parsed
