"""``edgepin enroll``: create a node's identity and its TPM-wrapped bootstrap credential.

The factory station has no TPM: the bootstrap application credential's secret is
wrapped offline for the node's endorsement key (a TPM2 duplication blob) under the PCR
policy given, so that only that machine, in that measured state, can unseal it.
Enrolling a node again rotates the bootstrap credential and deletes the old one.

With ``offline``, the credential in the seed is the node's own: the restricted
application credential ``edgepin-node`` with the access rules the node would give it
itself (``provisioner.node.credentials.access_rules``), without expiry, wrapped the same
way. The node then enrolls without reaching Keystone. Its secret exists only in this
process's memory; enrolling again deletes every earlier credential of the node's user.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keystoneauth1 import session as ksa_session
from keystoneauth1.identity import v3

from provisioner import seed, tpm
from provisioner.cloud import translate
from provisioner.errors import AuthError, TrustError, UsageError
from provisioner.node.config import SETTINGS
from provisioner.node.credentials import access_rules
from provisioner.operator import nodes, reports, tpmrecord, urls

DEFAULT_WINDOW_DAYS = 14


@dataclass
class EnrollRequest:
    node_id: str
    seed_out: Path
    ek_pub: Path | None = None
    ek_cert: Path | None = None
    ek_ca: Path | None = None
    pcrs: tuple[int, ...] = ()
    pcr_values: Path | None = None  # JSON {"7": "hex"}; the literal "zero" means reset values
    pcr_values_zero: bool = False
    window_days: int = DEFAULT_WINDOW_DAYS
    # the node's own restricted credential in the seed instead of a bootstrap credential:
    # the node enrolls without reaching Keystone
    offline: bool = False
    edge_domain: str = "edge"
    ca_bundle: Path | None = None  # the control plane's CA that the node pins
    interface: str = "public"  # the catalog interface the node uses


@dataclass
class Enrolled:
    node_id: str
    project_id: str
    user_id: str
    credential_id: str  # the bootstrap credential, or the node's own (offline)
    expires_at: str | None  # None: the offline node credential does not expire
    rotated: list[str]
    seed: Path
    offline: bool = False


def parse_pcrs(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        pcrs = tuple(sorted({int(p) for p in text.split(",")}))
    except ValueError:
        raise UsageError(f"--pcrs {text!r}: give PCR numbers like 0,7") from None
    if any(p < 0 or p > 23 for p in pcrs):
        raise UsageError("--pcrs: PCR numbers are 0..23")
    return pcrs


def load_pcr_values(req: EnrollRequest) -> dict[int, bytes]:
    return expected_pcr_values(req.pcrs, req.pcr_values, req.pcr_values_zero)


def expected_pcr_values(pcrs: tuple[int, ...], path: Path | None, zero: bool) -> dict[int, bytes]:
    """The expected sha256 values of ``pcrs``: all zero, or from a JSON file."""
    if not pcrs:
        raise UsageError(
            "--pcrs is required: the bootstrap credential is always bound to PCRs",
            hint="use the host image's EDGEPIN_PCRS (`./build.sh image --pcrs`, default "
            f"{SETTINGS['EDGEPIN_PCRS'][0]})",
        )
    if zero:
        return {p: bytes(32) for p in pcrs}
    if path is None:
        raise UsageError(
            "--pcrs needs --pcr-values FILE (the node's expected sha256 PCR values)",
            hint="boot a reference node of the same model and host image with any seed: "
            "when its bootstrap is bound to other values, its console prints the JSON "
            "to give here; --pcr-values zero is for a TPM that has measured nothing",
        )
    try:
        raw = json.loads(path.read_text())
        values = {int(k): bytes.fromhex(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"--pcr-values {path}: {e}") from None
    missing = [p for p in pcrs if p not in values]
    if missing or any(len(values[p]) != 32 for p in pcrs):
        raise UsageError(f"--pcr-values must give a 32-byte sha256 value for PCRs {pcrs}")
    return {p: values[p] for p in pcrs}


def ek_public(req: EnrollRequest) -> tuple[bytes, str]:
    """The EK public key (PEM) and a description of where it came from."""
    return read_ek(req.ek_pub, req.ek_cert, req.ek_ca)


def read_ek(ek_pub: Path | None, ek_cert: Path | None, ek_ca: Path | None) -> tuple[bytes, str]:
    """The EK public key (PEM) from exactly one of an EK certificate (its chain checked
    against ``ek_ca`` when given) or a PEM public key, and where it came from."""
    if bool(ek_pub) == bool(ek_cert):
        raise UsageError("give exactly one of --ek-pub and --ek-cert")
    if ek_cert:
        cert = _read(ek_cert, "--ek-cert")
        if ek_ca:
            try:
                tpm.verify_ek_cert_chain(cert, _read(ek_ca, "--ek-ca"))
            except tpm.TpmError as e:
                raise TrustError(f"EK certificate refused: {e}") from None
        try:
            return tpm.ek_public_pem_from_cert(cert), f"certificate {ek_cert}"
        except tpm.TpmError as e:
            raise TrustError(f"--ek-cert: {e}") from None
    assert ek_pub is not None
    pem = _read(ek_pub, "--ek-pub")
    if b"PUBLIC KEY" not in pem:
        raise UsageError(f"--ek-pub {ek_pub}: not a PEM public key")
    return pem, f"public key {ek_pub}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None


def enroll(conn: Any, req: EnrollRequest, auth_url: str, region: str | None) -> Enrolled:
    nodes.check_node_id(req.node_id)
    if req.window_days < 1:
        raise UsageError("--expires-in must be at least 1 day")
    urls.require_https(
        auth_url,
        "the node's Keystone URL",
        hint="give --node-auth-url https://... or register Keystone's endpoints with TLS",
    )
    ek_pem, _ = ek_public(req)
    pcr_values = load_pcr_values(req)
    target = tpmrecord.TpmTarget(tpmrecord.canonical_ek(ek_pem), pcr_values)
    ca_pem = _read(req.ca_bundle, "--ca").decode() if req.ca_bundle else None
    # the node finds Glance and Barbican (and Keystone, once enrolled) in the catalog
    urls.check_catalog(conn, req.interface, region, f"node {req.node_id}")
    domain_id = nodes.edge_domain_id(conn, req.edge_domain)

    node = nodes.find_node(conn, domain_id, req.node_id)
    with translate("keystone", f"node {req.node_id}"):
        member = conn.identity.find_role("member", ignore_missing=False)
        if node is None:
            project = conn.identity.create_project(
                name=req.node_id,
                domain_id=domain_id,
                description=f"edgepin node {req.node_id}",
                tags=[nodes.NODE_TAG],
            )
            node = nodes.Node(req.node_id, {"id": project.id}, None)
        if node.user is None:
            user = conn.identity.create_user(
                name=req.node_id,
                domain_id=domain_id,
                default_project_id=node.project_id,
                password=secrets.token_urlsafe(32),
                description=f"edgepin node {req.node_id}",
            )
            node.user = {"id": user.id}
        else:
            conn.identity.update_user(node.user_id, is_enabled=True)
        conn.identity.assign_project_role_to_user(node.project_id, node.user_id, member.id)
    # where the node writes its report; its credential may change that record only
    report_id = reports.ensure_report_image(conn, node)
    if req.offline:
        # the node's final credential is made here: its name is unique per user, so every
        # earlier credential of the node's user (bootstrap or node credential) goes first
        rotated = []
        for old in nodes.app_credentials(conn, node.user_id):
            nodes.delete_app_credential(conn, node.user_id, old["id"])
            rotated.append(old["id"])
        expires_at = None  # a node with no network could not renew it
    else:
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=req.window_days)
        expires_at = expires.strftime("%Y-%m-%dT%H:%M:%S")
    spec = credential_spec(req.node_id, node.project_id, report_id, expires_at)
    cred, revoked_at = _create_as_node_user(conn, node, spec)
    if not req.offline:
        # rotation: every older bootstrap credential goes
        rotated = []
        for old in nodes.app_credentials(conn, node.user_id):
            if old["name"].startswith(nodes.BOOTSTRAP_PREFIX) and old["id"] != cred["id"]:
                nodes.delete_app_credential(conn, node.user_id, old["id"])
                rotated.append(old["id"])

    try:
        wrapped = tpm.wrap_for_ek(ek_pem, cred.pop("secret").encode(), pcr_values)
    except tpm.TpmError as e:
        nodes.delete_app_credential(conn, node.user_id, cred["id"])
        raise TrustError(f"cannot wrap the credential for this EK: {e}") from None

    kind = seed.Credential.NODE if req.offline else seed.Credential.BOOTSTRAP
    record: dict[str, Any] = {
        "application_credential_id": cred["id"],
        "wrapped": base64.b64encode(wrapped).decode(),
    }
    if expires_at is not None:
        record["expires_at"] = expires_at
    bundle: dict[str, Any] = {
        "version": seed.BUNDLE_VERSION,
        "node_id": req.node_id,
        "project_id": node.project_id,
        "user_id": node.user_id,
        "user_domain_id": domain_id,
        "auth_url": auth_url,
        "region": region,
        "interface": req.interface,
        "ca_pem": ca_pem,
        "pcrs": list(req.pcrs),
        "pcr_bank": "sha256",
        kind.value: record,
    }
    try:
        seed.write_seed(req.seed_out, req.node_id, bundle)
    except Exception:
        nodes.delete_app_credential(conn, node.user_id, cred["id"])
        raise
    nodes.update_project(
        conn,
        node.project_id,
        {
            # an offline enrollment has no bootstrap credential: nothing expires
            "edgepin_bootstrap_expires_at": expires_at or "",
            "edgepin_enrolled_for": _ek_fingerprint(ek_pem),
            # what a key is wrapped for later (air-gapped bundles): public, not secret
            tpmrecord.TPM_ATTR: target.as_record(),
        },
    )
    # that second password change revoked the user's tokens with one-second precision too:
    # a token the node issues with the new credential within that second would be
    # refused, so the command returns only once it has passed (a node enrolling at once, as
    # in a test or at a factory station, is not refused)
    time.sleep(max(0.0, 1.1 - (time.monotonic() - revoked_at)))
    return Enrolled(
        req.node_id,
        node.project_id,
        node.user_id,
        cred["id"],
        expires_at,
        rotated,
        req.seed_out,
        req.offline,
    )


def credential_spec(
    node_id: str, project_id: str, report_id: str | None, expires_at: str | None
) -> dict[str, Any]:
    """The application credential enroll creates for the node's user (pure): a bootstrap
    credential expiring at ``expires_at`` (unrestricted: it must create the node's own), or,
    with no expiry (offline enrollment), the node's own credential ``edgepin-node`` with
    the access rules the node gives it when it enrolls online, and no more power: a
    restricted credential cannot create or delete application credentials."""
    if expires_at is None:
        return {
            "name": nodes.NODE_CREDENTIAL_NAME,
            "description": f"edgepin node {node_id}, enrolled offline, sealed to its TPM",
            "roles": [{"name": "member"}],
            "access_rules": access_rules(project_id, report_id),
        }
    return {
        "name": f"{nodes.BOOTSTRAP_PREFIX}-{secrets.token_hex(4)}",
        "description": "edgepin bootstrap: single use, deleted by the node after enrollment",
        "expires_at": expires_at,
        "unrestricted": True,  # it must create the node's own credential
        "roles": [{"name": "member"}],
    }


def _create_as_node_user(conn: Any, node: nodes.Node, spec: dict[str, Any]) -> tuple[Any, float]:
    """Create the application credential ``spec`` as the node's user; the credential (its
    secret included, only in memory) and when the one-time password was replaced.

    An application credential is created by its user: set a one-time password that lives
    only in this process, use it once, then replace it by another one nobody knows."""
    password = secrets.token_urlsafe(32)
    with translate("keystone", "set the node user's one-time password"):
        conn.identity.update_user(node.user_id, password=password)
    # Keystone revokes the user's tokens on a password change with one-second precision:
    # a token issued within the same second would be born revoked.
    time.sleep(1.1)
    identity_url = conn.session.get_endpoint(service_type="identity", interface="public")
    # the node user's one-time password goes there
    identity_url = urls.require_https(identity_url, "the catalog's public identity endpoint")
    identity_url = identity_url.rstrip("/")
    if not identity_url.endswith("/v3"):
        identity_url += "/v3"
    user_session = ksa_session.Session(
        auth=v3.Password(
            auth_url=identity_url,
            user_id=node.user_id,
            password=password,
            project_id=node.project_id,
        ),
        verify=conn.session.verify,
    )
    with translate("keystone", f"create the credential {spec['name']}"):
        try:
            # log=False: the answer holds the credential's secret
            r = user_session.post(
                f"{identity_url}/users/{node.user_id}/application_credentials",
                json={"application_credential": spec},
                log=False,
            )
            cred = r.json()["application_credential"]
        finally:
            conn.identity.update_user(node.user_id, password=secrets.token_urlsafe(32))
            revoked_at = time.monotonic()
            del password
    if not isinstance(cred, dict) or not cred.get("secret"):
        raise AuthError("keystone returned no application credential secret")
    return cred, revoked_at


def ek_fingerprint(pem: bytes) -> str:
    """``edgepin_enrolled_for``: the EK as enroll was given it (its PEM text, hashed)."""
    return _ek_fingerprint(pem)


def _ek_fingerprint(pem: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(pem.strip()).hexdigest()[:32]
