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
not make one. Beside them, ``/var/lib/edgepin-host/sealed-states.json`` lists the PCR
branches (PolicyPCR digests) the node defined its vault key and anchor under: the TPM shows
an index's policy, not the state it was made in. Changing that file can only keep the node
from opening its indices.
"""

from __future__ import annotations

import json
import logging

from provisioner import tpm
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
        now = tpm.pcr_policy_digest(t.read_pcrs(cfg.pcrs))
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
    return tpm.SignedPolicy(pem, cfg.pcrs, approvals(cfg), sealed_states(cfg))


def describe(pol: tpm.Policy) -> str:
    """The policy in a log line."""
    if isinstance(pol, tpm.SignedPolicy):
        return f"PCRs {list(pol.pcrs)} or the release key's approvals"
    return f"PCRs {list(pol)}"


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
