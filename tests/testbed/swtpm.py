"""A swtpm factory: a fresh TPM 2.0 per test node, with EK certificates from a local CA.

Everything (the CA, each TPM's state, configuration, logs, pid files) lives under the
factory's base directory; nothing is read from or written to /etc or $HOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.testbed.process import alive, free_port, stop_process


class SwtpmError(RuntimeError):
    pass


class SwtpmFactory:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.ca_dir = base_dir / "swtpm-ca"
        self.created: list[Swtpm] = []

    def _ensure_ca_config(self) -> Path:
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        conf = self.base_dir / "swtpm-localca.conf"
        opts = self.base_dir / "swtpm-localca.options"
        setup = self.base_dir / "swtpm_setup.conf"
        if not setup.exists():
            conf.write_text(
                f"statedir = {self.ca_dir}\n"
                f"signingkey = {self.ca_dir}/signkey.pem\n"
                f"issuercert = {self.ca_dir}/issuercert.pem\n"
                f"certserial = {self.ca_dir}/certserial\n"
            )
            opts.write_text(
                "--platform-manufacturer edgepin\n--platform-version 2.1\n"
                "--platform-model testbed\n"
            )
            tool = shutil.which("swtpm_localca")
            if tool is None:
                raise SwtpmError("swtpm_localca not installed (package swtpm-tools)")
            setup.write_text(
                f"create_certs_tool = {tool}\n"
                f"create_certs_tool_config = {conf}\n"
                f"create_certs_tool_options = {opts}\n"
            )
        return setup

    def create(self, name: str) -> Swtpm:
        setup = self._ensure_ca_config()
        state = self.base_dir / f"tpm-{name}"
        if state.exists():
            raise SwtpmError(f"TPM {name} exists already")
        state.mkdir(parents=True)
        log = state / "setup.log"
        with log.open("wb") as out:
            rc = subprocess.run(
                [
                    "swtpm_setup",
                    "--tpm2",
                    "--tpmstate",
                    str(state),
                    "--create-ek-cert",
                    "--create-platform-cert",
                    "--create-spk",
                    "--pcr-banks",
                    "sha256",
                    "--config",
                    str(setup),
                    "--overwrite",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "HOME": str(self.base_dir),
                    "XDG_CONFIG_HOME": str(self.base_dir),
                },
                check=False,
            ).returncode
        if rc != 0:
            raise SwtpmError(f"swtpm_setup failed: {log.read_text()[-1500:]}")
        tpm = Swtpm(name, state, self)
        tpm.start()
        self.created.append(tpm)
        return tpm

    def ca_cert_pem(self) -> bytes:
        """The local CA chain (intermediate, then root) that issued the EK certificates."""
        return (self.ca_dir / "issuercert.pem").read_bytes() + (
            self.ca_dir / "swtpm-localca-rootca-cert.pem"
        ).read_bytes()

    def stop_all(self) -> None:
        for tpm in self.created:
            tpm.stop()


class Swtpm:
    def __init__(self, name: str, state_dir: Path, factory: SwtpmFactory) -> None:
        self.name = name
        self.state_dir = state_dir
        self.factory = factory
        self.port = 0
        self.ctrl_port = 0
        self.pid: int | None = None
        # set while the TPM serves a QEMU machine instead of the TCP TCTI
        self.qemu_socket: Path | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "swtpm.pid"

    def start(self) -> None:
        if self.pid and alive(self.pid):
            return
        for _attempt in range(5):
            # the swtpm TCTI talks to the control channel on port + 1
            self.port = free_port()
            self.ctrl_port = self.port + 1
            self.pid_file.unlink(missing_ok=True)
            rc = subprocess.run(
                [
                    "swtpm",
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={self.state_dir}",
                    "--server",
                    f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1",
                    "--flags",
                    "not-need-init,startup-clear",
                    "--daemon",
                    "--pid",
                    f"file={self.pid_file}",
                    "--log",
                    f"file={self.state_dir / 'swtpm.log'},level=1",
                ],
                capture_output=True,
                check=False,
            ).returncode
            deadline = time.monotonic() + 5
            while rc == 0 and not self.pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if rc == 0 and self.pid_file.exists():
                self.pid = int(self.pid_file.read_text().strip())
                return
        raise SwtpmError(f"swtpm {self.name} did not start")

    def start_for_qemu(self) -> Path:
        """Serve the TPM to QEMU (``-tpmdev emulator``) on a unix control socket.

        QEMU and the firmware run TPM2_Startup themselves; the TCP TCTI is not available
        while QEMU owns the TPM. Returns the socket path for ``-chardev socket,path=``.
        """
        self.stop()
        sock = self.state_dir / "qemu-ctrl.sock"
        sock.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)
        subprocess.run(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--ctrl",
                f"type=unixio,path={sock}",
                "--daemon",
                "--pid",
                f"file={self.pid_file}",
                "--log",
                f"file={self.state_dir / 'swtpm.log'},level=1",
            ],
            capture_output=True,
            check=True,
        )
        deadline = time.monotonic() + 5
        while not (self.pid_file.exists() and sock.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.pid_file.exists():
            raise SwtpmError(f"swtpm {self.name} did not start for QEMU")
        self.pid = int(self.pid_file.read_text().strip())
        self.qemu_socket = sock
        return sock

    def stop(self) -> None:
        self.qemu_socket = None
        if self.pid is None:
            return
        stop_process(self.pid, 5.0)
        self.pid = None

    def power_cycle(self) -> None:
        """Power off and on: PCRs are reset, TPM2_Startup(CLEAR) runs again."""
        subprocess.run(
            ["swtpm_ioctl", "--tcp", f"127.0.0.1:{self.ctrl_port}", "-i"],
            check=True,
            capture_output=True,
        )
        from tpm2_pytss import ESAPI
        from tpm2_pytss.constants import TPM2_SU
        from tpm2_pytss.TCTILdr import TCTILdr

        esys = ESAPI(TCTILdr("swtpm", self.tcti.split(":", 1)[1]))
        try:
            esys.startup(TPM2_SU.CLEAR)
        finally:
            esys.close()

    def ek_cert_pem(self) -> bytes:
        """The RSA EK certificate from NV index 0x01c00002, as PEM."""
        from tpm2_pytss import ESAPI
        from tpm2_pytss.TCTILdr import TCTILdr
        from tpm2_pytss.utils import NVReadEK

        esys = ESAPI(TCTILdr("swtpm", self.tcti.split(":", 1)[1]))
        try:
            der = NVReadEK(esys)(0x01C00002)
        finally:
            esys.close()
        cert = x509.load_der_x509_certificate(bytes(der))
        return cert.public_bytes(serialization.Encoding.PEM)

    def ek_public_pem(self) -> bytes:
        from provisioner.tpm import Tpm

        with Tpm.open(self.tcti) as t:
            return t.ek_public_pem()

    def ca_cert_pem(self) -> bytes:
        return self.factory.ca_cert_pem()


def forge_nv_index(t: Any, index: int, size: int) -> None:
    """What someone who boots another system on the machine can do with the owner
    hierarchy's empty authorization: define an NV index of edgepin's with an authorization
    of their own (none) and write it."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    forged = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index,
            nameAlg=TPM2_ALG.SHA256,
            attributes=TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA,
            authPolicy=b"",
            dataSize=size,
        )
    )
    handle = t.esys.nv_define_space(b"", forged, ESYS_TR.OWNER, session1=ESYS_TR.PASSWORD)
    t.esys.nv_write(handle, bytes(size), 0, handle, session1=ESYS_TR.PASSWORD)
