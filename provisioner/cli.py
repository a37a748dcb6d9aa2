"""The ``edgepin`` command: operator commands and the node's ``edgepin node ...``.

Operator commands authenticate like the openstack client: ``--os-cloud`` / ``OS_CLOUD``
with clouds.yaml, or the ``--os-*`` options / ``OS_*`` variables, given before the
command (``edgepin --os-cloud prod status``). Errors are one line on stderr and a
non-zero exit code that tells the failure area (see docs/troubleshooting.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioner import __version__
from provisioner.errors import EdgepinError, UsageError
from provisioner.node.config import SETTINGS
from provisioner.node.model import guest_network

Handler = Callable[[argparse.Namespace], int]


def _network(text: str) -> str:
    """``--network``: checked here, so that a typo is refused before anything is uploaded."""
    try:
        return str(guest_network(text))
    except EdgepinError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _add_publish(sub: Any) -> None:
    p = sub.add_parser(
        "publish",
        help="encrypt, sign and upload a guest image to Glance",
        description="Encrypt GUEST_IMAGE client-side (qcow2 with LUKS inside, fresh random "
        "passphrase kept only in Barbican), sign the encrypted bytes (img_signature*), upload "
        "it to Glance with the os_encrypt_*, img_signature* and edgepin_* properties, and check "
        "Glance's sha512 against the one computed while uploading. On failure everything "
        "created is removed.",
    )
    p.add_argument("guest", type=Path, metavar="GUEST_IMAGE", help="qcow2 or raw disk image")
    p.add_argument("--name", required=True, help="Glance image name")
    p.add_argument("--version", required=True, dest="image_version", help="edgepin_version")
    p.add_argument("--vcpus", type=int, default=1, help="vCPUs of the guest (default 1)")
    p.add_argument("--memory", type=int, default=256, help="guest memory in MiB (default 256)")
    p.add_argument(
        "--signing-cert-id",
        default=_env("EDGEPIN_SIGNING_CERT_ID"),
        help="Barbican UUID of the signing certificate (env EDGEPIN_SIGNING_CERT_ID)",
    )
    p.add_argument(
        "--signing-key-id",
        default=_env("EDGEPIN_SIGNING_KEY_ID"),
        help="Barbican UUID of the signing private key (env EDGEPIN_SIGNING_KEY_ID)",
    )
    p.add_argument(
        "--hash-method",
        default="SHA-512",
        choices=("SHA-224", "SHA-256", "SHA-384", "SHA-512"),
        help="img_signature_hash_method (default SHA-512: the same hash as os_hash_value, "
        "so that nodes hash each image once)",
    )
    p.add_argument(
        "--health-marker",
        help="a line the guest prints on its serial console when healthy; nodes wait for it",
    )
    p.add_argument(
        "--network",
        type=_network,
        metavar="lan|vlan:N|host|none",
        help="the network the guest needs, signed into every assignment of the image: lan "
        "(the site's network, through the node's guest attachment), vlan:N (the same, "
        "in VLAN N from 1 to 4094: tagged on the site's network, untagged for the guest), "
        "host (a network with only the node's host on it, which leases the guest an "
        "address) or none (no network device). A node built without the network refuses "
        "the image. Not given: the node's guest attachment, if it has one",
    )
    p.add_argument(
        "--usb",
        action="append",
        default=[],
        metavar="VENDOR:PRODUCT",
        help="a USB device the guest is given (hex ids as lsusb prints them, such as "
        "0627:0001), signed into every assignment of the image; a node without it refuses "
        "the image. Repeat for several",
    )
    p.add_argument(
        "--pci",
        action="append",
        default=[],
        metavar="ADDRESS|class:CODE",
        help="a PCI device the guest is given (VFIO), signed into every assignment of the "
        "image: its address as lspci -D prints it (such as 0000:03:00.0) or its class "
        "(such as class:0c03, a USB controller; class:0200, an Ethernet controller), which "
        "exactly one device of the node must have. A node without it, or with several of "
        "that class, refuses the image. Repeat for several",
    )
    p.add_argument(
        "--key-deletion-policy",
        choices=("on_image_deletion", "do_not_delete"),
        default="on_image_deletion",
        help="os_encrypt_key_deletion_policy (default on_image_deletion)",
    )
    p.add_argument(
        "--luks-iter-time",
        type=int,
        default=1000,
        help="LUKS key derivation time in ms (default 1000)",
    )
    p.add_argument("--work-dir", type=Path, help="where the encrypted copy is made (default TMP)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_publish, needs_cloud=True)


def _add_signing_cert(sub: Any) -> None:
    p = sub.add_parser("signing-cert", help="image-signing key and certificate")
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = s.add_parser(
        "create",
        help="create a signing key and certificate, stored in Barbican",
        description="Generate a signing key and a self-signed certificate. Both are stored in "
        "Barbican (the key only there); the certificate is also written as PEM to --cert-out, "
        "to be pinned in the host image (DIB_EDGEPIN_SIGNING_CERTS).",
    )
    c.add_argument("--name", required=True, help="certificate common name")
    c.add_argument("--cert-out", type=Path, required=True, help="PEM file to write")
    c.add_argument(
        "--key-type",
        default="RSA-PSS",
        choices=("RSA-PSS", "ECC_SECP384R1", "ECC_SECP521R1"),
        help="img_signature_key_type of the new key (default RSA-PSS, 3072 bits)",
    )
    c.add_argument("--days", type=int, default=3 * 365, help="validity (default 3 years)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(handler=cmd_signing_cert_create, needs_cloud=True)


def _add_release(sub: Any) -> None:
    p = sub.add_parser(
        "release",
        help="the release key and its approvals of a host release's PCR values",
        description="A host image built with --release-key seals what a node keeps so that it "
        "also opens in any measured state the release key approved: a new boot chain (a "
        "host update) keeps the node's credential, image keys and vault once its PCR values "
        "are approved. Keep the private key offline. A passphrase for it is read from "
        "EDGEPIN_RELEASE_KEY_PASSPHRASE, never from the command line.",
    )
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    k = s.add_parser(
        "key",
        help="create a release key (ECDSA P-256)",
        description="Write a new release key: the private key (mode 0600, encrypted under "
        "EDGEPIN_RELEASE_KEY_PASSPHRASE when set) and its public half, the PEM that "
        "`./build.sh image --release-key` pins in the host image. Never overwrites a file.",
    )
    k.add_argument("--key-out", type=Path, required=True, help="private key PEM to write")
    k.add_argument("--public-out", type=Path, required=True, help="public key PEM to write")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.set_defaults(handler=cmd_release_key)
    a = s.add_parser(
        "approve",
        help="approve a boot chain's PCR values with the release key",
        description="Sign the policy of the given PCR values at a host epoch (TPM2 PolicyPCR, "
        "then PolicyNV that the node's host floor is not above the epoch) with the release "
        "key and write the approval (JSON). Nodes that pin the key open their secrets in "
        "that measured state once the approval is in their /var/lib/edgepin-host/approvals/, "
        "as long as their TPM's host floor is not above the epoch. "
        "The values are those a reference machine of the model measures with the host "
        "release (its console's `factory: pcrs` line, or the hint of a node that refused "
        "to open its secrets).",
    )
    a.add_argument("--key", type=Path, required=True, help="the release key (private, PEM)")
    a.add_argument(
        "--pcrs",
        default=SETTINGS["EDGEPIN_PCRS"][0],
        help="the host image's EDGEPIN_PCRS (default %(default)s): nodes count only "
        "approvals of exactly their PCRs",
    )
    a.add_argument(
        "--pcr-values",
        required=True,
        help='JSON file {"4": "<sha256 hex>", ...} with the values to approve, or \'zero\'',
    )
    a.add_argument(
        "--epoch",
        type=int,
        default=0,
        help="the host release's epoch, 0 to 63 (`./build.sh image --host-epoch`, default "
        "%(default)s): the approval opens nothing on a node whose floor is above it",
    )
    a.add_argument("--out", type=Path, required=True, help="approval file to write")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(handler=cmd_release_approve)


def cmd_release_key(args: argparse.Namespace) -> int:
    from provisioner.operator import release

    fingerprint = release.create_key(args.key_out, args.public_out)
    _print(
        args,
        {"key": str(args.key_out), "public": str(args.public_out), "sha256": fingerprint},
        [
            f"release key {args.key_out} (keep it offline), public half {args.public_out}",
            f"sha256     {fingerprint}",
        ],
    )
    return 0


def cmd_release_approve(args: argparse.Namespace) -> int:
    from provisioner.operator import release
    from provisioner.operator.enroll import parse_pcrs

    done = release.approve(
        args.key,
        parse_pcrs(args.pcrs),
        None if args.pcr_values == "zero" else Path(args.pcr_values),
        args.pcr_values == "zero",
        args.out,
        args.epoch,
    )
    _print(
        args,
        {
            "approval": str(done.path),
            "pcrs": list(done.pcrs),
            "epoch": done.epoch,
            "policy": done.policy,
            "key_sha256": done.key_sha256,
        },
        [
            f"approval   {done.path}",
            f"pcrs       {','.join(map(str, done.pcrs))} at epoch {done.epoch} "
            f"(policy {done.policy})",
            f"key sha256 {done.key_sha256}",
        ],
    )
    return 0


def _add_host(sub: Any) -> None:
    p = sub.add_parser(
        "host",
        help="host releases in Glance: publish a host update, list them, assign one to nodes",
        description="A host release is the host update `./build.sh image` writes "
        "(out/edgepin-host.update.tar: the root filesystem, its dm-verity hash tree, the "
        "kernel, the initramfs and a manifest with the host version), signed with the "
        "image-signing key and uploaded to Glance as an image of its own kind "
        "(edgepin_kind=host-update, disk_format raw, not encrypted: a host root holds no "
        "secret). It can never be assigned as a guest image. Nodes assigned a release "
        "fetch it, check it, write it into their other root slot and restart into it once; "
        "they keep it once healthy there.",
    )
    s = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    pub = s.add_parser(
        "publish",
        help="check, sign and upload a host update",
        description="Read UPDATE completely (every member in place, with the size and "
        "sha256 its manifest gives), refuse a host version Glance already holds, sign the "
        "file's bytes (img_signature*, SHA-512), upload it and check Glance's sha512 "
        "against the one computed while uploading. On failure the image is deleted. The "
        "release key's approvals of the PCR values the release measures (one per root slot, "
        "`edgepin release approve`) go with it: nodes built with a release key need them to "
        "open their secrets after the update.",
    )
    pub.add_argument("update", type=Path, metavar="UPDATE", help="out/edgepin-host.update.tar")
    pub.add_argument("--name", help="Glance image name (default: NAME-HOSTVERSION)")
    pub.add_argument(
        "--signing-cert-id",
        default=_env("EDGEPIN_SIGNING_CERT_ID"),
        help="Barbican UUID of the signing certificate (env EDGEPIN_SIGNING_CERT_ID)",
    )
    pub.add_argument(
        "--signing-key-id",
        default=_env("EDGEPIN_SIGNING_KEY_ID"),
        help="Barbican UUID of the signing private key (env EDGEPIN_SIGNING_KEY_ID)",
    )
    pub.add_argument(
        "--approval",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an approval of the PCR values this release measures in one root slot "
        "(`edgepin release approve --out FILE`); repeatable",
    )
    pub.add_argument("--json", action="store_true", help="print the result as JSON")
    pub.set_defaults(handler=cmd_host_publish, needs_cloud=True)
    apr = s.add_parser(
        "approve",
        help="add the release key's approvals to a published host release",
        description="Add approvals of the PCR values RELEASE (image id or host version) "
        "measures (`edgepin release approve --out FILE`, one per root slot) to its Glance "
        "record, beside those it has. Its bytes and signature do not change; nodes read the "
        "approvals when they fetch it. A node built with a release key refuses a release "
        "without an approval its key signed.",
    )
    apr.add_argument("release", metavar="RELEASE", help="image id or host version")
    apr.add_argument(
        "--approval",
        type=Path,
        action="append",
        default=[],
        required=True,
        metavar="FILE",
        help="an approval file; repeatable",
    )
    apr.add_argument("--json", action="store_true", help="print the result as JSON")
    apr.set_defaults(handler=cmd_host_approve, needs_cloud=True)
    asg = s.add_parser(
        "assign",
        help="assign a host release to nodes",
        description="Share RELEASE (a host release's Glance image id, or its host version) "
        "with each node's project and write the node's host assignment, signed for that node "
        "with the assignment-signing key (release id, sha512, host version, a generation "
        "that goes up, when to restart). The node fetches the release, checks its signature "
        "against the certificates it pins, writes it into the root slot it did not boot "
        "from and restarts into it once, as --restart says; it keeps the release once "
        "healthy on it, and otherwise comes back to the slot it left and reports it. A "
        "release not newer than a node's host is left alone. Assigning the same release "
        "again (a new generation) makes a node that came back from it try once more.",
    )
    asg.add_argument("release", metavar="RELEASE", help="image id or host version")
    asg.add_argument("node_ids", metavar="NODE_ID", nargs="+")
    asg.add_argument(
        "--restart",
        default="never",
        metavar="now|never|HH:MM-HH:MM",
        help="when the node restarts into the release once written: now, never (at the "
        "next restart someone else makes) or within a daily window in UTC, e.g. "
        "02:00-04:00 (default: %(default)s)",
    )
    from provisioner.fleetcli import add_signer_arguments

    add_signer_arguments(asg)
    asg.add_argument("--json", action="store_true", help="print the result as JSON")
    asg.set_defaults(handler=cmd_host_assign, needs_cloud=True)
    ls = s.add_parser(
        "list",
        help="list the host releases in Glance",
        description="Every host release the caller can see, oldest host version first.",
    )
    ls.add_argument("--json", action="store_true", help="print the result as JSON")
    ls.set_defaults(handler=cmd_host_list, needs_cloud=True)


def cmd_host_publish(args: argparse.Namespace) -> int:
    from provisioner.operator import hostpublish

    if not args.signing_cert_id or not args.signing_key_id:
        raise UsageError(
            "host publish needs --signing-cert-id and --signing-key-id",
            hint="the image-signing key and certificate: `edgepin signing-cert create`",
        )
    rel = hostpublish.publish(
        args.conn,
        args.update,
        signing_cert_id=args.signing_cert_id,
        signing_key_id=args.signing_key_id,
        name=args.name,
        approvals=tuple(args.approval),
        progress=args.progress,
    )
    _print(
        args,
        dataclasses.asdict(rel),
        [
            f"image        {rel.image_id}",
            f"name         {rel.name}",
            f"host version {rel.host_version}",
            f"root hash    {rel.root_hash}",
            f"size         {rel.size}",
            f"approvals    {rel.approvals}",
        ],
    )
    return 0


def cmd_host_approve(args: argparse.Namespace) -> int:
    from provisioner.operator import hostpublish

    rel = hostpublish.approve(args.conn, args.release, tuple(args.approval))
    _print(
        args,
        dataclasses.asdict(rel),
        [
            f"host release {rel.image_id} (host version {rel.host_version}): {rel.approvals} "
            "approvals"
        ],
    )
    return 0


def cmd_host_assign(args: argparse.Namespace) -> int:
    from provisioner import hostassign
    from provisioner.fleetcli import signer_from_args
    from provisioner.operator import hostpublish, nodes

    for node_id in args.node_ids:
        nodes.check_node_id(node_id)
    restart = hostassign.restart_option(args.restart)
    signer = signer_from_args(args, "host assign")
    rel, results = hostpublish.assign_host(
        args.conn, args.edge_domain, args.node_ids, args.release, signer, restart
    )
    if args.json:
        print(
            json.dumps(
                {
                    "release": dataclasses.asdict(rel),
                    "restart": str(restart),
                    "nodes": [
                        {
                            "node_id": r.node_id,
                            "generation": r.generation if r.error is None else None,
                            "previous": r.previous,
                            "error": r.error.message if r.error else None,
                        }
                        for r in results
                    ],
                },
                indent=2,
                sort_keys=True,
            )
        )
    else:
        print(f"host release {rel.image_id} (host version {rel.host_version}), restart {restart}")
        for r in results:
            if r.error is not None:
                print(f"{r.node_id}: FAILED: {r.error.message}")
            else:
                before = f"host version {r.previous['host_version']}" if r.previous else "none"
                print(f"{r.node_id}: generation {r.generation} (before: {before})")
    failed = [r.error for r in results if r.error is not None]
    if failed:
        err = EdgepinError(
            f"{len(failed)} of {len(results)} nodes were not assigned the host release",
            hint=failed[0].hint,
        )
        err.exit_code = failed[0].exit_code  # the first failure's kind
        raise err
    return 0


def cmd_host_list(args: argparse.Namespace) -> int:
    from provisioner.operator import hostpublish

    found = hostpublish.releases(args.conn)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in found], indent=2, sort_keys=True))
        return 0
    for r in found:
        print(
            f"{r.host_version:>20}  {r.image_id}  {r.name}  root hash {r.root_hash[:16]}…  "
            f"{r.approvals} approvals"
        )
    if not found:
        print("no host releases in Glance")
    return 0


def _add_nodes(sub: Any) -> None:
    e = sub.add_parser(
        "enroll",
        help="create a node's identity and its TPM-wrapped bootstrap seed",
        description="Create the node's project and user in the edge domain and a bootstrap "
        "application credential that expires after --expires-in days; wrap its secret offline "
        "for the node's TPM (EK) under the PCR policy given; write a NoCloud seed image (vfat, "
        "label CIDATA). Enrolling an existing node again rotates the bootstrap credential. "
        "With --offline, for a node that never reaches the control plane, the seed carries "
        "the node's own restricted credential instead (edgepin-node, the access rules a "
        "node gives itself, no expiry), wrapped the same way: the node enrolls without "
        "Keystone and runs from bundles; it reconciles and reports with that credential "
        "whenever it reaches the control plane. Enrolling again deletes every earlier "
        "credential of the node.",
    )
    e.add_argument("node_id", metavar="NODE_ID")
    ek = e.add_mutually_exclusive_group(required=True)
    ek.add_argument("--ek-pub", type=Path, help="the node's EK public key, PEM")
    ek.add_argument("--ek-cert", type=Path, help="the node's EK certificate, PEM or DER")
    e.add_argument("--ek-ca", type=Path, help="CA bundle to verify --ek-cert against")
    e.add_argument(
        "--pcrs",
        required=True,
        help="PCRs the bootstrap credential is bound to, e.g. 7 or 0,7: the host image's "
        "EDGEPIN_PCRS (the node refuses a seed made for other PCRs)",
    )
    e.add_argument(
        "--pcr-values",
        help='JSON file {"7": "<sha256 hex>"} with the node\'s expected PCR values, '
        "or 'zero' for a TPM that has measured nothing (virtual nodes)",
    )
    e.add_argument("--seed-out", type=Path, required=True, help="NoCloud seed image to write")
    e.add_argument(
        "--expires-in", type=int, default=14, help="bootstrap credential lifetime, days (14)"
    )
    e.add_argument(
        "--offline",
        action="store_true",
        help="put the node's own credential (no expiry) in the seed instead of a bootstrap "
        "credential: the node enrolls without reaching Keystone",
    )
    e.add_argument("--ca", type=Path, help="CA bundle the node pins (default: the cloud's cacert)")
    e.add_argument(
        "--node-interface",
        choices=("public", "internal", "admin"),
        default="public",
        help="service catalog interface the node uses for Keystone, Glance and Barbican "
        "(default public)",
    )
    e.add_argument(
        "--node-auth-url",
        help="Keystone URL as the node reaches it (default: the catalog's identity URL "
        "of --node-interface)",
    )
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(handler=cmd_enroll, needs_cloud=True)

    a = sub.add_parser(
        "assign",
        help="assign an image to a node",
        description="Share IMAGE_ID with the node's project, grant the node read access to "
        "exactly that image's key and signing certificate (Barbican ACLs), withdraw earlier "
        "grants, and write the assignment record with the next generation, signed for that "
        "node (node, image id, image sha512, generation, time) with the assignment-signing "
        "key: a node runs only an assignment signed by a certificate it pins. Prints the "
        "previous assignment.",
    )
    a.add_argument("node_id", metavar="NODE_ID")
    a.add_argument("image_id", metavar="IMAGE_ID")
    from provisioner.fleetcli import add_signer_arguments

    add_signer_arguments(a)
    a.add_argument(
        "--generation",
        type=int,
        help="the generation to sign, when the node's current record is not one this key "
        "signed (another key's, or none of edgepin's): higher than any the node has seen; "
        "by default the signed current generation + 1",
    )
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(handler=cmd_assign, needs_cloud=True)

    b = sub.add_parser(
        "bundle",
        help="write what a node needs to run its guest with no network (air-gapped)",
        description="Write DIR/edgepin-NODE_ID/, for a site without a network: the node's "
        "current signed assignment (assign the image first: `edgepin assign`), its encrypted "
        "image from Glance (sha512 checked "
        "against the signed one) and the image's passphrase wrapped offline for the "
        "node's TPM (a duplication blob for its endorsement key under its PCR policy, as "
        "the bootstrap credential at enrollment). Nothing in it is secret in the clear. "
        "The EK and PCR policy are the ones recorded at enrollment; give them here for a "
        "node enrolled without that record, or to use the factory's EK certificate (it "
        "must be the EK the node was enrolled for). Copy the folder to a filesystem "
        "labelled EDGEPIN (exFAT; FAT32 for images under 4 GiB): the node imports it when "
        "the medium is plugged in (`edgepin node import`). An older bundle of the node in "
        "DIR is replaced; a failure leaves none.",
    )
    b.add_argument("node_id", metavar="NODE_ID")
    b.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder to write the bundle folder edgepin-NODE_ID into (e.g. a mounted stick)",
    )
    bek = b.add_mutually_exclusive_group()
    bek.add_argument("--ek-pub", type=Path, metavar="FILE", help="the node's EK public key, PEM")
    bek.add_argument(
        "--ek-cert", type=Path, metavar="FILE", help="the node's EK certificate, PEM or DER"
    )
    b.add_argument(
        "--ek-ca", type=Path, metavar="FILE", help="CA bundle to verify --ek-cert against"
    )
    b.add_argument(
        "--pcrs",
        metavar="LIST",
        help="PCRs to bind the key to (the host image's EDGEPIN_PCRS), with --pcr-values; "
        "default: the policy recorded at enrollment",
    )
    b.add_argument(
        "--pcr-values",
        metavar="FILE|zero",
        help='JSON file {"7": "<sha256 hex>"} with the node\'s expected PCR values, or '
        "'zero' (virtual nodes); with --pcrs",
    )
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(handler=cmd_bundle, needs_cloud=True)

    st = sub.add_parser(
        "status",
        help="table of nodes: labels, assignment, what they run, outcome, last seen",
        description="Show each node's labels, its assignment and generation, what its last "
        "report says (the image it runs, the outcome of its last reconcile and why, when it "
        "was last seen), the Glance member status it set (pending/accepted/rejected), and "
        "the state of its credentials; then the fleet in figures.",
    )
    st.add_argument("node_id", metavar="NODE_ID", nargs="?")
    st.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="only nodes with this label (repeat: all must match; KEY=A|B: either value)",
    )
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument(
        "--prometheus",
        metavar="FILE",
        help="write the same figures in Prometheus' text format to FILE (atomically, for a "
        "textfile collector), or to standard output with -",
    )
    st.set_defaults(handler=cmd_status, needs_cloud=True)

    r = sub.add_parser(
        "revoke",
        help="cut a node off from its image and key",
        description="Disable the node's user, delete its application credentials, remove "
        "its image memberships and Barbican ACLs. Afterwards the node can read neither its "
        "image nor its key. The node's project stays, for the record.",
    )
    r.add_argument("node_id", metavar="NODE_ID")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(handler=cmd_revoke, needs_cloud=True)


def node_command(argv: list[str]) -> bool:
    """True for ``edgepin [--debug|--no-progress] node ...``: a node-side process."""
    for arg in argv:
        if arg == "node":
            return True
        if not arg.startswith("-") or arg.startswith("--os-") or arg == "--edge-domain":
            return False
    return False


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepin",
        description="Single-VM edge appliances governed by Keystone, Glance and Barbican.",
        epilog="Authentication: --os-cloud/OS_CLOUD with clouds.yaml, or --os-*/OS_* "
        "options, given before the command.",
    )
    parser.add_argument("--version", action="version", version=f"edgepin {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar while publish uploads (there is none when stderr is not a TTY)",
    )
    parser.add_argument(
        "--edge-domain",
        default=os.environ.get("EDGEPIN_EDGE_DOMAIN", "edge"),
        help="Keystone domain of the nodes (env EDGEPIN_EDGE_DOMAIN, default edge)",
    )
    if not node_command(argv):
        # the --os-* options come from openstacksdk's config loader (its import is most of
        # an operator command's start); `edgepin node ...` never talks to the cloud that way
        from provisioner.cloud import register_auth_arguments

        register_auth_arguments(parser, argv)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_publish(sub)
    _add_signing_cert(sub)
    _add_nodes(sub)
    _add_release(sub)
    _add_host(sub)
    from provisioner.node import cli as node_cli

    node_cli.add_parser(sub)
    from provisioner import fleetcli

    fleetcli.add_parsers(sub)
    for extra in _extra_commands:
        extra(sub)
    return parser


# Other modules (operator commands, node commands) add themselves here.
_extra_commands: list[Callable[[Any], None]] = []


def _print(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        for line in lines:
            print(line)


def cmd_signing_cert_create(args: argparse.Namespace) -> int:
    from provisioner.operator import signingcert

    result = signingcert.create(args.conn, args.name, args.key_type, args.days, args.cert_out)
    _print(
        args,
        {
            "cert_id": result.cert_id,
            "key_id": result.key_id,
            "sha256": result.fingerprint,
            "cert": str(args.cert_out),
        },
        [
            f"certificate  {result.cert_id}",
            f"private key  {result.key_id}  (stored in Barbican only)",
            f"sha256       {result.fingerprint}",
            f"PEM          {args.cert_out}  (pin it in the host image)",
            f"export EDGEPIN_SIGNING_CERT_ID={result.cert_id}"
            f" EDGEPIN_SIGNING_KEY_ID={result.key_id}",
        ],
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from provisioner.operator.publish import PublishRequest, publish

    if not args.signing_cert_id or not args.signing_key_id:
        raise UsageError(
            "publish needs --signing-cert-id and --signing-key-id",
            hint="create them with `edgepin signing-cert create`",
        )
    result = publish(
        args.conn,
        PublishRequest(
            guest=args.guest,
            name=args.name,
            version=args.image_version,
            vcpus=args.vcpus,
            memory_mb=args.memory,
            signing_cert_id=args.signing_cert_id,
            signing_key_id=args.signing_key_id,
            hash_method=args.hash_method,
            health_marker=args.health_marker,
            network=args.network,
            usb=tuple(args.usb),
            pci=tuple(args.pci),
            key_deletion_policy=args.key_deletion_policy,
            luks_iter_time_ms=args.luks_iter_time,
            work_dir=args.work_dir,
            progress=args.progress,
        ),
    )
    _print(
        args,
        {
            "image_id": result.image_id,
            "key_id": result.key_id,
            "sha512": result.sha512,
            "size": result.size,
        },
        [
            f"image   {result.image_id}",
            f"key     {result.key_id}",
            f"size    {result.size}",
            f"sha512  {result.sha512}",
        ],
    )
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from provisioner.operator.enroll import EnrollRequest, enroll, parse_pcrs

    conn = args.conn
    ca = args.ca
    if ca is None and conn.config.config.get("cacert"):
        ca = Path(conn.config.config["cacert"])
    auth_url = args.node_auth_url or conn.session.get_endpoint(
        service_type="identity", interface=args.node_interface
    )
    if not auth_url.rstrip("/").endswith("/v3"):
        auth_url = auth_url.rstrip("/") + "/v3"
    req = EnrollRequest(
        node_id=args.node_id,
        seed_out=args.seed_out,
        ek_pub=args.ek_pub,
        ek_cert=args.ek_cert,
        ek_ca=args.ek_ca,
        pcrs=parse_pcrs(args.pcrs),
        pcr_values=None if args.pcr_values in (None, "zero") else Path(args.pcr_values),
        pcr_values_zero=args.pcr_values == "zero",
        window_days=args.expires_in,
        offline=args.offline,
        edge_domain=args.edge_domain,
        ca_bundle=ca,
        interface=args.node_interface,
    )
    result = enroll(conn, req, auth_url, conn.config.get_region_name())
    cred_key = "node_credential_id" if result.offline else "bootstrap_credential_id"
    cred_line = (
        f"node cred  {result.credential_id} (offline enrollment, no expiry)"
        if result.offline
        else f"bootstrap  {result.credential_id}, expires {result.expires_at} UTC"
    )
    _print(
        args,
        {
            "node_id": result.node_id,
            "project_id": result.project_id,
            "user_id": result.user_id,
            cred_key: result.credential_id,
            "offline": result.offline,
            "expires_at": result.expires_at,
            "rotated": result.rotated,
            "seed": str(result.seed),
        },
        [
            f"node       {result.node_id} (project {result.project_id})",
            cred_line,
            *([f"rotated    {', '.join(result.rotated)}"] if result.rotated else []),
            f"seed       {result.seed}",
        ],
    )
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    from provisioner.fleetcli import signer_from_args
    from provisioner.operator.assign import assign

    signer = signer_from_args(args, "assign")
    if args.generation is not None and not 1 <= args.generation <= 2**62:
        raise UsageError("--generation must be a whole number from 1 to 2**62")
    result = assign(
        args.conn, args.edge_domain, args.node_id, args.image_id, signer, args.generation
    )
    prev = result.previous
    _print(
        args,
        {
            "node_id": result.node_id,
            "image_id": result.image_id,
            "generation": result.generation,
            "previous": prev,
        },
        [
            f"{result.node_id}: image {result.image_id}, generation {result.generation}",
            "previous: "
            + (f"image {prev['image_id']}, generation {prev['generation']}" if prev else "none"),
        ],
    )
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from provisioner.operator.bundle import BundleRequest, make_bundle
    from provisioner.operator.enroll import parse_pcrs

    result = make_bundle(
        args.conn,
        BundleRequest(
            node_id=args.node_id,
            out=args.out,
            ek_pub=args.ek_pub,
            ek_cert=args.ek_cert,
            ek_ca=args.ek_ca,
            pcrs=parse_pcrs(args.pcrs) if args.pcrs else (),
            pcr_values=None if args.pcr_values in (None, "zero") else Path(args.pcr_values),
            pcr_values_zero=args.pcr_values == "zero",
            edge_domain=args.edge_domain,
            progress=args.progress,
        ),
    )
    _print(
        args,
        {
            "node_id": result.node_id,
            "bundle": str(result.path),
            "image_id": result.image_id,
            "generation": result.generation,
            "size": result.size,
            "sha512": result.sha512,
            "pcrs": list(result.pcrs),
            "ek_sha256": result.ek_sha256,
            "sources": result.sources,
        },
        [
            f"bundle      {result.path}",
            f"node        {result.node_id}: image {result.image_id}, generation "
            f"{result.generation}",
            f"image       {result.size} bytes, sha512 {result.sha512[:16]}…",
            f"key         wrapped for EK sha256 {result.ek_sha256[:16]}… under PCRs "
            f"{','.join(map(str, result.pcrs))} ({result.sources})",
            "carry it     on a filesystem labelled EDGEPIN (exFAT; FAT32 for images under "
            "4 GiB); the node imports it when the medium is plugged in",
        ],
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from provisioner.fleetcli import status_table
    from provisioner.operator.selector import from_args
    from provisioner.operator.status import status

    select = from_args(args.label) if args.label else None
    rows = status(args.conn, args.edge_domain, args.node_id, select)
    if args.prometheus:
        from provisioner.fleetcli import write_prometheus

        write_prometheus(rows, args.prometheus)
        return 0
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    status_table(rows, f"edgepin nodes ({args.edge_domain})")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from provisioner.operator.revoke import revoke

    result = revoke(args.conn, args.edge_domain, args.node_id)
    _print(
        args,
        result,
        [
            f"{result['node_id']}: revoked at {result['revoked_at']}",
            f"  credentials deleted: {len(result['credentials_deleted'])}",
            f"  images unshared:     {', '.join(result['images_unshared']) or '-'}",
            f"  secrets withdrawn:   {len(result['secrets_withdrawn'])}",
        ],
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Client libraries log request bodies at debug level, passwords and secrets included:
    # they stay at WARNING even with --debug. Secrets are never logged.
    for noisy in ("keystoneauth", "openstack", "urllib3", "stevedore", "barbicanclient"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not args.debug else logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 2
    args.progress = not args.no_progress and sys.stderr.isatty()
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.parse_args([*argv, "--help"])
        return 2
    try:
        if getattr(args, "needs_cloud", False):
            from provisioner.cloud import connect

            args.conn = connect(args)
        return handler(args)
    except EdgepinError as e:
        if args.debug:
            traceback.print_exc()
        print(f"edgepin: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgepin: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"edgepin: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        print("  hint: run again with --debug for the traceback", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
