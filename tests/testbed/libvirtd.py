"""An isolated libvirtd + virtlogd per test node (there is no systemd here).

Each pair runs in a private mount namespace in which /etc/libvirt, /var/lib/libvirt,
/run/libvirt, /var/log/libvirt and /var/cache/libvirt are bind mounts of folders under
the instance's base directory, so several run at once and none touches the host's
libvirt state. Clients reach it through the socket in ``<base>/run``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from tests.testbed.process import stop_process

MOUNTS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "run": "/run/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
"""


class LibvirtdError(RuntimeError):
    pass


class Libvirtd:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    @property
    def socket(self) -> Path:
        return self.base_dir / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    def _pid(self, name: str) -> int | None:
        path = self.base_dir / "run" / f"{name}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self, timeout: float = 30.0) -> None:
        for sub in MOUNTS:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.base_dir / "log" / "qemu").mkdir(exist_ok=True)
        (self.base_dir / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (self.base_dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.base_dir / "etc" / "virtlogd.conf").write_text("")
        for target in MOUNTS.values():
            Path(target).mkdir(parents=True, exist_ok=True)  # mount points only
        binds = "\n".join(
            f"mount --bind '{self.base_dir / sub}' '{target}'" for sub, target in MOUNTS.items()
        )
        script = (
            "set -e\n"
            f"{binds}\n"
            "virtlogd -d -p /run/libvirt/virtlogd.pid\n"
            "libvirtd -d -p /run/libvirt/libvirtd.pid\n"
        )
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            check=False,
            start_new_session=True,
        )
        if r.returncode != 0:
            raise LibvirtdError(f"libvirtd did not start: {r.stderr.decode(errors='replace')}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.exists():
                try:
                    conn = self.connect()
                    conn.close()
                    return
                except Exception:
                    pass
            time.sleep(0.1)
        raise LibvirtdError(f"libvirtd socket {self.socket} not answering after {timeout}s")

    def connect(self) -> Any:
        import libvirt

        return libvirt.open(self.uri)

    def qemu_pids(self) -> list[int]:
        pids = []
        for pidfile in (self.base_dir / "run" / "qemu").glob("*.pid"):
            try:
                pids.append(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def stop_daemon(self, name: str) -> None:
        """Kill one daemon (tests of a libvirtd restart); start() brings both back."""
        pid = self._pid(name)
        if pid:
            stop_process(pid, 10.0)

    def stop(self) -> None:
        import libvirt

        if self.socket.exists() and self._pid("libvirtd"):
            try:
                conn = self.connect()
                for dom in conn.listAllDomains():
                    try:
                        if dom.isActive():
                            dom.destroy()
                        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                    except libvirt.libvirtError:
                        pass
                conn.close()
            except libvirt.libvirtError:
                pass
        qemu = self.qemu_pids()
        for name in ("libvirtd", "virtlogd"):
            pid = self._pid(name)
            if pid:
                stop_process(pid, 10.0)
        for pid in qemu:
            stop_process(pid, 10.0)

    def pids(self) -> list[int]:
        return [p for p in (self._pid("libvirtd"), self._pid("virtlogd"), *self.qemu_pids()) if p]


def start_libvirtd(base_dir: Path) -> Libvirtd:
    d = Libvirtd(base_dir)
    d.start()
    return d
