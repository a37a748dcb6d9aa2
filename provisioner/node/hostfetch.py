"""The node's host assignment: fetch the assigned host release, check it, write it into the
root slot that did not boot, and restart into it when the assignment says
(docs/node.md#host-releases).

Run by the reconcile once the node is healthy and has read its project, never on a boot
that is itself a trial (:mod:`provisioner.node.hostslot` settles that first). In order:

1. the host assignment (:mod:`provisioner.hostassign`), signed for this node with a pinned
   assignment-signing certificate; a release not newer than this host is left alone;
2. the release's Glance record: of the host kind, raw, with the sha512 and the host version
   the assignment signed, and signed (``img_signature*``) by a pinned image-signing
   certificate;
3. the release key's approvals of the PCR values the release measures, from the release's
   record: on a node that pins a release key, only approvals it signed, of exactly the
   node's PCR selection, are kept, and a release with none is refused (the node would not
   open its secrets after the restart);
4. the release itself, with the guest images' resumable, verified fetch, into the vault
   (``host-release/``), kept only when its sha512 and signature verify and it is a whole
   host update (:func:`provisioner.hostupdate.read`);
5. the approvals into ``/var/lib/edgepin-host/approvals/``, then the install into the
   other slot (:func:`provisioner.node.hostslot.install`, which arms it last); the
   downloaded file is deleted;
6. the restart: at once, never (the next restart someone makes), or at the first reconcile
   inside the daily window.

A release refused for what it is (its record, its bytes, its approvals, a slot it does
not fit) is remembered by image id and generation (``host-refused.json`` in the vault), so
that it is not fetched again at every run; assigning it again (a new generation) or
another release tries again. A node that came back from a release does not try it again
until it is assigned again. A cut download resumes at the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from provisioner import hostassign, hostupdate, tpm
from provisioner.errors import (
    AuthError,
    EdgepinError,
    HostSlotError,
    ImageError,
    NotFoundError,
    ServiceUnavailableError,
    StateError,
    VerificationError,
)
from provisioner.hostassign import HostAssignment
from provisioner.node import fetch, hostslot, policy, state
from provisioner.node.client import NodeClient
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)

APPROVALS_PROPERTY = hostassign.APPROVALS_PROPERTY
MAX_RELEASE = 4 << 30  # bytes: two root partitions' worth and more
DIR = "host-release"
REFUSED = "host-refused.json"
SUFFIX = ".update"


@dataclass(frozen=True)
class HostStep:
    """What the host assignment came to in this run: the version armed for the next boot
    (0: none), why the assigned release is refused (""), and whether to restart now."""

    next_version: int = 0
    refused: str = ""
    restart: bool = False


def check_release(image: dict[str, Any], a: HostAssignment) -> None:
    """Refuse a Glance record that is not the signed host release of ``a``."""
    for key, value in image.items():
        limit = hostassign.MAX_APPROVALS_TEXT if key == APPROVALS_PROPERTY else fetch.MAX_PROPERTY
        if isinstance(value, str) and (len(value) > limit or "\x00" in value):
            raise ImageError(f"image property {key[:40]!r} is malformed (too long or NUL)")
    if (
        image.get(hostassign.KIND_PROPERTY) != hostassign.RELEASE_KIND
        or image.get("disk_format") != "raw"
    ):
        raise ImageError(f"image {a.image_id} is not a host release: refused")
    if image.get("os_hash_algo") != "sha512" or image.get("os_hash_value") != a.image_sha512:
        raise VerificationError(
            f"host release {a.image_id} is not the one assigned (its sha512 differs from "
            "the signed host assignment's): refused",
            image_id=a.image_id,
        )
    if image.get(hostassign.VERSION_PROPERTY) != str(a.host_version):
        raise VerificationError(
            f"host release {a.image_id} is not host version {a.host_version}, which the "
            "host assignment names: refused"
        )
    for key in (
        "img_signature",
        "img_signature_hash_method",
        "img_signature_key_type",
        "img_signature_certificate_uuid",
    ):
        if not isinstance(image.get(key), str) or not image.get(key):
            raise VerificationError(f"host release is not signed ({key} missing): refused")
    size = image.get("size")
    if type(size) is not int or not 0 < size <= MAX_RELEASE:
        raise ImageError(f"host release {a.image_id} has no size, or one too large")


def release_approvals(cfg: NodeConfig, image: dict[str, Any], floor: int = 0) -> list[bytes]:
    """The approvals that go with the release and count on this node (as JSON documents):
    signed by the release key it pins, of exactly its PCR selection, at an epoch not below
    the TPM's host ``floor``. None needed (and none kept) on a node without a release key;
    ImageError on a node with one when none counts."""
    pem = policy.release_key(cfg)
    if pem is None:
        return []
    raw = image.get(APPROVALS_PROPERTY) or "[]"
    try:
        docs = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        docs = None
    if not isinstance(docs, list) or len(docs) > hostassign.MAX_APPROVALS:
        raise ImageError(f"the host release's {APPROVALS_PROPERTY} is not a list of approvals")
    kept: list[bytes] = []
    below: set[int] = set()
    for doc in docs:
        data = json.dumps(doc, sort_keys=True).encode()
        try:
            approval = tpm.parse_approval(data)
            tpm.verify_approval(approval, pem)
        except tpm.TpmError as e:
            LOG.warning("host: an approval that goes with the release is skipped: %s", e)
            continue
        if sorted(approval.pcrs) != list(cfg.pcrs):
            continue
        if approval.epoch < floor:
            below.add(approval.epoch)
            continue
        kept.append(data)
    if not kept and below:
        raise ImageError(
            f"the host release is approved only at epoch {max(below)}, below this node's "
            f"host floor ({floor}): the TPM would open nothing on it: refused",
            hint="assign a release of the floor's epoch or later",
        )
    if not kept:
        raise ImageError(
            "the host release carries no approval of its PCR values signed by this node's "
            f"release key for PCRs {list(cfg.pcrs)}: after the restart the node would not "
            "open its secrets: refused",
            hint="publish the release with `edgepin host publish --approval FILE` (one per "
            "root slot, `edgepin release approve`)",
        )
    return kept


def _save_approvals(cfg: NodeConfig, approvals: list[bytes]) -> None:
    """Beside the node's other approvals (public and signed: the TPM checks them again)."""
    folder = cfg.approvals_dir
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    for data in approvals:
        name = f"release-{hashlib.sha256(data).hexdigest()[:32]}.json"
        if not (folder / name).exists():
            state.atomic_write(folder / name, data, mode=0o644)


def refused(cfg: NodeConfig) -> tuple[str, int, str] | None:
    """The release refused before (image id, generation, why), or None; a record that is
    not one (damaged, or from someone with the disk) counts as none: the release is
    fetched and checked again."""
    try:
        with (cfg.state_dir / REFUSED).open("rb") as f:
            doc = json.loads(f.read(4096))
        image_id, gen, why = doc["image_id"], doc["generation"], doc["why"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    if not (isinstance(image_id, str) and type(gen) is int and isinstance(why, str)):
        return None
    return image_id, gen, why[:300]


def _forget(cfg: NodeConfig) -> None:
    """No download and no refusal kept: the assignment they were for is gone or done."""
    (cfg.state_dir / REFUSED).unlink(missing_ok=True)
    folder = cfg.state_dir / DIR
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)


def _drop_others(folder: Path, image_id: str) -> None:
    """Downloads of releases no longer assigned."""
    if folder.is_dir():
        for path in folder.iterdir():
            if not path.name.startswith(f"{image_id}."):
                path.unlink(missing_ok=True)


def step(
    cfg: NodeConfig,
    client: NodeClient,
    project: dict[str, Any],
    pins: dict[str, x509.Certificate],
    node: tuple[str, str],
    now: float | None = None,
) -> HostStep:
    """Act on the host assignment in ``project`` for ``node`` (its project id and name, as
    enrolled; see the module's steps)."""
    now = time.time() if now is None else now
    layout = hostslot.Layout.of(cfg)
    try:
        booted = hostslot.booted_slot(layout.cmdline.read_text())
    except OSError:
        booted = None
    try:
        a = hostassign.verify(project.get(hostassign.ATTR), pins, *node)
    except EdgepinError as e:
        LOG.error("host: the host assignment is refused: %s", e.message)
        return HostStep(refused=e.message)
    if a is None or a.host_version == cfg.host_version:
        _forget(cfg)
        return HostStep()
    if a.host_version < cfg.host_version:
        _forget(cfg)
        why = (
            f"host release {a.image_id} is version {a.host_version}, older than this host "
            f"({cfg.host_version}): refused"
        )
        LOG.error("host: %s", why)
        return HostStep(refused=why)
    if booted is None:
        why = "this host has no root slots: it cannot install a host release"
        LOG.error("host: %s", why)
        return HostStep(refused=why)
    slots = hostslot.read_slots(layout)
    if slots.trial:
        return HostStep()  # the settle of this run commits it or leaves it
    record = hostslot.pending(cfg)
    if record is not None and record.host_version == a.host_version:
        if slots.armed:
            due = a.restart.due(now)
            return HostStep(next_version=a.host_version, restart=due)
        if record.fell_back and record.generation >= a.generation:
            return HostStep()  # reported as host_fallback; a new assignment tries again
    known = refused(cfg)
    if known is not None and known[:2] == (a.image_id, a.generation):
        return HostStep(refused=known[2])
    folder = cfg.state_dir / DIR
    _drop_others(folder, a.image_id)
    try:
        image = client.image(a.image_id)
        check_release(image, a)
        cert = release_certificate(cfg, image)
        # before 200 MB are fetched for nothing
        approvals = release_approvals(cfg, image, policy.host_floor(cfg))
        path = _fetch(client, image, cert, folder)
        try:
            LOG.info("host: writing host release %s into the other root slot", a.image_id)
            _save_approvals(cfg, approvals)
            update, slots = hostslot.install(
                cfg,
                path,
                lambda msg: LOG.info("host: %s", msg),
                expect_version=a.host_version,
                generation=a.generation,
            )
        finally:
            path.unlink(missing_ok=True)
    except (ServiceUnavailableError, AuthError) as e:
        LOG.warning("host: host release %s not fetched now: %s", a.image_id, e.message)
        return HostStep()
    except (ImageError, VerificationError, NotFoundError, StateError) as e:
        why = f"host release {a.image_id} refused: {e.message}"
        LOG.error("host: %s", why)
        if not isinstance(e, StateError) or isinstance(e, HostSlotError):
            state.write_json(
                cfg.state_dir / REFUSED,
                {"image_id": a.image_id, "generation": a.generation, "why": why[:300]},
            )
        return HostStep(refused=why)
    (cfg.state_dir / REFUSED).unlink(missing_ok=True)
    due = a.restart.due(now)
    LOG.info(
        "host: host release %s version %d written into root slot %s: the next boot tries "
        "it once (restart: %s%s)",
        update.name,
        update.host_version,
        slots.next,
        a.restart,
        ", due now" if due and str(a.restart) != "now" else "",
    )
    return HostStep(next_version=a.host_version, restart=due)


def release_certificate(cfg: NodeConfig, image: dict[str, Any]) -> x509.Certificate:
    """The pinned image-signing certificate the release names by its fingerprint (``host
    publish`` records it): a node has no read access to the certificate's secret in
    Barbican for a host release, and needs none."""
    claimed = str(image.get("edgepin_signing_cert_sha256") or "")
    cert = fetch.load_pinned(cfg.pinned_certs_dir).get(claimed)
    if cert is None:
        raise VerificationError(
            "the host release is signed by a certificate that is not pinned "
            f"(sha256 {claimed[:16]}…): refused"
        )
    return cert


def _fetch(client: NodeClient, image: dict[str, Any], cert: x509.Certificate, folder: Path) -> Path:
    """The release's bytes, verified (sha512, the signature by ``cert``, a whole host
    update), as ``<id>.update`` in ``folder``."""
    # a copy kept by a run cut after its fetch is read again from a disk: fetched again
    (folder / f"{image['id']}{SUFFIX}").unlink(missing_ok=True)
    result = fetch.fetch(client, image, cert, folder, suffix=SUFFIX, check_file=hostupdate.read)
    LOG.info("host: host release %s verified (%d bytes fetched)", image["id"], result.bytes_fetched)
    return result.path
