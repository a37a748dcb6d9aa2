"""What the node seals its secrets to: PCR values, or those and the release key's approvals.

A host image built with a release key (``./build.sh image --release-key PEM``) pins its
public half at ``/etc/edgepin/release-key.pem`` on the verified root. Such a node seals its
credential, its image keys, its vault key and its anchor to a ``tpm.SignedPolicy``: they
open in the measured state they were sealed in (as on an image without a release key) and
in any state the release key approved, so that a new boot chain (a host update) that comes
with an approval of its PCR values opens them as the old one did, and nothing else does.
An image without the file seals to PCR values alone.

Approvals are public and signed: each one is a file ``*.json`` (``edgepin release
approve``) in ``/var/lib/edgepin-host/approvals`` on the state partition, outside the vault
(they must be readable before it opens), read as untrusted input. Whoever can write there
can delete approvals (the node then opens its secrets only in the state it sealed them in),
not make one. Beside them, ``/var/lib/edgepin-host/sealed-states.json`` lists the
branches (``tpm.release_policy_digest``) the node defined its vault key and anchor under:
the TPM shows an index's policy, not the state it was made in. Changing that file can only
keep the node from opening its indices.

Every branch, sealed-in or approved, also holds the host release's epoch against the TPM's
host floor (``tpm.FLOOR_NV_INDEX``): at its first boot the node defines the floor at 0
(``prepare``); enrollment gives the TPM's owner hierarchy a secret of its own, sealed like
the other secrets (``seal_owner``), so that nobody else can undefine the floor or reset
it; once a release is kept, the reconcile raises the floor to its epoch (``raise_floor``).
From then on no release of a lower epoch opens anything, whichever slot the disk names.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

from provisioner import tpm
from provisioner.errors import TrustError
from provisioner.node import state
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)

MAX_APPROVALS = 64  # files read; more is a mistake or an attack, not a fleet
MAX_STATES = 16  # PCR branches recorded: one per host release the node defined an index in


def release_key(cfg: NodeConfig) -> bytes | None:
    """The pinned release key (PEM), or None for an image built without one."""
    try:
        pem = cfg.release_key_path.read_bytes()
    except FileNotFoundError:
        return None
    tpm.release_key_name(pem)  # TpmBlobError for anything but an ECDSA P-256 public key
    return pem


def approvals(cfg: NodeConfig) -> tuple[tpm.Approval, ...]:
    """Every well-formed approval in the node's approval folder (their signatures are
    checked where they are used); a malformed file is logged and skipped."""
    found: list[tpm.Approval] = []
    try:
        names = sorted(p for p in cfg.approvals_dir.iterdir() if p.suffix == ".json")
    except (FileNotFoundError, NotADirectoryError):
        return ()
    for path in names[:MAX_APPROVALS]:
        try:
            with path.open("rb") as f:
                found.append(tpm.parse_approval(f.read(tpm.APPROVAL_MAX_BYTES + 1)))
        except (OSError, tpm.TpmBlobError) as e:
            LOG.warning("policy: %s is not a PCR approval, skipped: %s", path, e)
    return tuple(found)


def sealed_states(cfg: NodeConfig) -> tuple[bytes, ...]:
    """The PCR branches the node recorded (``remember``); an unreadable file gives none."""
    try:
        with cfg.sealed_states_path.open("rb") as f:
            doc = json.loads(f.read(MAX_STATES * 80 + 100))
        if isinstance(doc, list):
            return tuple(
                bytes.fromhex(x) for x in doc[:MAX_STATES] if isinstance(x, str) and len(x) == 64
            )
    except (OSError, ValueError, RecursionError) as e:
        LOG.warning("policy: %s is unreadable, ignored: %s", cfg.sealed_states_path, e)
    return ()


def remember(cfg: NodeConfig) -> None:
    """Record the PCR branch of the state the node is in now, once it has defined an NV
    index in it (the vault key, the anchor) under its signed policy."""
    if release_key(cfg) is None:
        return
    with tpm.Tpm.open(cfg.tcti) as t:
        now = tpm.release_policy_digest(t.read_pcrs(cfg.pcrs), cfg.host_epoch)
    known = sealed_states(cfg)
    if now in known:
        return
    kept = [*known, now][-MAX_STATES:]
    cfg.sealed_states_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    state.atomic_write(cfg.sealed_states_path, json.dumps([b.hex() for b in kept]).encode(), 0o644)


def node_policy(cfg: NodeConfig) -> tpm.Policy:
    """The node's policy: its PCR selection, or that with its release key's approvals."""
    pem = release_key(cfg)
    if pem is None:
        return cfg.pcrs
    return tpm.SignedPolicy(pem, cfg.pcrs, approvals(cfg), sealed_states(cfg), cfg.host_epoch)


def owner_blob_path(cfg: NodeConfig) -> Path:
    """The owner hierarchy's secret, sealed to the node's policy (in the vault)."""
    return cfg.state_dir / "tpm-owner.json"


def prepare(cfg: NodeConfig) -> None:
    """Before anything is sealed to or opened with the signed policy: at a node's first
    boot (the owner hierarchy's authorization still empty), keep the storage primary
    persistent and define the host floor at 0. Later boots find both; a TPM that lost the
    floor after that (cleared, or another TPM) opens nothing, and this says so."""
    if release_key(cfg) is None:
        return
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            if t.owner_auth_is_set():
                if t.floor_read() is None:
                    raise TrustError(
                        "the TPM holds no edgepin host floor, and its owner hierarchy has a "
                        "secret: it is not the TPM this node set up"
                    )
                return
            t.storage_persist()
            t.floor_define()
    except tpm.TpmError as e:
        raise TrustError(f"the TPM cannot be set up for the host floor: {e}") from None


def seal_owner(cfg: NodeConfig) -> bool:
    """Once enrolled: give the TPM's owner hierarchy a secret of the node's own, sealed
    first (a restart in between finds the sealed copy and finishes). True when it did."""
    if release_key(cfg) is None:
        return False
    path = owner_blob_path(cfg)
    pol = node_policy(cfg)
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            if t.owner_auth_is_set():
                return False
            try:
                secret = t.unseal(path.read_bytes(), pol)
            except FileNotFoundError:
                secret = secrets.token_bytes(tpm.OWNER_AUTH_SIZE)
                state.atomic_write(path, t.seal(secret, pol), 0o600)
            t.owner_auth_set(secret)
    except tpm.TpmError as e:
        raise TrustError(f"the TPM's owner hierarchy cannot be given its secret: {e}") from None
    LOG.info("policy: the TPM's owner hierarchy has the node's secret")
    return True


def host_floor(cfg: NodeConfig) -> int:
    """The TPM's host floor, for refusing a release below it before fetching it; 0 on a
    node without a release key, or when the TPM cannot say (the TPM enforces the floor
    itself when the release boots)."""
    if release_key(cfg) is None:
        return 0
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            return t.floor_read() or 0
    except tpm.TpmError as e:
        LOG.warning("policy: the TPM's host floor cannot be read: %s", e)
        return 0


def raise_floor(cfg: NodeConfig) -> str | None:
    """Raise the TPM's host floor to this release's epoch (called once the release is
    kept): what it did, or None when the floor is there already."""
    if release_key(cfg) is None:
        return None
    pol = node_policy(cfg)
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            floor = t.floor_read()
            if floor is None:
                raise TrustError("the TPM holds no edgepin host floor")
            if floor >= cfg.host_epoch:
                return None
            t.floor_raise(cfg.host_epoch, t.unseal(owner_blob_path(cfg).read_bytes(), pol))
    except (tpm.TpmError, OSError) as e:
        raise TrustError(f"the TPM's host floor cannot be raised: {e}") from None
    said = (
        f"host: the TPM's host floor rose from epoch {floor} to {cfg.host_epoch}: releases "
        f"below it open nothing on this node"
    )
    LOG.info("%s", said)
    return said


def describe(pol: tpm.Policy) -> str:
    """The policy in a log line."""
    if isinstance(pol, tpm.SignedPolicy):
        return f"PCRs {list(pol.pcrs)} or the release key's approvals"
    return f"PCRs {list(pol)}"


def refusal_hint(cfg: NodeConfig, refusal: str) -> str:
    """What to do when the TPM refused the node's policy: for a release below the host
    floor, boot one at or above it; for a state nothing approved, ``approval_hint``."""
    if tpm.FLOOR_REFUSAL not in refusal:
        return approval_hint(cfg)
    return (
        f"this host release (epoch {cfg.host_epoch}) is below the TPM's host floor: a later "
        "release this node kept revoked it; boot the root slot that holds that release"
    )


def approval_hint(cfg: NodeConfig) -> str:
    """What the factory does when the node is in a state it sealed nothing in and that no
    approval names: sign one for the values it measures, if that state is meant (the node
    has no login: its console says them)."""
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            values = {str(p): v.hex() for p, v in sorted(t.read_pcrs(cfg.pcrs).items())}
    except Exception:  # a hint, not a check
        return "if this boot chain is meant, approve its PCR values with the release key"
    return (
        "if this boot chain is meant, approve its PCR values with the release key "
        "(`edgepin release approve --key KEY --pcr-values FILE`) and put the approval in "
        f"the node's /var/lib/edgepin-host/approvals/; FILE holding: "
        f"{json.dumps(values, sort_keys=True)}"
    )
