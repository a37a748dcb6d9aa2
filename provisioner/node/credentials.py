"""The node's identity: first-boot enrollment and the TPM-sealed long-term credential.

Enrollment (idempotent, resumable; the bootstrap credential stays valid until the node
credential is proven to work, so a failure half-way never leaves the node without a
usable credential):

1. read the seed bundle (its PCR selection must be the node's own); unseal the bootstrap
   secret (imported under the EK);
2. generate the node secret, seal it locally (fixedTPM, PCR policy) and save the blob
   as ``node-credential.pending``;
3. create the application credential ``edgepin-node`` with that secret and access rules
   that allow only what a node needs; save ``node-credential.json``;
4. authenticate with it; delete the bootstrap credential; define the TPM anchor and write
   the ledger (``provisioner.node.ledger``): from then on the node's identity (Keystone
   URL, project, user, the CA's and the sealed credential's digests) comes from the
   anchored ledger, never again from the seed.

Offline enrollment (a seed from ``edgepin enroll --offline``): the seed wraps the node's own
credential, made at the factory with the same access rules. Steps 2 and 3 become: unwrap
it and seal it locally (``node-credential.json``); step 4 defines the anchor and writes the
ledger without asking Keystone anything, then removes the seed's copy of the bundle.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keystoneauth1 import exceptions as ksa_exc
from keystoneauth1 import session as ksa_session
from keystoneauth1.identity import v3

from provisioner import seed, tpm, transport
from provisioner.cloud import translate
from provisioner.errors import AuthError, ConfigError, ServiceUnavailableError, TrustError
from provisioner.node import ledger, policy, state, token
from provisioner.node.config import NodeConfig
from provisioner.node.model import Enrollment, Ledger, report_image_of

LOG = logging.getLogger(__name__)
NODE_CREDENTIAL_NAME = "edgepin-node"


@dataclass
class Identity:
    """What the node knows about itself (no secret in here)."""

    node_id: str
    project_id: str
    user_id: str
    auth_url: str
    region: str | None
    interface: str
    ca_file: Path


def access_rules(project_id: str, report_image_id: str | None = None) -> list[dict[str, str]]:
    """The least a node needs, and nothing else: with a report image, changing that one
    image record (the node's report, provisioner/nodereport.py)."""
    report = (
        [{"service": "image", "method": "PATCH", "path": f"/v2/images/{report_image_id}"}]
        if report_image_id
        else []
    )
    return [
        {"service": "identity", "method": "GET", "path": f"/v3/projects/{project_id}"},
        {"service": "image", "method": "GET", "path": "/v2/images"},
        {"service": "image", "method": "GET", "path": "/v2/images/*"},
        {"service": "image", "method": "GET", "path": "/v2/images/*/file"},
        {"service": "image", "method": "PUT", "path": f"/v2/images/*/members/{project_id}"},
        {"service": "key-manager", "method": "GET", "path": "/v1/"},
        {"service": "key-manager", "method": "GET", "path": "/v1/secrets/*"},
        {"service": "key-manager", "method": "GET", "path": "/v1/secrets/*/payload"},
        *report,
    ]


def report_image(sess: Any, ident: Identity) -> str | None:
    """The report image ``edgepin enroll`` made for the node, as its project names it (read
    with the bootstrap credential, which may read the project); None for a project made by
    an edgepin without reports."""
    with translate("keystone", "the node's project"):
        r = sess.get(f"{ident.auth_url}/projects/{ident.project_id}")
    try:
        project = r.json()["project"]
    except (ValueError, KeyError, TypeError):
        raise ServiceUnavailableError("keystone sent a malformed project record") from None
    return report_image_of(project)


def load_bundle(cfg: NodeConfig) -> dict[str, Any]:
    try:
        data = cfg.bundle_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"no seed bundle at {cfg.bundle_path}",
            hint="attach the NoCloud seed written by `edgepin enroll` and boot again",
        ) from None
    return seed.parse_bundle(data)


def factory_lines(cfg: NodeConfig) -> list[str]:
    """What the factory reads off the console of a node that has no seed and is not
    enrolled (there is no login; an enrolled node gives nothing): its EK certificate from
    the TPM's NV (DER, base64; absent when the TPM keeps none), its EK public key (PEM,
    base64) and its PCR values (the JSON ``edgepin enroll --pcr-values FILE`` takes). None
    of it is secret. Never raises: a TPM that cannot be read gives one line that says so."""
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            if t.anchor_defined():
                return []  # enrolled: nothing for the factory
            cert = t.ek_certificate()
            public = t.ek_public_pem()
            pcrs = {str(p): v.hex() for p, v in sorted(t.read_pcrs(cfg.pcrs).items())}
    except Exception as e:  # the seed unit reports it and goes on
        return [f"factory: the TPM could not be read: {str(e)[:200]}"]
    lines = []
    if cert is not None:
        lines.append(f"factory: ek-cert {base64.b64encode(cert).decode()}")
    lines.append(f"factory: ek-pub {base64.b64encode(public).decode()}")
    lines.append(f"factory: pcrs {json.dumps(pcrs, sort_keys=True, separators=(',', ':'))}")
    return lines


def take_seed(cfg: NodeConfig) -> str:
    """Copy the bundle of the NoCloud seed that cloud-init read (its instance data) to
    ``cfg.bundle_path``, on a node that is not enrolled; what was done, in a sentence.
    Nothing is taken once the TPM holds an anchor: an enrolled node reads no seed."""
    source = cfg.root / seed.INSTANCE_DATA.lstrip("/")
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        return f"no seed: cloud-init found none ({source} is absent)"
    with tpm.Tpm.open(cfg.tcti) as t:
        if t.anchor_defined():
            return "the node is enrolled: no seed is read"
    bundle = seed.bundle_from_instance_data(data)
    if bundle is None:
        return f"no seed: cloud-init's seed holds no {seed.META_KEY}"
    content = (json.dumps(bundle, indent=2, sort_keys=True) + "\n").encode()
    try:
        if cfg.bundle_path.read_bytes() == content:
            return f"seed bundle for node {bundle['node_id']} already in place"
    except FileNotFoundError:
        pass
    cfg.bundle_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.atomic_write(cfg.bundle_path, content, 0o600)
    return f"seed bundle for node {bundle['node_id']} written to {cfg.bundle_path}"


def identity(cfg: NodeConfig, bundle: dict[str, Any]) -> Identity:
    ca_file = cfg.ca_path
    if not ca_file.exists():
        # no CA baked into the image: use the one the factory put in the seed
        if not bundle.get("ca_pem"):
            raise ConfigError(f"no control-plane CA: neither {cfg.ca_path} nor in the seed")
        ca_file = cfg.state_dir / "seed" / "ca.pem"
        if not ca_file.exists() or ca_file.read_text() != bundle["ca_pem"]:
            state.atomic_write(ca_file, bundle["ca_pem"].encode(), 0o644)
    return Identity(
        node_id=bundle["node_id"],
        project_id=bundle["project_id"],
        user_id=bundle["user_id"],
        auth_url=bundle["auth_url"],
        region=bundle.get("region"),
        interface=bundle.get("interface", "public"),
        ca_file=ca_file,
    )


def make_session(ident: Identity, cred_id: str, secret: str, timeout: float) -> Any:
    auth = v3.ApplicationCredential(
        auth_url=ident.auth_url,
        application_credential_id=cred_id,
        application_credential_secret=secret,
    )
    sess = ksa_session.Session(auth=auth, verify=str(ident.ca_file), timeout=timeout)
    transport.install(sess.session)
    return sess


def _unseal(
    cfg: NodeConfig,
    blob: bytes,
    what: str,
    kinds: tuple[tpm.BlobKind, ...] = (tpm.BlobKind.SEALED,),
) -> bytes:
    try:
        pol = policy.node_policy(cfg)
        with tpm.Tpm.open(cfg.tcti) as t:
            return t.unseal(blob, pol, kinds)
    except tpm.TpmPolicyError as e:
        signed = isinstance(pol, tpm.SignedPolicy) and tpm.BlobKind.DUPLICATE not in kinds
        raise TrustError(
            f"TPM refused to unseal the {what}: the measured boot state differs from "
            f"enrollment ({e})",
            hint=policy.refusal_hint(cfg, str(e))
            if signed
            else "the host OS or its boot chain changed; re-enroll the node if intended",
            policy=True,
        ) from None
    except tpm.TpmUnavailableError as e:
        raise TrustError(f"no TPM: {e}", hint=f"check {cfg.tcti}") from None
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot unseal the {what}: {e}") from None


def _seal(cfg: NodeConfig, secret: bytes) -> bytes:
    try:
        pol = policy.node_policy(cfg)
        with tpm.Tpm.open(cfg.tcti) as t:
            return t.seal(secret, pol)
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot seal: {e}") from None


def _token(sess: Any, what: str) -> None:
    try:
        sess.get_token()
    except ksa_exc.Unauthorized:
        raise AuthError(f"keystone refused the {what}") from None
    except (ksa_exc.ConnectFailure, ksa_exc.SSLError) as e:
        with translate("keystone"):
            raise e


def _pending(cfg: NodeConfig) -> Path:
    return cfg.state_dir / "node-credential.pending"


def _final(cfg: NodeConfig) -> Path:
    return cfg.state_dir / "node-credential.json"


def _enrollment(cfg: NodeConfig) -> Path:
    return cfg.state_dir / "enrollment.json"


def enrolled(cfg: NodeConfig) -> bool:
    record = state.read_json(_enrollment(cfg))
    return bool(record and record.get("phase") == "done")


def enroll(cfg: NodeConfig) -> dict[str, Any]:
    """First-boot enrollment; a no-op when done, resumable when interrupted."""
    anchor = ledger.TpmAnchor(cfg.tcti, policy.node_policy(cfg))
    if anchor.read() is not None:
        # enrolled on this TPM: the anchored ledger, not a file on the disk, says so
        done = ledger.load(cfg.state_dir, anchor).enrollment
        record = {"phase": "done", **done.as_dict()}
        if state.read_json(_enrollment(cfg)) != record:
            state.write_json(_enrollment(cfg), record)
        policy.seal_owner(cfg)  # when a restart cut enrollment short before it
        LOG.info("enrollment: already done (%s), nothing to do", done.enrolled_at)
        return record
    policy.prepare(cfg)
    bundle = load_bundle(cfg)
    pcrs = sorted(int(p) for p in bundle["pcrs"])
    if pcrs != sorted(cfg.pcrs):
        raise ConfigError(
            f"the seed was made for PCRs {pcrs}; this node seals to {sorted(cfg.pcrs)}",
            hint="enroll again with --pcrs matching the host image's EDGEPIN_PCRS",
        )
    ident = identity(cfg, bundle)
    kind, cred = seed.credential(bundle)
    if kind is seed.Credential.NODE:
        final = _take_node_credential(cfg, cred)
    else:
        final = _create_node_credential(cfg, ident, cred)
    done = ledger.enrollment(
        {
            "node_id": ident.node_id,
            "project_id": ident.project_id,
            "user_id": ident.user_id,
            "auth_url": ident.auth_url,
            "region": ident.region,
            "interface": ident.interface,
            "ca_sha256": _sha256_file(ident.ca_file),
            "credential_id": final["id"],
            "credential_sha256": hashlib.sha256(base64.b64decode(final["sealed"])).hexdigest(),
            "pcrs": sorted(cfg.pcrs),
            "enrolled_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    anchor.define()
    policy.remember(cfg)
    ledger.save(cfg.state_dir, anchor, Ledger(enrollment=done))
    record = {"phase": "done", **done.as_dict()}
    state.write_json(_enrollment(cfg), record)
    policy.seal_owner(cfg)
    if kind is seed.Credential.NODE:
        # the seed's copy wraps the live credential: the sealed one is all the node keeps
        cfg.bundle_path.unlink(missing_ok=True)
    LOG.info("enrollment passed")
    return record


def _unwrap(cfg: NodeConfig, wrapped_b64: str, what: str) -> str:
    """The secret of a seed's credential, imported under the EK and unsealed under the PCR
    policy; on other PCR values, TrustError with the values this node measures."""
    try:
        return _unseal(
            cfg, base64.b64decode(wrapped_b64), what, kinds=(tpm.BlobKind.DUPLICATE,)
        ).decode()
    except TrustError as e:
        if not e.fields.get("policy"):
            raise
        # the factory's way to learn them without a login: PCR values are
        # measurements, not secrets
        raise TrustError(
            f"the seed's {what} is bound to other PCR values than this node measures",
            hint=pcr_values_hint(cfg.pcrs, _pcr_values(cfg)),
        ) from None


def _take_node_credential(cfg: NodeConfig, cred: dict[str, Any]) -> dict[str, Any]:
    """Offline enrollment: the seed wraps the node's own credential, made at the factory.
    Unwrap it and seal it under the node's own storage key as the online path seals the
    secret it makes; Keystone is not asked anything (idempotent)."""
    cred_id = str(cred["application_credential_id"])
    final = state.read_json(_final(cfg))
    if final is not None and final.get("id") == cred_id:
        return final
    node_secret = _unwrap(cfg, cred["wrapped"], "node credential")
    sealed = _seal(cfg, node_secret.encode())
    del node_secret
    final = {"id": cred_id, "sealed": base64.b64encode(sealed).decode(), "pcrs": list(cfg.pcrs)}
    state.write_json(_final(cfg), final)
    LOG.info(
        "enrollment: node credential %s from the seed sealed to PCRs %s (offline)",
        cred_id,
        cfg.pcrs,
    )
    return final


def _create_node_credential(
    cfg: NodeConfig, ident: Identity, boot: dict[str, Any]
) -> dict[str, Any]:
    """Online enrollment: create the node's credential with the bootstrap credential,
    then delete every other credential of the node's user, the bootstrap last."""
    final = state.read_json(_final(cfg))

    boot_session: Any = None

    def bootstrap_session() -> Any:
        nonlocal boot_session
        if boot_session is None:
            boot_secret = _unwrap(cfg, boot["wrapped"], "bootstrap credential")
            boot_session = make_session(
                ident, boot["application_credential_id"], boot_secret, cfg.http_timeout
            )
            del boot_secret
            try:
                _token(boot_session, "bootstrap credential")
            except AuthError:
                raise AuthError(
                    "keystone refused the bootstrap credential (expired, rotated or used)",
                    hint="enroll the node again (`edgepin enroll`) and give it the new seed",
                ) from None
        return boot_session

    if final is None:
        pending = state.read_json(_pending(cfg))
        if pending is None:
            node_secret = secrets.token_urlsafe(48)
            sealed = _seal(cfg, node_secret.encode())
            pending = {"sealed": base64.b64encode(sealed).decode(), "pcrs": list(cfg.pcrs)}
            state.write_json(_pending(cfg), pending)
        else:
            LOG.info("enrollment: resuming with the sealed secret from an earlier attempt")
            node_secret = _unseal(
                cfg, base64.b64decode(pending["sealed"]), "pending node credential"
            ).decode()
        sess = bootstrap_session()
        report_id = report_image(sess, ident)
        with translate("keystone", "create the node credential"):
            # every other credential of the node's user goes first: one left by an attempt
            # that died before saving its id, or one minted by whoever held the bootstrap
            _delete_all_but(sess, ident, {boot["application_credential_id"]})
            r = sess.post(
                f"{ident.auth_url}/users/{ident.user_id}/application_credentials",
                json={
                    "application_credential": {
                        "name": NODE_CREDENTIAL_NAME,
                        "description": f"edgepin node {ident.node_id}, sealed to its TPM",
                        "secret": node_secret,
                        "roles": [{"name": "member"}],
                        "access_rules": access_rules(ident.project_id, report_id),
                    }
                },
            )
        cred_id = r.json()["application_credential"]["id"]
        final = {"id": cred_id, "sealed": pending["sealed"], "pcrs": pending["pcrs"]}
        state.write_json(_final(cfg), final)
        _pending(cfg).unlink(missing_ok=True)
        # prove that it works before giving anything up
        _token(make_session(ident, cred_id, node_secret, cfg.http_timeout), "new node credential")
        del node_secret
        LOG.info(
            "enrollment: node credential %s created and sealed to %s",
            cred_id,
            policy.describe(policy.node_policy(cfg)),
        )

    # the node credential is the only one left: others are deleted (checked, not assumed),
    # the bootstrap last (unless a previous attempt already did)
    try:
        sess = bootstrap_session()
        with translate("keystone", "delete the bootstrap credential"):
            _delete_all_but(sess, ident, {final["id"], boot["application_credential_id"]})
            r = sess.delete(
                f"{ident.auth_url}/users/{ident.user_id}/application_credentials/"
                f"{boot['application_credential_id']}",
                raise_exc=False,
            )
        if r.status_code not in (204, 404):
            raise AuthError(f"keystone did not delete the bootstrap credential ({r.status_code})")
    except AuthError as e:
        if "refused the bootstrap credential" not in e.message:
            raise
        LOG.info("enrollment: the bootstrap credential is already gone")
    return final


def _delete_all_but(sess: Any, ident: Identity, keep: set[str]) -> None:
    """Delete every application credential of the node's user not in ``keep``; a delete
    that fails raises (keystoneauth raises on an error status)."""
    base = f"{ident.auth_url}/users/{ident.user_id}/application_credentials"
    for cred in sess.get(base).json()["application_credentials"]:
        if cred["id"] not in keep:
            sess.delete(f"{base}/{cred['id']}")
            LOG.info("enrollment: deleted application credential %s (%s)", cred["id"], cred["name"])


def pcr_values_hint(pcrs: tuple[int, ...], values: dict[str, str]) -> str:
    """What the factory does with the values a node measures: the node has no login, so
    its console is where they are read (``edgepin enroll --pcr-values FILE`` takes them)."""
    selection = ",".join(map(str, pcrs))
    return (
        f"enroll the node again with `edgepin enroll ... --pcrs {selection} --pcr-values FILE`, "
        f"FILE holding this node's PCR values: {json.dumps(values, sort_keys=True)}"
    )


def _pcr_values(cfg: NodeConfig) -> dict[str, str]:
    with tpm.Tpm.open(cfg.tcti) as t:
        return {str(p): v.hex() for p, v in sorted(t.read_pcrs(cfg.pcrs).items())}


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def enrolled_identity(cfg: NodeConfig, record: Enrollment) -> Identity:
    """The identity fixed at enrollment (from the anchored ledger), with its CA checked."""
    ca_file = cfg.ca_path if cfg.ca_path.exists() else cfg.state_dir / "seed" / "ca.pem"
    try:
        ca_sha256 = _sha256_file(ca_file)
    except FileNotFoundError:
        ca_sha256 = ""
    if ca_sha256 != record.ca_sha256:
        raise TrustError(
            f"the control-plane CA {ca_file} is not the one the node enrolled with",
            hint="the CA is fixed at enrollment; enroll the node again to change it",
        )
    return Identity(
        node_id=record.node_id,
        project_id=record.project_id,
        user_id=record.user_id,
        auth_url=record.auth_url,
        region=record.region,
        interface=record.interface,
        ca_file=ca_file,
    )


def node_session(cfg: NodeConfig, record: Enrollment) -> tuple[Identity, Any]:
    """The node's authenticated session, from the ledger's enrollment record; unsealing
    fails closed on a changed boot state or on a credential blob that is not the one
    sealed at enrollment."""
    ident = enrolled_identity(cfg, record)
    final = state.read_json(_final(cfg))
    if final is None:
        raise TrustError(f"{_final(cfg)} is gone", hint="enroll the node again")
    try:
        blob = base64.b64decode(final["sealed"], validate=True)
        cred_id = str(final["id"])
    except (KeyError, TypeError, ValueError):
        raise TrustError(f"{_final(cfg)} is malformed") from None
    if (
        cred_id != record.credential_id
        or hashlib.sha256(blob).hexdigest() != record.credential_sha256
    ):
        raise TrustError(
            f"{_final(cfg)} is not the credential the node sealed at enrollment",
            hint="enroll the node again",
        )
    node_secret = _unseal(cfg, blob, "node credential").decode()
    sess = make_session(ident, cred_id, node_secret, cfg.http_timeout)
    del node_secret
    token.restore(cfg.run_dir, sess.auth, cred_id, ident.auth_url)
    return ident, sess
