"""The node's one configuration object, built once from its sources and passed down.

Sources, later ones win:
1. built-in defaults (the table below);
2. ``<root>/etc/edgepin/edgepin.conf``: ``KEY=VALUE`` lines written at image build time
   from ``DIB_EDGEPIN_*`` (the same file the systemd units read with EnvironmentFile=);
3. ``EDGEPIN_*`` environment variables;
4. command-line options (``--root``, ``--tcti``, ...).

Every path derives from ``root`` so that a development machine runs exactly the code that
ships, against a swtpm and a libvirtd, with /etc/edgepin, /var/lib/edgepin and
/run/edgepin under a folder of its own.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from provisioner.errors import ConfigError

# key -> (default, description). One table: the config file, the environment and the
# docs (docs/node.md) use these names.
SETTINGS: dict[str, tuple[str, str]] = {
    "EDGEPIN_TCTI": ("device:/dev/tpmrm0", "TPM to use (tpm2-tss TCTI string)"),
    "EDGEPIN_LIBVIRT_URI": ("qemu:///system", "libvirt connection URI"),
    "EDGEPIN_VIRT_TYPE": ("kvm", "libvirt domain type: kvm, or qemu for software emulation"),
    "EDGEPIN_PCRS": (
        "4,7,8,9",
        "PCRs the node credential, image keys and TPM anchor are sealed to: boot loader, "
        "Secure Boot state, GRUB's commands and kernel command line, kernel/initrd/grub.cfg",
    ),
    "EDGEPIN_RESERVED_CPUS": ("0", "host CPUs kept for the host; the guest gets the others"),
    "EDGEPIN_HEALTH_TIMEOUT": ("120", "seconds a new guest has to become healthy"),
    "EDGEPIN_NETWORK": (
        "none",
        "the guest's attachment to the site's network (images declaring lan or vlan:N, "
        "and images declaring nothing): none, or 'network:NAME' / 'bridge:NAME'",
    ),
    "EDGEPIN_HOST_NETWORK": (
        "none",
        "the network with only the host on it (images declaring host): none, or "
        "'network:NAME' / 'bridge:NAME'",
    ),
    "EDGEPIN_DOMAIN_NAME": ("edgepin-guest", "name of the one libvirt domain"),
    "EDGEPIN_HTTP_TIMEOUT": ("30", "seconds before an unanswered request fails"),
    "EDGEPIN_REVOKE_GRACE": (
        "3600",
        "seconds Keystone must keep refusing the node's credential before the node stops "
        "its guest and destroys its keys and images (an unreachable control plane never "
        "counts)",
    ),
    "EDGEPIN_HOST_VERSION": (
        "0",
        "this host release's version, a whole number later releases make greater (the image "
        "build writes it; 0: not known)",
    ),
    "EDGEPIN_HOST_EPOCH": (
        "0",
        "this host release's epoch, 0 to 63 (the image build writes it): on a node with a "
        "release key, once the release is kept, the TPM's host floor rises to it and no "
        "release of a lower epoch opens the node's secrets again",
    ),
    "EDGEPIN_RESTART_COMMAND": (
        "systemctl --no-block reboot",
        "how the node restarts into a host release it has written into its other root slot "
        "(a command and its arguments, split as a shell would, run without a shell)",
    ),
    "EDGEPIN_HOST_TRIAL_TIMEOUT": (
        "1200",
        "seconds a root slot on its one try has, from early in its boot, to get healthy "
        "(the reconcile keeps it); then the node restarts into the slot it came from",
    ),
    "EDGEPIN_REPORT_INTERVAL": (
        "3600",
        "seconds after which the node writes its report (facts, last outcome) to the "
        "control plane again although nothing in it changed; a change is written at once",
    ),
}


def _root_default() -> Path:
    return Path("/")


@dataclass(frozen=True)
class NodeConfig:
    root: Path = field(default_factory=_root_default)
    tcti: str = SETTINGS["EDGEPIN_TCTI"][0]
    libvirt_uri: str = SETTINGS["EDGEPIN_LIBVIRT_URI"][0]
    virt_type: str = SETTINGS["EDGEPIN_VIRT_TYPE"][0]
    pcrs: tuple[int, ...] = (4, 7, 8, 9)
    reserved_cpus: frozenset[int] = frozenset({0})
    health_timeout: float = 120.0
    network: str = "none"
    host_network: str = "none"
    domain_name: str = "edgepin-guest"
    http_timeout: float = 30.0
    revoke_grace: float = 3600.0
    report_interval: float = 3600.0
    host_version: int = 0
    host_epoch: int = 0
    restart_command: tuple[str, ...] = ("systemctl", "--no-block", "reboot")
    host_trial_timeout: float = 1200.0

    # ----------------------------------------------------------------- paths
    @property
    def etc_dir(self) -> Path:
        return self.root / "etc" / "edgepin"

    @property
    def state_dir(self) -> Path:
        return self.root / "var" / "lib" / "edgepin"

    @property
    def run_dir(self) -> Path:
        return self.root / "run" / "edgepin"

    @property
    def log_dir(self) -> Path:
        return self.root / "var" / "log" / "edgepin"

    @property
    def bundle_path(self) -> Path:
        return self.state_dir / "seed" / "bundle.json"

    @property
    def pinned_certs_dir(self) -> Path:
        return self.etc_dir / "signing-certs"

    @property
    def release_key_path(self) -> Path:
        """The release key's public half, on images built with one (provisioner.node.policy)."""
        return self.etc_dir / "release-key.pem"

    @property
    def host_state_dir(self) -> Path:
        """The host's own state on the state partition, outside the vault."""
        return self.root / "var" / "lib" / "edgepin-host"

    @property
    def approvals_dir(self) -> Path:
        """Approvals of PCR values by the release key (provisioner.node.policy)."""
        return self.host_state_dir / "approvals"

    @property
    def sealed_states_path(self) -> Path:
        return self.host_state_dir / "sealed-states.json"

    @property
    def assignment_certs_dir(self) -> Path:
        """Certificates that sign assignments; when it holds none, the image-signing ones do."""
        return self.etc_dir / "assignment-certs"

    @property
    def ca_path(self) -> Path:
        return self.etc_dir / "ca.pem"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def serial_log(self) -> Path:
        return self.log_dir / "guest-serial.log"

    @property
    def status_path(self) -> Path:
        return self.run_dir / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "edgepin.prom"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "lock"

    @property
    def disabled_path(self) -> Path:
        return self.etc_dir / "disabled"


def _parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{n}: expected KEY=VALUE")
        key, value = line.split("=", 1)
        value = value.strip().strip('"').strip("'")
        values[key.strip()] = value
    return values


def _int_set(text: str, what: str) -> frozenset[int]:
    try:
        return frozenset(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ConfigError(f"{what}: expected numbers like 0,1 (got {text!r})") from None


def load(
    root: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build the configuration from defaults, the config file, the environment, overrides."""
    env = dict(os.environ if environ is None else environ)
    root = root or Path(env.get("EDGEPIN_ROOT", "/"))
    raw = {k: v[0] for k, v in SETTINGS.items()}
    raw.update(_parse_env_file(root / "etc" / "edgepin" / "edgepin.conf"))
    raw.update({k: v for k, v in env.items() if k in SETTINGS})
    unknown = sorted(
        k
        for k in _parse_env_file(root / "etc" / "edgepin" / "edgepin.conf")
        if k not in SETTINGS and not k.startswith("EDGEPIN_X_")
    )
    if unknown:
        raise ConfigError(f"unknown settings in edgepin.conf: {', '.join(unknown)}")
    if raw["EDGEPIN_VIRT_TYPE"] not in ("kvm", "qemu"):
        raise ConfigError("EDGEPIN_VIRT_TYPE must be kvm or qemu")
    try:
        values: dict[str, Any] = {
            "root": root,
            "tcti": raw["EDGEPIN_TCTI"],
            "libvirt_uri": raw["EDGEPIN_LIBVIRT_URI"],
            "virt_type": raw["EDGEPIN_VIRT_TYPE"],
            "pcrs": tuple(sorted(_int_set(raw["EDGEPIN_PCRS"], "EDGEPIN_PCRS"))),
            "reserved_cpus": _int_set(raw["EDGEPIN_RESERVED_CPUS"], "EDGEPIN_RESERVED_CPUS"),
            "health_timeout": float(raw["EDGEPIN_HEALTH_TIMEOUT"]),
            "network": raw["EDGEPIN_NETWORK"],
            "host_network": raw["EDGEPIN_HOST_NETWORK"],
            "domain_name": raw["EDGEPIN_DOMAIN_NAME"],
            "http_timeout": float(raw["EDGEPIN_HTTP_TIMEOUT"]),
            "revoke_grace": float(raw["EDGEPIN_REVOKE_GRACE"]),
            "report_interval": float(raw["EDGEPIN_REPORT_INTERVAL"]),
            "host_version": int(raw["EDGEPIN_HOST_VERSION"]),
            "host_epoch": int(raw["EDGEPIN_HOST_EPOCH"]),
            "restart_command": tuple(shlex.split(raw["EDGEPIN_RESTART_COMMAND"])),
            "host_trial_timeout": float(raw["EDGEPIN_HOST_TRIAL_TIMEOUT"]),
        }
    except ValueError as e:
        raise ConfigError(f"bad setting: {e}") from None
    if not 0 <= values["host_version"] < 2**63:
        raise ConfigError("EDGEPIN_HOST_VERSION must be a whole number from 0 to 2**63-1")
    if not 0 <= values["host_epoch"] <= 63:
        raise ConfigError("EDGEPIN_HOST_EPOCH must be a whole number from 0 to 63")
    if not 0 < values["host_trial_timeout"] < 2**31:
        raise ConfigError("EDGEPIN_HOST_TRIAL_TIMEOUT must be a number of seconds above 0")
    if not values["restart_command"]:
        raise ConfigError("EDGEPIN_RESTART_COMMAND is empty")
    if not values["pcrs"]:
        raise ConfigError(
            "EDGEPIN_PCRS is empty: the node refuses to seal or unseal without a PCR policy"
        )
    names = {f.name for f in fields(NodeConfig)}
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"unknown override {key}")
        if value is not None:
            values[key] = value
    for key, setting in (("network", "EDGEPIN_NETWORK"), ("host_network", "EDGEPIN_HOST_NETWORK")):
        net = values[key]
        kind, _, name = net.partition(":")
        if net != "none" and (kind not in ("network", "bridge") or not name):
            raise ConfigError(f"{setting} must be none, network:NAME or bridge:NAME")
    return NodeConfig(**values)
