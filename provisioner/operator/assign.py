"""``edgepin assign``: point a node at one image.

Checks that the image's passphrase and certificate secrets are the ones ``edgepin publish``
recorded for it (provisioner/operator/imagesecrets.py), shares the image with the node's
project, records in the node's project that the node needs exactly those two secrets,
derives the secrets' read ACLs from every node's record (provisioner/operator/access.py:
concurrent assigns lose no entry), withdraws what earlier assignments granted, and writes
the assignment record with a generation that only goes up, signed for that node with the
assignment-signing key (provisioner/assignment.py): the node runs nothing else.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from provisioner import assignment, barbican
from provisioner.cloud import translate
from provisioner.errors import (
    EdgepinError,
    ImageError,
    NotFoundError,
    UsageError,
    VerificationError,
)
from provisioner.node import model
from provisioner.operator import access, imagesecrets, nodes, parallel
from provisioner.operator.publish import REQUIRED_PROPERTIES
from provisioner.operator.signingcert import load_key
from provisioner.signing import fingerprint, load_certificate


@dataclass(frozen=True)
class AssignmentSigner:
    """The key that signs assignments and its certificate (pinned on the nodes as an
    assignment-signing or image-signing certificate): Barbican ids, or PEM files on the
    operator's machine, which keep the key off the control plane."""

    cert_id: str | None = None
    key_id: str | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def load(self, conn: Any) -> tuple[Any, x509.Certificate]:
        if self.key_file is not None and self.cert_file is not None:
            key = _read_key(self.key_file)
            cert = _read_cert(self.cert_file)
            where = f"{self.key_file} is not the key of {self.cert_file}"
        elif self.key_id and self.cert_id:
            key = load_key(conn, self.key_id)
            cert = imagesecrets.signing_certificate(conn, self.cert_id)
            where = f"{self.key_id} is not the key of certificate {self.cert_id}"
        else:
            raise UsageError("give the assignment-signing key and certificate (ids or files)")
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise UsageError(
                f"the assignment-signing key {where}",
                hint="give the key and the certificate of one `edgepin signing-cert create`",
            )
        return key, cert


def _read_key(path: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise UsageError(f"--assignment-key-file {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise UsageError(
            f"--assignment-key-file {path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise UsageError(f"--assignment-key-file {path}: not an RSA or EC key")
    return key


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return load_certificate(path.read_bytes())
    except OSError as e:
        raise UsageError(f"--assignment-cert-file {path}: {e.strerror}") from None


@dataclass
class Assigned:
    node_id: str
    image_id: str
    generation: int
    previous: dict[str, Any] | None


def get_image(conn: Any, image_id: str) -> dict[str, Any]:
    with translate("glance", f"image {image_id}"):
        r = conn.image.get(f"/images/{image_id}", raise_exc=False)
    if r.status_code == 404:
        raise NotFoundError(f"glance: image {image_id} does not exist")
    r.raise_for_status()
    image: dict[str, Any] = r.json()
    return image


def check_image(image: dict[str, Any]) -> None:
    if image.get("edgepin_kind") == "host-update":
        raise ImageError(
            f"image {image['id']} is a host release, not a guest image",
            hint="host releases go to a node's host, not its guest",
        )
    missing = [p for p in REQUIRED_PROPERTIES if not image.get(p)]
    if missing:
        raise ImageError(
            f"image {image['id']} lacks {', '.join(missing)}",
            hint="publish images with `edgepin publish`",
        )
    if image.get("status") != "active":
        raise ImageError(f"image {image['id']} is {image.get('status')}, not active")
    if image.get("disk_format") != "qcow2" or image.get("os_hash_algo") != "sha512":
        raise ImageError(f"image {image['id']} is not a qcow2 with a sha512 hash")
    for prop, read in (
        (model.NETWORK_PROPERTY, model.guest_network),
        (model.USB_PROPERTY, model.usb_ids),
        (model.PCI_PROPERTY, model.pci_selectors),
    ):
        try:
            read(image.get(prop))
        except ImageError as e:
            raise ImageError(
                f"image {image['id']}: {prop}: {e.message}",
                hint="publish it again with `edgepin publish`",
            ) from None


def share(conn: Any, image_id: str, project_id: str) -> None:
    @nodes.server_retry
    def post() -> Any:
        with translate("glance", f"share {image_id}"):
            r = conn.image.post(
                f"/images/{image_id}/members", json={"member": project_id}, raise_exc=False
            )
        if r.status_code >= 500:  # e.g. two members added at once on a busy database
            raise nodes.ServerError(r.status_code)
        return r

    try:
        r = post()
    except nodes.ServerError as e:
        raise ImageError(f"glance refused to share {image_id} ({e.status})") from None
    if r.status_code == 409:  # already a member
        return
    if r.status_code == 413:
        raise ImageError(
            f"glance refused to share {image_id} with one more project (413): the image has "
            "as many members as Glance's image_member_quota allows",
            hint="raise image_member_quota in glance-api.conf above the number of nodes that "
            "run one image (-1: no limit; the default, 128, is too small for a fleet); "
            "see docs/production.md",
        )
    if r.status_code >= 300:
        raise ImageError(f"glance refused to share {image_id} ({r.status_code})")


def unshare(conn: Any, image_id: str, project_id: str) -> None:
    with translate("glance", f"unshare {image_id}"):
        conn.image.delete(f"/images/{image_id}/members/{project_id}", raise_exc=False)


def grant(conn: Any, secret_id: str, user_id: str) -> None:
    """Add one user to one secret's read ACL, outside any node's record.

    A repair and test tool: it reads the list and writes it back, so a concurrent writer
    can undo it, and the next :func:`access.sync` of that secret removes a node user whose
    record does not name it. ``assign`` and ``revoke`` never use it.
    """
    client = barbican.acl_client(conn)
    users = barbican.acl_users(client, secret_id)
    if user_id not in users:
        barbican.set_acl_users(client, secret_id, [*users, user_id])


def next_generation(
    raw: Any, cert: x509.Certificate, project_id: str, node_id: str, given: int | None
) -> tuple[int, dict[str, Any] | None]:
    """The generation to sign, and the previous assignment as signed.

    The previous generation is read only from a record this key signed for this node: the
    readable copy, which anyone who can write the project can change, would let them choose
    the generation the operator signs (one far above, and the node is stuck at its floor).
    A record this key did not sign (none of edgepin's, another key's, altered) needs
    ``given``, a generation higher than any the node has seen."""
    try:
        prev = assignment.verify(raw, {fingerprint(cert): cert}, project_id, node_id)
    except (ImageError, VerificationError) as e:
        if given is None:
            raise UsageError(
                f"the assignment record of {node_id} is not one this key signed "
                f"({e.message}): its generation cannot be trusted",
                hint="give --generation N, higher than any generation assigned to the node "
                "before (on a node with a shell, edgepin node status shows it as "
                "highest_generation)",
            ) from None
        return given, None
    previous = {"image_id": prev.image_id, "generation": prev.generation} if prev else None
    if given is None:
        return (prev.generation + 1 if prev else 1), previous
    if prev is not None and given <= prev.generation:
        raise UsageError(
            f"--generation {given} is not higher than {prev.generation}, the node's current one"
        )
    return given, previous


@dataclass(frozen=True)
class Published:
    """An image checked once for any number of assignments: its record and its secrets."""

    image: dict[str, Any]
    needed: imagesecrets.ImageSecrets

    @property
    def image_id(self) -> str:
        return str(self.image["id"])


def prepare(conn: Any, image_id: str) -> Published:
    """Read and check an image and the two secrets it names (once per image)."""
    image = get_image(conn, image_id)
    check_image(image)
    return Published(image, imagesecrets.image_secrets(conn, image))


@dataclass(frozen=True)
class Job:
    """One node to assign one image, at ``generation`` (None: the signed current + 1)."""

    node: nodes.Node
    published: Published
    generation: int | None = None
    extra: dict[str, Any] | None = None  # signed fields the node does not read (a rollout's)


@dataclass
class Done:
    """What became of one :class:`Job`: the generation signed, or the error."""

    node_id: str
    image_id: str
    generation: int | None = None
    previous: dict[str, Any] | None = None
    error: EdgepinError | None = None


def assign_many(
    conn: Any,
    domain_id: str,
    jobs: list[Job],
    key: Any,
    cert: x509.Certificate,
    workers: int = parallel.WORKERS,
    done: Callable[[Done], None] | None = None,
) -> list[Done]:
    """Assign many nodes at once, ``workers`` requests at a time, each step as ``assign``
    does it for one, and the secrets' read ACLs derived once for all of them. A node that
    fails keeps its error in its :class:`Done`; the others go on. Returns one per job, in
    order; ``done`` is called as each node's assignment is written or fails."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    results = [Done(j.node.node_id, j.published.image_id) for j in jobs]
    records: list[dict[str, Any] | None] = [None] * len(jobs)
    olds: list[dict[str, list[str]]] = [{} for _ in jobs]

    def first(i: int) -> None:
        job, result = jobs[i], results[i]
        node = job.node
        try:
            if node.user is None:
                raise NotFoundError(
                    f"node {node.node_id} has no user",
                    hint="enroll it again with `edgepin enroll`",
                )
            raw = node.project.get(nodes.ASSIGNMENT_ATTR)
            gen, result.previous = next_generation(
                raw, cert, node.project_id, node.node_id, job.generation
            )
            image = job.published.image
            sha = str(image["os_hash_value"])
            # signed before anything changes: a key that cannot sign changes nothing
            network = model.guest_network(image.get(model.NETWORK_PROPERTY))
            records[i] = assignment.sign(
                key,
                cert,
                node.project_id,
                node.node_id,
                result.image_id,
                sha,
                gen,
                now,
                job.extra,
                network,
                model.usb_ids(image.get(model.USB_PROPERTY)),
                model.resources_of(image),
                model.pci_selectors(image.get(model.PCI_PROPERTY)),
            )
            result.generation = gen
            olds[i] = node.grants
            share(conn, result.image_id, node.project_id)
            # the record first: the ACLs are derived from it
            grants = {"images": [result.image_id], "secrets": job.published.needed.ids}
            nodes.update_project(conn, node.project_id, {nodes.GRANTS_ATTR: grants})
        except EdgepinError as e:
            result.error = e
            if done:
                done(result)

    parallel.bounded_map(first, range(len(jobs)), workers)
    going = [i for i, r in enumerate(results) if r.error is None]
    touched = {
        s for i in going for s in (*jobs[i].published.needed.ids, *olds[i].get("secrets", []))
    }
    try:
        access.sync(conn, domain_id, touched)
    except EdgepinError as e:
        for i in going:
            results[i].error = e
            if done:
                done(results[i])
        return results

    def last(i: int) -> None:
        job, result = jobs[i], results[i]
        try:
            for old_image in olds[i].get("images", []):
                if old_image != result.image_id:
                    unshare(conn, old_image, job.node.project_id)
            nodes.update_project(conn, job.node.project_id, {nodes.ASSIGNMENT_ATTR: records[i]})
        except EdgepinError as e:
            result.error = e
        if done:
            done(result)

    parallel.bounded_map(last, going, workers)
    return results


def assign(
    conn: Any,
    edge_domain: str,
    node_id: str,
    image_id: str,
    signer: AssignmentSigner,
    generation: int | None = None,
) -> Assigned:
    domain_id = nodes.edge_domain_id(conn, edge_domain)
    node = nodes.get_node(conn, domain_id, node_id)
    if node.user is None:
        raise NotFoundError(
            f"node {node_id} has no user", hint="enroll it again with `edgepin enroll`"
        )
    published = prepare(conn, image_id)
    key, cert = signer.load(conn)
    (result,) = assign_many(conn, domain_id, [Job(node, published, generation)], key, cert, 1)
    if result.error is not None:
        raise result.error
    assert result.generation is not None
    return Assigned(node_id, image_id, result.generation, result.previous)
