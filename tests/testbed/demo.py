"""``./build.sh demo``: edgepin end to end on this machine, in a few minutes.

Starts the local control plane (the test bed), builds the host image or reuses one,
publishes a demo guest, enrolls a virtual node for its own swtpm, boots the host image in
QEMU and follows its console until the nested guest runs, then prints the node status
table and the guest's marker. ``--down`` stops and removes everything it made.

Everything lives in ``.run/demo/`` (control plane, swtpm, VM disk, seed, logs); the image
is shared with the image tests (``.cache/image-tier/out/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.testbed.controlplane import ControlPlane, ControlPlaneError, default_template_root
from tests.testbed.process import stop_group, stop_process

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / ".run" / "demo"
CACHE = Path(os.environ.get("EDGEPIN_CACHE_DIR", REPO / ".cache"))
NODE = "demo-node"
T0 = time.monotonic()


def step(text: str) -> None:
    print(f"\033[1m==>\033[0m [{time.monotonic() - T0:6.1f} s] {text}", flush=True)


def edgepin(args: list[str], cp: ControlPlane) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OS_CLIENT_CONFIG_FILE": str(cp.clouds_yaml),
        "OS_CLOUD": "edgepin-testbed",
    }
    exe = Path(sys.executable).parent / "edgepin"
    r = subprocess.run([str(exe), "--no-progress", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"demo: edgepin {args[0]} failed: {r.stderr.strip()}")
    return r


def up() -> int:
    from provisioner import barbican
    from tests.testbed.guest import build_tiny_guest
    from tests.testbed.hostimage import (
        IMAGE_PCRS,
        HostImageError,
        build_image,
        image_args,
        image_signer_material,
        is_current,
        qemu_node_enroll_args,
    )
    from tests.testbed.qemuvm import PCR_VALUES_SAID, HostVm
    from tests.testbed.swtpm import SwtpmFactory

    if (RUN / "vm.json").exists():
        raise SystemExit("demo: a demo is running already; ./build.sh demo --down first")
    RUN.mkdir(parents=True, exist_ok=True)

    step("starting the local control plane (Keystone, Glance, Barbican on loopback)")
    cp = ControlPlane(RUN / "controlplane")
    try:
        cp.up(default_template_root())
    except ControlPlaneError as e:
        raise SystemExit(f"demo: {e}") from None
    step(f"control plane up ({cp.started_from}): {cp.auth_url}")

    signer = image_signer_material(CACHE)
    out = CACHE / "image-tier" / "out"
    image = out / "edgepin-host.qcow2"
    step(
        "reusing the host image"
        if is_current(out, image_args(signer))
        else "building the host image (./build.sh image; a few minutes, log in "
        f"{out / 'edgepin-host.log'})"
    )
    try:
        image = build_image(out, image_args(signer))
    except HostImageError as e:
        raise SystemExit(f"demo: {e}") from None
    size = image.stat().st_size / 2**20
    step(f"host image: {image} ({size:.0f} MiB)")

    step("publishing a demo guest: encrypted, signed, uploaded to Glance")
    admin = cp.admin_connection()
    try:
        cert_id = barbican.store(admin, "edgepin-signing-cert:demo", "certificate", signer.cert_pem)
        key_id = barbican.store(admin, "edgepin-signing-key:demo", "private", signer.key_pem)
    finally:
        admin.close()
    marker = f"demo-{secrets.token_hex(4)}"
    guest = build_tiny_guest(CACHE, RUN / "guest.qcow2", marker, "run")
    pub = json.loads(
        edgepin(
            [
                "publish",
                str(guest),
                "--name",
                "edgepin-demo-guest",
                "--version",
                "1",
                "--signing-cert-id",
                cert_id,
                "--signing-key-id",
                key_id,
                "--health-marker",
                f"EDGEPIN-GUEST-MARKER {marker}",
                "--json",
            ],
            cp,
        ).stdout
    )
    step(f"published image {pub['image_id']}")

    step(f"enrolling {NODE} for its own TPM (a swtpm with an EK certificate)")
    tpms = SwtpmFactory(RUN / "tpm")
    tpm = tpms.create(NODE)
    ek, ekca, seed = RUN / "ek.pem", RUN / "ek-ca.pem", RUN / "seed.img"
    ek.write_bytes(tpm.ek_cert_pem())
    ekca.write_bytes(tpm.ca_cert_pem())
    guessed, measured = RUN / "guessed-pcrs.json", RUN / "measured-pcrs.json"
    guessed.write_text(json.dumps({p: "00" * 32 for p in IMAGE_PCRS.split(",")}))

    def enroll(values: Path) -> None:
        edgepin(qemu_node_enroll_args(NODE, RUN, values, seed), cp)

    enroll(guessed)
    # the demo image pins one certificate: it signs images and assignments
    signed_by = ["--assignment-cert-id", cert_id, "--assignment-key-id", key_id]
    edgepin(["assign", NODE, pub["image_id"], *signed_by], cp)
    step(f"assigned; seed {seed} (bound to guessed PCR values)")
    probe = HostVm(NODE, image, RUN / "vm", firmware="uefi", tpm=tpm, seed=seed)
    probe.start()
    step("first boot: the node prints the PCR values it measures on its console")
    said = probe.wait_for(PCR_VALUES_SAID, 900)
    probe.stop()
    measured.write_text(said.group(1))
    enroll(measured)
    step(f"enrolled again with the node's own values of PCRs {IMAGE_PCRS}; new seed {seed}")

    milestones = {
        "kernel booted": r"Linux version \d",
        "first-boot unit started": r"Start(ing|ed) \S*edgepin-enroll\.service",
        "enrolled with the TPM-sealed credential": r"enrolled: node ",
        "image verified (sha512 + signature)": r"fetch: image \S+ verified",
        "guest running": r"reconcile: switched to image",
    }
    vm = HostVm(NODE, image, RUN / "vm", firmware="uefi", tpm=tpm, seed=seed, milestones=milestones)
    vm.start()
    assert vm.proc is not None
    (RUN / "vm.json").write_text(json.dumps({"pid": vm.proc.pid, "tpm_pid": tpm.pid}))
    step(f"booting the host image in QEMU (software emulation); console: {vm.serial_log}")
    shown: set[str] = set()
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        vm.wait_for(r"$^|.", 600)  # samples the milestones
        for name in milestones:
            if name in vm.seen and name not in shown:
                step(f"  node: {name} ({vm.seen[name]:.0f} s after power-on)")
                shown.add(name)
        text = vm.console()
        if re.search(r"running: guest \S+ running", text):
            break
        # what the node reports when it cannot go on, once each
        for said in re.findall(r"(?:refused|failed|offline|unenrolled): [^\r\n]*", text):
            if said not in shown:
                step(f"  node says: {said}")
                shown.add(said)
        time.sleep(2)
    else:
        raise SystemExit(f"demo: the node did not reach a running guest; see {vm.serial_log}")

    step("node status, as the control plane sees it:")
    print(edgepin(["status"], cp).stdout, flush=True)
    seen = re.search(rf"EDGEPIN-GUEST-MARKER {marker}", vm.console())
    shown_marker = seen.group(0) if seen else f"(not on the console: {marker})"
    step(f"the guest's marker, as the node saw it on the guest's console: {shown_marker}")
    step("the node keeps running; ./build.sh demo --down stops and removes everything")
    return 0


def _ours(pid: int) -> bool:
    """A process whose command line names the demo's folder, not a reused pid."""
    try:
        return str(RUN).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def down() -> int:
    state = RUN / "vm.json"
    if state.exists():
        data = json.loads(state.read_text())
        # QEMU leads its own session (QemuVm.stop); swtpm is one daemon (Swtpm.stop)
        if data.get("pid"):
            stop_group(data["pid"], 10.0, ours=_ours)
        if data.get("tpm_pid"):
            stop_process(data["tpm_pid"], 5.0, ours=_ours)
        step("stopped the node VM and its TPM")
    cp_dir = RUN / "controlplane"
    if (cp_dir / "controlplane.json").exists():
        try:
            ControlPlane.load(cp_dir).down()
            step("stopped the control plane")
        except ControlPlaneError as e:
            print(f"demo: {e}", file=sys.stderr)
    shutil.rmtree(RUN, ignore_errors=True)
    step(f"removed {RUN}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./build.sh demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--down", action="store_true", help="stop and remove everything the demo made")
    args = p.parse_args(argv)
    if args.down:
        return down()
    try:
        return up()
    except BaseException as e:  # a build failure reaches here as pytest's Failed
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        print(f"{e}" or type(e).__name__, file=sys.stderr)
        print(
            f"demo: stopped; what it started is still up for a look in {RUN}. "
            "./build.sh demo --down stops and removes it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
