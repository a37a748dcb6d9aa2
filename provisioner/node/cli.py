"""``edgepin node ...``: the commands the host image's systemd units run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from provisioner import tpm
from provisioner.errors import StateError
from provisioner.node import config, policy


def add_parser(sub: Any) -> None:
    node = sub.add_parser(
        "node",
        help="node side: vault, seed, enroll, reconcile, import, status, host, pcrs (run by "
        "the host image's units)",
        description="Commands that run on the edge node. Paths derive from --root "
        "(default /): <root>/etc/edgepin, <root>/var/lib/edgepin, <root>/run/edgepin. "
        "Settings come from <root>/etc/edgepin/edgepin.conf and EDGEPIN_* variables.",
    )
    node.add_argument("--root", type=Path, help="root of the node's directories (default /)")
    node.add_argument("--tcti", help="TPM TCTI, e.g. device:/dev/tpmrm0 or swtpm:port=2321")
    node.add_argument("--libvirt-uri", help="libvirt URI (default qemu:///system)")
    node.add_argument("--virt-type", choices=("kvm", "qemu"), help="libvirt domain type")
    s = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    s.add_parser(
        "vault",
        help="early boot: open the encrypted state with the key in the TPM",
        description="Ask the TPM for the state vault's key (readable only in the measured "
        "boot state) and give it to the filesystem, so that the node's folders under "
        "/var (its state and images, the guest's serial log, cloud-init's data, the "
        "journal) can be read. On the first boot the key is made in the TPM and the "
        "folders are encrypted. Refuses, changing nothing, when a folder is encrypted "
        "under another key, the TPM holds no key for an enrolled node, or the boot state "
        "differs.",
    ).set_defaults(handler=cmd_vault)
    s.add_parser(
        "seed",
        help="first boot: take the enrollment bundle from the seed cloud-init read",
        description="Copy the enrollment bundle from the NoCloud seed's meta-data, as "
        "cloud-init keeps it (/run/cloud-init/instance-data-sensitive.json), to "
        "/var/lib/edgepin/seed/bundle.json, checked. Does nothing when cloud-init found no "
        "seed, or once the node is enrolled (its TPM holds the anchor).",
    ).set_defaults(handler=cmd_seed)
    s.add_parser(
        "enroll",
        help="first boot: unseal the bootstrap credential, mint and seal the node's own",
        description="Read the seed bundle, import and unseal the bootstrap credential from "
        "the TPM, create the node's long-term application credential (least privilege), seal "
        "it to the TPM under the configured PCRs, delete the bootstrap credential. A no-op "
        "when already enrolled; resumes an interrupted enrollment.",
    ).set_defaults(handler=cmd_enroll)
    s.add_parser(
        "reconcile",
        help="run exactly the assigned, verified guest",
        description="Read the assignment, fetch and verify a new image, switch with health "
        "check and rollback, or start the guest from the local copy when the control plane "
        "is unreachable. Writes /run/edgepin/status.json and edgepin.prom.",
    ).set_defaults(handler=cmd_reconcile)
    im = s.add_parser(
        "import",
        help="run the assignment an air-gapped bundle carries (removable media)",
        description="Read this node's bundle (written by `edgepin bundle`) from PATH: a "
        "bundle folder, or a folder holding edgepin-<node> folders (a medium mounted by "
        "edgepin-import.service when a filesystem labelled EDGEPIN appears). It is checked "
        "as an online assignment is: the assignment signed for this node by a pinned "
        "certificate, its generation at or above the node's floor, the image's sha512 and "
        "signature against the pinned certificates while it is copied beside the running "
        "guest, its key unwrapped only by this TPM in its measured state; then the switch, "
        "with health check and rollback. A bundle for another node, a damaged, truncated or "
        "older one is refused with the reason; nothing changes and the running guest is "
        "not touched. Nothing is sent to the control plane: the next reconcile that "
        "reaches it reports the guest. Exit codes as for reconcile.",
    )
    im.add_argument("path", type=Path, metavar="PATH", help="the bundle's folder, or a medium")
    im.set_defaults(handler=cmd_import)
    st = s.add_parser("status", help="print the node's status", description="Print the status.")
    st.add_argument("--json", action="store_true", help="the raw status.json")
    st.set_defaults(handler=cmd_status)
    host = s.add_parser(
        "host",
        help="the host's two root slots: which booted, a host update into the other",
        description="The host image has two root slots, a and b (docs/host-image.md). "
        "`status` says which slot booted, which the next boot takes and whether this boot "
        "is a new slot's one try. `install UPDATE` writes a host update (`./build.sh` "
        "writes edgepin-host.update.tar) into the slot that did not boot and arms it: the "
        "next boot tries it once, and the first reconcile that finds the node healthy there "
        "(its keys opened, its guest running or none assigned) keeps it; a boot that "
        "fails, or a node that never gets healthy, comes back on the old slot at the next "
        "start. `leave` and `watch` are what the units run to make that start come at once: "
        "when the vault does not open, and when the node is not healthy in time.",
    )
    hs = host.add_subparsers(dest="host_command", metavar="ACTION", required=True)
    hst = hs.add_parser(
        "status",
        help="the booted slot, the next boot's, and the host update written",
        description="Print the root slot this boot came from, the one the next boot takes "
        "(the ESP's EFI/edgepin/boot.env) and the one after it (after.env), and the host "
        "update this node wrote last, if any.",
    )
    hst.add_argument("--json", action="store_true", help="as JSON")
    hst.set_defaults(handler=cmd_host_status)
    hin = hs.add_parser(
        "install",
        help="write a host update into the other root slot and arm it for one boot",
        description="Read UPDATE whole (every member against its manifest), refuse it unless "
        "its host version is greater than this host's, write its root filesystem and hash "
        "tree into the other slot's partitions and its kernel and initramfs into the boot "
        "partition, read them back, write the slot's root hash onto the ESP, and only then "
        "point the next boot at the slot. The guest keeps running; the update takes effect "
        "at the next start. Cut off anywhere, the next boot is still the running slot's.",
    )
    hin.add_argument("update", type=Path, metavar="UPDATE", help="a host update (.update.tar)")
    hin.set_defaults(handler=cmd_host_install)
    hlv = hs.add_parser(
        "leave",
        help="on a root slot's one try: restart into the slot it came from",
        description="Run by edgepin-host-leave.service when the vault does not open: on a "
        "boot that is a root slot's one try, the node would never get healthy there (the "
        "TPM does not give the new boot chain the node's keys), so it restarts at once "
        "(EDGEPIN_RESTART_COMMAND) into the slot it came from, which the ESP already names. "
        "On any other boot it does nothing.",
    )
    hlv.set_defaults(handler=cmd_host_leave)
    hwa = hs.add_parser(
        "watch",
        help="on a root slot's one try: restart into the old slot if it does not get healthy",
        description="Run by edgepin-host-watch.service at every boot: on a boot that is a "
        "root slot's one try, wait for the reconcile to keep the slot (it does once the node "
        "is healthy on it) and, when that has not happened EDGEPIN_HOST_TRIAL_TIMEOUT "
        "seconds after the start, restart (EDGEPIN_RESTART_COMMAND) into the slot it came "
        "from, which the ESP already names. On any other boot it ends at once. Exit 1 when "
        "the restart fails.",
    )
    hwa.set_defaults(handler=cmd_host_watch)
    pc = s.add_parser(
        "pcrs",
        help="print the TPM's sha256 PCR values (for `edgepin enroll --pcr-values`)",
        description="Print the configured PCRs' sha256 values as JSON.",
    )
    pc.add_argument("--pcrs", help="PCRs to read (default: the configured ones)")
    pc.set_defaults(handler=cmd_pcrs)


def _cfg(args: argparse.Namespace) -> config.NodeConfig:
    return config.load(
        root=args.root,
        overrides={
            "tcti": args.tcti,
            "libvirt_uri": args.libvirt_uri,
            "virt_type": args.virt_type,
        },
    )


def cmd_vault(args: argparse.Namespace) -> int:
    from provisioner.node import vault

    cfg = _cfg(args)
    policy.prepare(cfg)
    pol = policy.node_policy(cfg)
    try:
        opened = vault.open_vault(cfg.root, cfg.tcti, pol)
    except vault.VaultError as e:
        if isinstance(pol, tpm.SignedPolicy) and e.hint is None:
            e.hint = policy.refusal_hint(cfg, e.message)
        raise
    if opened.made_key:
        policy.remember(cfg)
    made = "made in the TPM now, " if opened.made_key else ""
    encrypted = ", ".join(opened.encrypted_now) or "none"
    print(f"vault open: key {opened.identifier.hex()} ({made}folders encrypted now: {encrypted})")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from provisioner.node import credentials

    cfg = _cfg(args)
    done = credentials.take_seed(cfg)
    print(done)
    if done.startswith("no seed"):
        # an unenrolled node without a seed: what the factory needs to enroll it
        for line in credentials.factory_lines(cfg):
            print(line)
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from provisioner.node import credentials

    record = credentials.enroll(_cfg(args))
    print(f"enrolled: node {record['node_id']}, credential {record['credential_id']}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from provisioner.node import reconcile, state

    cfg = _cfg(args)
    outcome = reconcile.reconcile(cfg)
    print(f"{outcome.state}: {outcome.reason}")
    status = state.read_json(cfg.status_path) or {}
    if status.get("image_id"):
        print(
            f"current: image {status['image_id']} (version {status.get('version') or '-'}, "
            f"generation {status.get('generation')})"
        )
    if outcome.error is not None:
        print(f"edgepin: error: {outcome.error.message}", file=sys.stderr)
        if outcome.error.hint:
            print(f"  hint: {outcome.error.hint}", file=sys.stderr)
        return outcome.error.exit_code
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from provisioner.node import reconcile

    outcome = reconcile.import_bundle(_cfg(args), args.path)
    print(f"{outcome.state}: {outcome.reason}")
    if outcome.error is not None:
        print(f"edgepin: error: {outcome.error.message}", file=sys.stderr)
        if outcome.error.hint:
            print(f"  hint: {outcome.error.hint}", file=sys.stderr)
        return outcome.error.exit_code
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    try:
        status = json.loads(cfg.status_path.read_text())
    except FileNotFoundError:
        print(f"no status yet ({cfg.status_path})")
        return 3
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise StateError(f"{cfg.status_path} is not a status file (not JSON)") from None
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        raise StateError(f"{cfg.status_path} is not a status file (no state)")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(f"state       {status['state']}: {status.get('reason')}")
    print(f"image       {status.get('image_id') or '-'} (version {status.get('version') or '-'})")
    print(
        f"generation  {status.get('generation') or '-'}, highest seen "
        f"{status.get('highest_generation')}"
    )
    print(f"previous    {status.get('previous_image_id') or '-'}")
    print(f"fetched     {status.get('bytes_fetched_total', 0)} bytes")
    failures = status.get("failures")
    failures = failures if isinstance(failures, dict) else {}
    print("failures    " + (", ".join(f"{k}={v}" for k, v in sorted(failures.items())) or "none"))
    print(f"updated     {status.get('updated_at')}")
    return 0


def cmd_host_status(args: argparse.Namespace) -> int:
    from provisioner.node import hostslot

    cfg = _cfg(args)
    slots = hostslot.read_slots(hostslot.Layout.of(cfg))
    record = hostslot.pending(cfg)
    if args.json:
        doc = {**slots.to_json(), "host_version": cfg.host_version}
        doc["update"] = record.to_json() if record else None
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"booted      root slot {slots.booted} (host version {cfg.host_version})")
    print(f"next boot   root slot {slots.next}, then {slots.after}: {slots.state}")
    if record is None:
        print("update      none")
    else:
        outcome = "came back from it" if record.fell_back else f"in root slot {record.slot}"
        print(f"update      {record.name} version {record.host_version}: {outcome}")
    return 0


def cmd_host_install(args: argparse.Namespace) -> int:
    from provisioner.node import hostslot, state

    cfg = _cfg(args)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with state.node_lock(cfg.lock_path):
        update, slots = hostslot.install(
            cfg, args.update, log=lambda msg: print(msg, file=sys.stderr)
        )
    print(
        f"host update {update.name} version {update.host_version} written into root slot "
        f"{slots.next}: the next boot tries it once"
    )
    return 0


def cmd_host_leave(args: argparse.Namespace) -> int:
    from provisioner.node import hostslot

    cfg = _cfg(args)
    slots = hostslot.read_slots(hostslot.Layout.of(cfg))
    if not slots.trial:
        print(f"root slot {slots.booted} is not on trial: nothing to do")
        return 0
    print(
        f"host: root slot {slots.booted} is on trial and the node's state did not open: "
        f"restarting into root slot {slots.next}",
        file=sys.stderr,
    )
    return 0 if hostslot.restart(cfg) else 1


def cmd_host_watch(args: argparse.Namespace) -> int:
    from provisioner.node import hostslot

    cfg = _cfg(args)
    restarted = hostslot.watch(
        cfg,
        clock=time.monotonic,
        sleep=time.sleep,
        say=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    return 0 if restarted else 1


def cmd_pcrs(args: argparse.Namespace) -> int:

    cfg = _cfg(args)
    pcrs = tuple(int(p) for p in args.pcrs.split(",")) if args.pcrs else cfg.pcrs
    with tpm.Tpm.open(cfg.tcti) as t:
        values = t.read_pcrs(pcrs)
    print(json.dumps({str(k): v.hex() for k, v in sorted(values.items())}, indent=2))
    return 0
