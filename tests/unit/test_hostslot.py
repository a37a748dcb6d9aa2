"""provisioner.node.hostslot: the two root slots on a node laid out in files, GRUB's part
played as grub.cfg does it (tests.hostupdates)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioner import hostupdate
from provisioner.errors import HostSlotError, HostUpdateError
from provisioner.node import hostslot
from provisioner.node.config import NodeConfig
from provisioner.node.facts import host_slot_facts
from tests.hostupdates import esp_slot, lay_out_slots, write
from tests.hostupdates import grub_boots as grub

BLOCK = hostupdate.BLOCK
VERSION = 1764940000  # tests.hostupdates.write's host version


def node(tmp_path: Path, booted: str = "a", version: int = VERSION - 1) -> NodeConfig:
    """A node root booted from ``booted`` (tests.hostupdates.lay_out_slots)."""
    root = tmp_path / "node"
    lay_out_slots(root, booted)
    return NodeConfig(root=root, host_version=version)


def esp(cfg: NodeConfig, name: str) -> str:
    return esp_slot(cfg.root, name)


def grub_boots(cfg: NodeConfig) -> str:
    return grub(cfg.root)


def update(tmp_path: Path, **changes: object) -> tuple[Path, hostupdate.HostUpdate, dict]:
    (tmp_path / "u").mkdir(exist_ok=True)
    return write(tmp_path / "u", **changes)


def test_an_environment_block_names_a_slot_or_is_refused() -> None:
    for slot in hostslot.SLOTS:
        block = hostslot.env_block(slot)
        assert len(block) == 1024 and block.startswith(b"# GRUB Environment Block\n")
        assert hostslot.parse_env_block(block, "boot.env") == slot
    bad = {
        "short": hostslot.env_block("a")[:-1],
        "other slot": hostslot.env_block("a").replace(b"default=a", b"default=c"),
        "two": hostslot.env_block("a").replace(b"default=a\n#", b"default=a\nx=1"),
        "header": hostslot.env_block("a").replace(b"GRUB", b"GRUX"),
    }
    for what, data in bad.items():
        with pytest.raises(HostSlotError):
            hostslot.parse_env_block(data, what)


@given(st.binary(max_size=1100))
def test_any_bytes_on_the_esp_give_a_slot_or_edgepin_s_error(data: bytes) -> None:
    try:
        assert hostslot.parse_env_block(data, "boot.env") in hostslot.SLOTS
    except HostSlotError:
        pass


@given(st.text(max_size=200))
def test_any_command_line_gives_a_slot_or_none(cmdline: str) -> None:
    assert hostslot.booted_slot(cmdline) in (None, "a", "b")


def test_the_slot_states() -> None:
    S = hostslot.Slots
    assert S("a", "a", "a").state == "running"
    assert S("a", "b", "a").state == "armed" and S("a", "b", "a").armed
    assert S("b", "a", "a").state == "on trial" and S("b", "a", "a").trial
    assert S("b", "b", "b").state == "running"
    assert hostslot.booted_slot("ro edgepin.slot=b quiet") == "b"
    assert hostslot.booted_slot("ro edgepin.slot=c") is None
    assert hostslot.booted_slot("ro") is None


@given(st.binary(max_size=400))
def test_any_record_gives_a_pending_update_or_edgepin_s_error(data: bytes) -> None:
    try:
        hostslot.parse_pending(data)
    except HostSlotError:
        pass


def test_an_update_goes_into_the_other_slot_boots_once_and_stays_once_healthy(
    tmp_path: Path,
) -> None:
    cfg = node(tmp_path)
    path, upd, d = update(tmp_path)
    said: list[str] = []
    written, slots = hostslot.install(cfg, path, log=said.append)
    assert written == upd and said
    assert (slots.booted, slots.next, slots.after, slots.state) == ("a", "b", "a", "armed")
    assert host_slot_facts(cfg)["host_next"] == VERSION  # reported: the next boot tries it
    layout = hostslot.Layout.of(cfg)
    # the squashfs, then zeros to data_bytes; the tree, then zeros
    root_b = layout.partition("root-b").read_bytes()
    assert root_b == d["root"].ljust(upd.verity.data_bytes, b"\0")
    verity_b = layout.partition("verity-b").read_bytes()
    assert verity_b == d["tree"].ljust(8 * BLOCK, b"\0")
    # slot a untouched
    assert layout.partition("root-a").read_bytes() == b"\x5a" * 16 * BLOCK
    boot_b = layout.partition("boot") / "slot-b"
    assert (boot_b / "vmlinuz").read_bytes() == b"kernel" * 100
    assert (boot_b / "initrd.img").read_bytes() == b"initrd" * 50
    assert (boot_b / "kernel-version").read_text().strip() == upd.kernel_version
    cfg_b = layout.esp_file("verity-b.cfg").read_text()
    assert f"set edgepin_roothash={upd.verity.root_hash}\n" in cfg_b
    record = hostslot.pending(cfg)
    assert record == hostslot.Pending("b", VERSION, "edgepin-host", "a", VERSION - 1)
    # the next boot is slot b's one try
    assert grub_boots(cfg) == "b"
    assert hostslot.read_slots(layout).state == "on trial"
    assert host_slot_facts(cfg) == {
        "host_slot": "b",
        "host_fallback": 0,
        "host_next": 0,
        "host_refused": "",
    }
    # not healthy yet: nothing kept
    assert hostslot.settle(cfg, healthy=False) is None
    assert esp(cfg, "boot.env") == "a"
    said_commit = hostslot.settle(cfg, healthy=True)
    assert said_commit and "root slot b committed" in said_commit
    assert (esp(cfg, "boot.env"), esp(cfg, "after.env")) == ("b", "b")
    assert hostslot.pending(cfg) is None
    # and every boot after that is slot b's
    assert grub_boots(cfg) == "b" and grub_boots(cfg) == "b"
    assert hostslot.read_slots(layout).state == "running"


def test_a_slot_that_never_gets_healthy_is_left_at_the_next_start(tmp_path: Path) -> None:
    cfg = node(tmp_path)
    path, _, _ = update(tmp_path)
    hostslot.install(cfg, path)
    assert grub_boots(cfg) == "b"  # slot b's try: it stops, hangs or never gets healthy
    assert grub_boots(cfg) == "a"  # the next start, whatever happened
    said = hostslot.settle(cfg, healthy=True)
    assert said and "did not come up healthy: back on root slot a" in said
    assert hostslot.read_slots(hostslot.Layout.of(cfg)).state == "running"
    assert host_slot_facts(cfg) == {
        "host_slot": "a",
        "host_fallback": VERSION,
        "host_next": 0,
        "host_refused": "",
    }
    assert hostslot.settle(cfg, healthy=True) is None  # said once
    assert grub_boots(cfg) == "a"


def test_the_trial_verdict() -> None:
    trial = hostslot.Slots(booted="b", next="a", after="a")
    kept = hostslot.Slots(booted="b", next="b", after="b")
    armed = hostslot.Slots(booted="a", next="b", after="a")
    assert hostslot.trial_verdict(trial, 0, 10) == "wait"
    assert hostslot.trial_verdict(trial, 9.9, 10) == "wait"
    assert hostslot.trial_verdict(trial, 10, 10) == "leave"
    assert hostslot.trial_verdict(kept, 99, 10) == "kept"
    assert hostslot.trial_verdict(armed, 99, 10) == "kept"  # not a trial: nothing to leave


class Restarts:
    """What the restart command would do, counted; ``works`` False: it fails."""

    def __init__(self, works: bool = True) -> None:
        self.works, self.count = works, 0

    def __call__(self, cfg: NodeConfig) -> bool:
        self.count += 1
        return self.works


class Clock:
    """A clock that moves only when the watch sleeps, and an action at a given time."""

    def __init__(self, at: float = 0, then: Callable[[], object] | None = None) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.at, self.then = at, then

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.slept.append(seconds)
        self.now += seconds
        if self.then is not None and self.now >= self.at:
            self.then()
            self.then = None


def test_a_trial_that_is_not_kept_in_time_restarts_into_the_old_slot(tmp_path: Path) -> None:
    cfg = node(tmp_path)
    cfg = NodeConfig(root=cfg.root, host_version=cfg.host_version, host_trial_timeout=12)
    said: list[str] = []
    clock, restarted = Clock(), Restarts()
    # not a trial: nothing to watch, at once
    assert hostslot.watch(cfg, clock=clock, sleep=clock.sleep, say=said.append, leave=restarted)
    assert "is not on trial" in said[-1] and clock.slept == [] and restarted.count == 0

    path = update(tmp_path)[0]
    hostslot.install(cfg, path)
    assert grub_boots(cfg) == "b"
    assert hostslot.watch(cfg, clock=clock, sleep=clock.sleep, say=said.append, leave=restarted)
    assert "root slot b is on trial: unless the node is healthy on it within 12 s" in said[1]
    assert clock.slept == [5, 5, 2] and restarted.count == 1
    assert said[-1] == (
        "host: root slot b did not get healthy within 12 s: restarting into root slot a"
    )
    assert grub_boots(cfg) == "a"  # what the restart boots

    # a restart that fails: the watch says so
    hostslot.install(cfg, path)
    assert grub_boots(cfg) == "b"
    short = NodeConfig(root=cfg.root, host_version=cfg.host_version, host_trial_timeout=1)
    clock, failing = Clock(), Restarts(works=False)
    assert not hostslot.watch(short, clock=clock, sleep=clock.sleep, say=said.append, leave=failing)
    assert clock.slept == [1] and failing.count == 1


def test_a_trial_kept_by_the_reconcile_ends_the_watch_without_a_restart(tmp_path: Path) -> None:
    cfg = node(tmp_path)
    cfg = NodeConfig(root=cfg.root, host_version=cfg.host_version, host_trial_timeout=600)
    hostslot.install(cfg, update(tmp_path)[0])
    assert grub_boots(cfg) == "b"
    said: list[str] = []
    clock, restarted = Clock(at=30, then=lambda: hostslot.settle(cfg, healthy=True)), Restarts()
    assert hostslot.watch(cfg, clock=clock, sleep=clock.sleep, say=said.append, leave=restarted)
    assert said[-1] == "host: root slot b is kept: the trial watch ends"
    assert clock.now == 30 and restarted.count == 0
    assert (esp(cfg, "boot.env"), esp(cfg, "after.env")) == ("b", "b")


def test_an_unreadable_esp_during_a_trial_is_still_a_trial(tmp_path: Path) -> None:
    cfg = node(tmp_path)
    cfg = NodeConfig(root=cfg.root, host_version=cfg.host_version, host_trial_timeout=10)
    hostslot.install(cfg, update(tmp_path)[0])
    assert grub_boots(cfg) == "b"
    boot_env = hostslot.Layout.of(cfg).esp_file("boot.env")
    said: list[str] = []
    clock, restarted = Clock(at=5, then=lambda: boot_env.write_bytes(b"garbage")), Restarts()
    assert hostslot.watch(cfg, clock=clock, sleep=clock.sleep, say=said.append, leave=restarted)
    assert any("cannot be read" in s and "still on trial" in s for s in said), said
    assert restarted.count == 1


def test_an_update_that_is_not_newer_not_whole_or_does_not_fit_changes_nothing(
    tmp_path: Path,
) -> None:
    cfg = node(tmp_path, version=VERSION)
    path, _, _ = update(tmp_path)
    layout = hostslot.Layout.of(cfg)
    before = {p.name: p.read_bytes() for p in layout.esp.rglob("*") if p.is_file()}

    def unchanged() -> None:
        assert {p.name: p.read_bytes() for p in layout.esp.rglob("*") if p.is_file()} == before
        assert hostslot.pending(cfg) is None
        assert hostslot.read_slots(layout).state == "running"

    with pytest.raises(HostSlotError, match="not newer than this host"):
        hostslot.install(cfg, path)
    unchanged()
    cfg = node(tmp_path / "older")
    layout = hostslot.Layout.of(cfg)
    before = {p.name: p.read_bytes() for p in layout.esp.rglob("*") if p.is_file()}
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(HostUpdateError):
        hostslot.install(cfg, cut)
    unchanged()
    # a verity partition too small for the tree: the root was written, the next boot is
    # still slot a's
    layout.partition("verity-b").write_bytes(bytes(BLOCK))
    with pytest.raises(HostSlotError, match="verity-b has 4096 bytes"):
        hostslot.install(cfg, path)
    unchanged()


def test_a_boot_on_trial_takes_no_update_and_an_armed_slot_is_disarmed_before_a_rewrite(
    tmp_path: Path,
) -> None:
    cfg = node(tmp_path)
    path, _, _ = update(tmp_path)
    hostslot.install(cfg, path)
    # installed again while armed: boot.env names slot a while slot b is written
    seen: list[str] = []
    hostslot.install(cfg, path, log=lambda _msg: seen.append(esp(cfg, "boot.env")))
    assert seen and set(seen) == {"a"}
    assert esp(cfg, "boot.env") == "b"
    grub_boots(cfg)
    with pytest.raises(HostSlotError, match="trial"):
        hostslot.install(cfg, path)


def test_a_host_without_slots_settles_nothing(tmp_path: Path) -> None:
    cfg = NodeConfig(root=tmp_path, host_version=1)
    assert hostslot.settle(cfg, healthy=True) is None
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cmdline").write_text("ro quiet\n")
    assert hostslot.settle(cfg, healthy=True) is None
    with pytest.raises(HostSlotError, match="names no root slot"):
        hostslot.read_slots(hostslot.Layout.of(cfg))
    (tmp_path / "proc" / "cmdline").write_text("ro edgepin.slot=a\n")
    with pytest.raises(HostSlotError, match=r"cannot read EFI/edgepin/boot\.env"):
        hostslot.read_slots(hostslot.Layout.of(cfg))


def test_the_record_reads_back() -> None:
    p = hostslot.Pending("b", 7, "edgepin-host", "a", 6, fell_back=True)
    assert hostslot.parse_pending(json.dumps(p.to_json()).encode()) == p
    for change in ({"slot": "a"}, {"host_version": -1}, {"name": "../x"}, {"fell_back": 1}):
        with pytest.raises(HostSlotError):
            hostslot.parse_pending(json.dumps({**p.to_json(), **change}).encode())
