"""Pure node logic: configuration, deterministic domain XML, metrics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioner.errors import ConfigError, GuestError, ImageError
from provisioner.node import config, domain, facts, report
from provisioner.node.model import (
    PCI_ADDRESS,
    PCI_CLASS,
    USB_ID,
    GuestNetwork,
    State,
    Status,
    pci_selectors,
    usb_ids,
)
from tests.unit.fakes import json_values

pytestmark = pytest.mark.unit

UNITS = Path(__file__).resolve().parents[2] / "provisioner" / "units"


def test_config_layers(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "edgepin"
    etc.mkdir(parents=True)
    (etc / "edgepin.conf").write_text("EDGEPIN_PCRS=0,7\nEDGEPIN_RESERVED_CPUS=0,1\n")
    cfg = config.load(tmp_path, environ={"EDGEPIN_VIRT_TYPE": "qemu"}, overrides={"tcti": "x"})
    assert cfg.pcrs == (0, 7) and cfg.reserved_cpus == {0, 1}
    assert cfg.virt_type == "qemu" and cfg.tcti == "x"
    assert cfg.status_path == tmp_path / "run" / "edgepin" / "status.json"
    (etc / "edgepin.conf").write_text("EDGEPIN_TYPO=1\n")
    with pytest.raises(ConfigError, match="unknown settings"):
        config.load(tmp_path, environ={})


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "1e12", "soon"])
def test_a_trial_timeout_that_is_not_a_number_of_seconds_is_refused(
    tmp_path: Path, value: str
) -> None:
    assert config.load(tmp_path, environ={}).host_trial_timeout == 1200
    assert (
        config.load(tmp_path, environ={"EDGEPIN_HOST_TRIAL_TIMEOUT": "90"}).host_trial_timeout == 90
    )
    with pytest.raises(ConfigError, match=r"EDGEPIN_HOST_TRIAL_TIMEOUT|bad setting"):
        config.load(tmp_path, environ={"EDGEPIN_HOST_TRIAL_TIMEOUT": value})


@pytest.mark.parametrize("value", ["-1", "64", "1.5", "one", ""])
def test_a_host_epoch_outside_0_to_63_is_refused(tmp_path: Path, value: str) -> None:
    assert config.load(tmp_path, environ={}).host_epoch == 0
    assert config.load(tmp_path, environ={"EDGEPIN_HOST_EPOCH": "63"}).host_epoch == 63
    with pytest.raises(ConfigError, match=r"EDGEPIN_HOST_EPOCH|bad setting"):
        config.load(tmp_path, environ={"EDGEPIN_HOST_EPOCH": value})


def test_the_watchdog_fact_is_the_armed_hardware_watchdog(tmp_path: Path) -> None:
    cfg = config.NodeConfig(root=tmp_path)
    assert facts.watchdog(cfg) == ""  # none
    wd = tmp_path / "sys/class/watchdog/watchdog0"
    wd.mkdir(parents=True)
    (wd / "identity").write_text("iTCO_wdt\n")
    (wd / "timeout").write_text("120\n")
    (wd / "state").write_text("inactive\n")
    assert facts.watchdog(cfg) == ""  # not armed: systemd does not keep it
    (wd / "state").write_text("active\n")
    assert facts.watchdog(cfg) == "iTCO_wdt, 120 s"
    (wd / "identity").write_text("x\x1b[2J" * 40)
    assert facts.watchdog(cfg).startswith("x[2J") and len(facts.watchdog(cfg)) <= 128
    (wd / "timeout").write_text("two minutes")
    assert facts.watchdog(cfg) == ""


def spec(image_id: str = "abc", vcpus: int = 1) -> domain.GuestSpec:
    return domain.GuestSpec(image_id, 3, Path("/var/lib/edgepin/images/abc.qcow2"), vcpus, 256)


def test_domain_xml_is_deterministic_and_pinned() -> None:
    cfg = config.NodeConfig(virt_type="qemu", reserved_cpus=frozenset({0}))
    a = domain.build_xml(cfg, spec(), [0, 1, 2, 3])
    b = domain.build_xml(cfg, spec(), [0, 1, 2, 3])
    assert a == b
    assert '<vcpupin vcpu="0" cpuset="1" />' in a
    assert '<emulatorpin cpuset="0" />' in a
    assert domain.secret_uuid(spec()) in a
    # the firmware's console goes to the serial port, which libvirt logs for the health check
    assert '<bios useserial="yes" />' in a


def test_domain_xml_escapes_hostile_values() -> None:
    cfg = config.NodeConfig(domain_name="x'><evil/>", network='bridge:br0"/><x')
    xml = domain.build_xml(cfg, spec("id'><injected/>"), [0, 1])
    assert "<evil/>" not in xml and "<injected/>" not in xml and "<x" not in xml.replace("<xml", "")


def test_too_many_vcpus_refused() -> None:
    cfg = config.NodeConfig(reserved_cpus=frozenset({0}))
    with pytest.raises(GuestError, match="wants 4 vCPUs"):
        domain.build_xml(cfg, spec(vcpus=4), [0, 1])


def test_metrics_format() -> None:
    text = report.metrics(
        Status(State.RUNNING, "ok", generation=4, failures={"verification": 2}, last_success=5)
    )
    assert 'edgepin_state{state="running"} 1' in text
    assert 'edgepin_state{state="revoked"} 0' in text
    assert 'edgepin_failures_total{kind="verification"} 2' in text
    # every kind is there from the start, so that rate() sees the first failure
    assert 'edgepin_failures_total{kind="trust"} 0' in text
    assert "edgepin_generation 4" in text


def test_units_ship_with_the_package() -> None:
    timer = (UNITS / "edgepin-reconcile.timer").read_text()
    assert "RandomizedDelaySec=" in timer
    for unit in ("edgepin-enroll.service", "edgepin-reconcile.service"):
        text = (UNITS / unit).read_text()
        assert "ConditionPathExists=!/etc/edgepin/disabled" in text
        assert "StandardOutput=journal+console" in text
        assert "Type=oneshot" in text
    # Documentation= names the guide the provisioner element installs (the image's
    # /usr/share/doc is stripped; tests/image checks the file on the booted image)
    install = (
        UNITS.parents[1] / "elements/edgepin-provisioner/install.d/50-edgepin-provisioner"
    ).read_text()
    for unit in ("edgepin-enroll.service", "edgepin-reconcile.service", "edgepin-reconcile.timer"):
        docs = [ln for ln in (UNITS / unit).read_text().splitlines() if ln.startswith("Doc")]
        assert docs == ["Documentation=file:///usr/share/edgepin/node.md"], unit
    assert '"$src/node.md" /usr/share/edgepin/node.md' in install


class _Vanishing:
    """A foreign domain that another process removes between the listing and the undefine."""

    def __init__(self, code: int) -> None:
        self.code = code

    def name(self) -> str:
        return "intruder"

    def isActive(self) -> bool:
        return True

    def destroy(self) -> None:
        pass

    def undefineFlags(self, _flags: int) -> None:
        import libvirt

        err = libvirt.libvirtError("gone")
        err.err = (self.code, 0, "gone", 0, "", None, None, 0, 0)
        raise err


class _Conn:
    def __init__(self, dom: _Vanishing) -> None:
        self.dom = dom

    def listAllDomains(self) -> list[_Vanishing]:
        return [self.dom]


def test_a_foreign_domain_that_vanishes_is_removed_and_one_that_cannot_be_is_an_error() -> None:
    import libvirt

    cfg = config.NodeConfig()
    assert domain.remove_others(cfg, _Conn(_Vanishing(libvirt.VIR_ERR_NO_DOMAIN))) == ["intruder"]
    with pytest.raises(GuestError, match="cannot remove foreign domain"):
        domain.remove_others(cfg, _Conn(_Vanishing(libvirt.VIR_ERR_OPERATION_FAILED)))


def test_the_guest_gets_the_network_its_image_declares_and_the_node_provides() -> None:
    lan = config.NodeConfig(network="bridge:br0")
    declared = {None: True, GuestNetwork.LAN: True, GuestNetwork.NONE: False}
    for network, has_nic in declared.items():
        s = replace(spec(), network=network, node_id="node-0042")
        xml = domain.build_xml(lan, s, [0, 1])
        assert ('<source bridge="br0" />' in xml) is has_nic, network
        assert ("<interface" in xml) is has_nic, network
    # the MAC address: fixed for a node across images and starts, another on another node
    one = domain.build_xml(lan, replace(spec("a"), node_id="node-0042"), [0, 1])
    two = domain.build_xml(lan, replace(spec("b", vcpus=1), node_id="node-0042"), [0, 1])
    other = domain.build_xml(lan, replace(spec("a"), node_id="node-0043"), [0, 1])
    mac = domain.guest_mac("node-0042")
    assert f'<mac address="{mac}" />' in one and f'<mac address="{mac}" />' in two
    assert mac not in other and mac.startswith("52:54:00:")
    # a node built without a guest attachment: no device, and an image that needs the
    # site's network is refused before anything is fetched
    bare = config.NodeConfig(network="none")
    assert "<interface" not in domain.build_xml(bare, spec(), [0, 1])
    with pytest.raises(GuestError, match=r"needs the site's network \(lan\)"):
        domain.attachment(bare, GuestNetwork.LAN)
    assert domain.attachment(bare, GuestNetwork.NONE) is None
    with pytest.raises(GuestError, match=r"needs the site's network \(vlan:42\)"):
        domain.attachment(bare, GuestNetwork("vlan:42"))
    with pytest.raises(GuestError, match=r"needs the network with the host \(host\)"):
        domain.attachment(bare, GuestNetwork.HOST)


def test_a_guest_in_a_vlan_is_tagged_on_the_site_bridge_and_a_host_guest_is_on_brhost() -> None:
    cfg = config.NodeConfig(network="bridge:br0", host_network="bridge:brhost")
    vlan = domain.build_xml(cfg, replace(spec(), network=GuestNetwork("vlan:42")), [0, 1])
    iface = ET.fromstring(vlan).find("devices/interface")  # noqa: S314 - our own XML
    assert iface is not None and iface.get("type") == "bridge"
    assert iface.find("source").get("bridge") == "br0"  # type: ignore[union-attr]
    assert [t.get("id") for t in iface.findall("vlan/tag")] == ["42"]
    # lan: the same bridge, untagged (no <vlan>)
    lan = domain.build_xml(cfg, replace(spec(), network=GuestNetwork.LAN), [0, 1])
    assert "<vlan" not in lan and '<source bridge="br0" />' in lan
    host = domain.build_xml(cfg, replace(spec(), network=GuestNetwork.HOST), [0, 1])
    assert '<source bridge="brhost" />' in host and "<vlan" not in host
    assert '<source bridge="br0" />' not in host
    # nothing declared: the site's attachment, never the host's network
    plain = domain.build_xml(cfg, spec(), [0, 1])
    assert '<source bridge="br0" />' in plain and "brhost" not in plain
    # the host network on a node whose site attachment is none
    only_host = config.NodeConfig(network="none", host_network="bridge:brhost")
    assert domain.attachment(only_host, GuestNetwork.HOST) == ("bridge", "brhost")
    assert domain.attachment(only_host, None) is None


@pytest.mark.parametrize(
    "value", ["bridge:", "network:", "br0", "bridge", "macvtap:eth0", "bridge br0", ""]
)
def test_a_bad_network_setting_is_refused_by_the_config(tmp_path: Path, value: str) -> None:
    for setting in ("EDGEPIN_NETWORK", "EDGEPIN_HOST_NETWORK"):
        with pytest.raises(ConfigError, match=f"{setting} must be none"):
            config.load(tmp_path, environ={setting: value})


def test_the_guest_gets_exactly_the_usb_devices_its_image_declares(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys" / "bus" / "usb" / "devices"
    for name, vendor, product in (("1-1", "0627", "0001"), ("usb1", "1d6b", "0002")):
        (sysfs / name).mkdir(parents=True)
        (sysfs / name / "idVendor").write_text(f"{vendor}\n")
        (sysfs / name / "idProduct").write_text(f"{product}\n")
    (sysfs / "1-1:1.0").mkdir()  # an interface: no ids
    cfg = config.NodeConfig(root=tmp_path)
    assert domain.usb_present(tmp_path) == ("0627:0001", "1d6b:0002")
    domain.check_usb(cfg, ("0627:0001",))
    with pytest.raises(GuestError, match="needs USB device 046d:c52b, which this node"):
        domain.check_usb(cfg, ("0627:0001", "046d:c52b"))
    xml = domain.build_xml(cfg, replace(spec(), usb=("0627:0001",)), [0, 1])
    assert xml.count("<hostdev") == 1
    assert '<vendor id="0x0627" />' in xml and '<product id="0x0001" />' in xml
    assert "<hostdev" not in domain.build_xml(cfg, spec(), [0, 1])
    # as lsusb or a person writes them: case and spaces do not matter, each counts once
    assert usb_ids("0627:ABCD, 0627:0001,0627:abcd") == ("0627:0001", "0627:abcd")


def _pci_device(root: Path, address: str, code: str) -> None:
    dev = root / "sys" / "bus" / "pci" / "devices" / address
    dev.mkdir(parents=True)
    (dev / "class").write_text(f"0x{code}\n")


def test_the_guest_gets_exactly_the_pci_devices_its_image_declares(tmp_path: Path) -> None:
    for address, code in (
        ("0000:00:01.0", "030000"),  # display
        ("0000:00:02.0", "020000"),  # the uplink: Ethernet
        ("0000:00:03.0", "020000"),  # a second Ethernet controller
        ("0000:00:1d.0", "0c0330"),  # a USB 3 (xHCI) controller
        ("0000:00:1f.3", "040300"),  # audio
    ):
        _pci_device(tmp_path, address, code)
    cfg = config.NodeConfig(root=tmp_path)
    assert domain.pci_present(tmp_path)["0000:00:1d.0"] == "0c0330"
    # by class: the one device of that class; by address: that device
    assert domain.pci_chosen(cfg, ("class:0c03",)) == ("0000:00:1d.0",)
    assert domain.pci_chosen(cfg, ("class:0c0330", "0000:00:03.0")) == (
        "0000:00:1d.0",
        "0000:00:03.0",
    )
    # a class two devices have is refused: it could take the host's uplink
    with pytest.raises(GuestError, match=r"needs PCI device class:0200, and this node has 2"):
        domain.pci_chosen(cfg, ("class:0200",))
    with pytest.raises(GuestError, match=r"needs PCI device 0000:05:00\.0, which this node does"):
        domain.pci_chosen(cfg, ("0000:05:00.0",))
    with pytest.raises(GuestError, match="needs PCI device class:0108, which this node does"):
        domain.check_fits(cfg, None, 1, 64, None, (), ("class:0108",))
    with pytest.raises(GuestError, match=r"names PCI device 0000:00:1f\.3 twice"):
        domain.pci_chosen(cfg, ("0000:00:1f.3", "class:0403"))
    # the host's own: its disk's controller, its uplink (up) and the bridge before it
    devices = tmp_path / "sys" / "devices" / "pci0000:00"
    (devices / "0000:00:04.0" / "virtio1").mkdir(parents=True)
    (devices / "0000:00:1c.0" / "0000:01:00.0").mkdir(parents=True)
    for address, code in (("0000:00:04.0", "010000"), ("0000:00:1c.0", "060400")):
        _pci_device(tmp_path, address, code)
    _pci_device(tmp_path, "0000:01:00.0", "020000")
    (tmp_path / "sys" / "block" / "vda").mkdir(parents=True)
    (tmp_path / "sys" / "block" / "vda" / "device").symlink_to(devices / "0000:00:04.0" / "virtio1")
    for name, target, state in (
        ("enp1s0", devices / "0000:00:1c.0" / "0000:01:00.0", "up"),
        ("enp0s3", tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:03.0", "down"),
    ):
        (tmp_path / "sys" / "class" / "net" / name).mkdir(parents=True)
        (tmp_path / "sys" / "class" / "net" / name / "device").symlink_to(target)
        (tmp_path / "sys" / "class" / "net" / name / "operstate").write_text(f"{state}\n")
    assert domain.pci_in_use(tmp_path) == {"0000:00:04.0", "0000:00:1c.0", "0000:01:00.0"}
    for selector in ("0000:00:04.0", "class:0100", "0000:01:00.0", "class:0604"):
        with pytest.raises(GuestError, match="which the host uses"):
            domain.pci_chosen(cfg, (selector,))
    # a class counts the devices the host does not use: of the three Ethernet controllers,
    # 0000:00:02.0 and 0000:00:03.0 (its interface is down) are free
    with pytest.raises(GuestError, match=r"class:0200, and this node has 2 \(0000:00:02.0, "):
        domain.pci_chosen(cfg, ("class:0200",))
    assert domain.pci_chosen(cfg, ("0000:00:03.0",)) == ("0000:00:03.0",)
    assert "0000:01:00.0" not in domain.pci_free(tmp_path)
    assert domain.pci_free(tmp_path)["0000:00:03.0"] == "020000"
    xml = domain.build_xml(cfg, replace(spec(), pci=("class:0c03", "0000:00:03.0")), [0, 1])
    root = ET.fromstring(xml)  # noqa: S314 - our own XML
    found = [
        (h.get("type"), h.get("managed"), dict(h.find("source/address").attrib))  # type: ignore[union-attr]
        for h in root.findall("devices/hostdev")
    ]
    assert found == [
        ("pci", "yes", {"domain": "0x0000", "bus": "0x00", "slot": "0x1d", "function": "0x0"}),
        ("pci", "yes", {"domain": "0x0000", "bus": "0x00", "slot": "0x03", "function": "0x0"}),
    ]
    assert "<hostdev" not in domain.build_xml(cfg, spec(), [0, 1])
    # what the node says it gave the guest, read back from that XML
    with_usb = domain.build_xml(
        cfg, replace(spec(), pci=("class:0c03",), usb=("0627:0001",)), [0, 1]
    )
    assert domain.passed_through(with_usb) == ["USB 0627:0001", "PCI 0000:00:1d.0"]
    assert domain.passed_through(domain.build_xml(cfg, spec(), [0, 1])) == []
    # as lspci or a person writes them: case and spaces do not matter, each counts once
    assert pci_selectors("0000:00:1D.0, class:0C03,class:0c03") == ("0000:00:1d.0", "class:0c03")


@given(st.one_of(json_values, st.text(max_size=40), st.lists(st.text(max_size=14), max_size=9)))
def test_any_declared_pci_value_gives_selectors_or_edgepins_own_error(value: Any) -> None:
    try:
        got = pci_selectors(value)
    except ImageError:
        return
    assert list(got) == sorted(set(got)) and len(got) <= 8
    assert all(PCI_ADDRESS.fullmatch(x) or PCI_CLASS.fullmatch(x) for x in got)


@given(st.one_of(json_values, st.text(max_size=40)))
def test_any_declared_usb_value_gives_ids_or_edgepins_own_error(value: Any) -> None:
    try:
        ids = usb_ids(value)
    except ImageError:
        return
    assert list(ids) == sorted(set(ids)) and all(USB_ID.fullmatch(i) for i in ids)
