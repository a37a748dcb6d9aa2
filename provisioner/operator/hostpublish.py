"""``edgepin host publish``, ``host list`` and ``host assign``: host releases in Glance.

A host release is the host update that ``./build.sh image`` writes
(``out/edgepin-host.update.tar``, :mod:`provisioner.hostupdate`), uploaded to Glance as an
image of its own kind and signed like a guest image:

1. read the file completely, once (every member in its place, with the size and sha256
   its manifest gives: :func:`provisioner.hostupdate.read`): anything that is not a whole
   host update is refused before anything is created;
2. in the same pass, hash (sha512) and sign (``img_signature*``, with the same signing key
   and certificate as guest images) the bytes checked;
3. refuse a host version that is not greater than every host release in Glance: host
   versions only go up;
4. create the Glance image with every property set before upload, so that Glance verifies
   the signature itself, then upload with progress; on any failure the image is deleted;
5. check that Glance's ``os_hash_value`` equals the sha512 computed while uploading.

The kind keeps host releases and guest images apart: a host release has
``disk_format=raw``, ``edgepin_kind=host-update`` and no ``os_encrypt_*`` (a host root holds
no secret: Debian's packages and edgepin's; a node's secrets are in its TPM and its state
partition). ``edgepin assign`` refuses it as a guest, as a node refuses any guest that is
not qcow2 with LUKS inside; and a guest image is not a host update, whose manifest a
reader checks first.

``host assign`` points nodes at one release: it shares the release with each node's
project, writes the node's host assignment (:mod:`provisioner.hostassign`, signed with the
assignment-signing key, the generation one above the one this key signed before) and
withdraws the share of the release assigned before. The node fetches, checks and installs
it (:mod:`provisioner.node.hostfetch`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import hostassign, hostupdate
from provisioner.cloud import translate
from provisioner.errors import (
    EdgepinError,
    ImageError,
    NotFoundError,
    UsageError,
    VerificationError,
)
from provisioner.operator.imagesecrets import signing_certificate
from provisioner.operator.publish import delete_image, spki, upload
from provisioner.operator.signingcert import load_key
from provisioner.progress import step, transfer
from provisioner.signing import StreamSigner, fingerprint

KIND = hostassign.RELEASE_KIND
KIND_PROPERTY = hostassign.KIND_PROPERTY
VERSION_PROPERTY = hostassign.VERSION_PROPERTY
ROOT_HASH_PROPERTY = "edgepin_host_root_hash"
APPROVALS_PROPERTY = hostassign.APPROVALS_PROPERTY
MAX_APPROVALS = hostassign.MAX_APPROVALS
MAX_APPROVALS_TEXT = hostassign.MAX_APPROVALS_TEXT
HASH_METHOD = "SHA-512"
PAGE = 200


@dataclass
class Release:
    image_id: str
    name: str
    host_version: int
    root_hash: str
    size: int
    sha512: str
    created_at: str = ""
    approvals: int = 0  # the release key's approvals that go with it


def _count_approvals(value: Any) -> int:
    try:
        docs = json.loads(value) if isinstance(value, str) and value else []
    except (ValueError, RecursionError):
        return 0
    return len(docs) if isinstance(docs, list) else 0


def _release(image: dict[str, Any]) -> Release | None:
    """A Glance image as a host release; None for any other image (or a malformed one)."""
    if image.get(KIND_PROPERTY) != KIND:
        return None
    try:
        version = int(str(image.get(VERSION_PROPERTY)))
    except ValueError:
        return None
    return Release(
        image_id=str(image.get("id")),
        name=str(image.get("name") or ""),
        host_version=version,
        root_hash=str(image.get(ROOT_HASH_PROPERTY) or ""),
        size=int(image.get("size") or 0),
        sha512=str(image.get("os_hash_value") or ""),
        created_at=str(image.get("created_at") or ""),
        approvals=_count_approvals(image.get(APPROVALS_PROPERTY)),
    )


def releases(conn: Any) -> list[Release]:
    """Every host release the caller can see, oldest version first."""
    found: list[Release] = []
    params: dict[str, Any] = {KIND_PROPERTY: KIND, "limit": PAGE}
    while True:
        with translate("glance", "list host releases"):
            r = conn.image.get("/images", params=params)
            r.raise_for_status()
        page = r.json().get("images", [])
        found += [rel for rel in map(_release, page) if rel is not None]
        if len(page) < PAGE or not r.json().get("next"):
            return sorted(found, key=lambda rel: (rel.host_version, rel.created_at))
        params["marker"] = page[-1]["id"]


def read_approvals(files: tuple[Path, ...], kept: tuple[Any, ...] = ()) -> str:
    """The approval files (after the documents ``kept`` from before) as the release's
    property: their documents, checked for form (the node checks the signatures against
    the release key it pins), each once."""
    from provisioner import tpm

    docs = list(kept)
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise UsageError(f"--approval {path}: {e.strerror}") from None
        try:
            tpm.parse_approval(raw)
        except tpm.TpmBlobError as e:
            raise UsageError(
                f"--approval {path} is not a PCR approval: {e}",
                hint="write approvals with `edgepin release approve`",
            ) from None
        doc = json.loads(raw)
        if doc not in docs:
            docs.append(doc)
    if len(docs) > MAX_APPROVALS:
        raise UsageError(f"at most {MAX_APPROVALS} approvals go with a host release")
    text = json.dumps(docs, sort_keys=True, separators=(",", ":")) if docs else ""
    if len(text) > MAX_APPROVALS_TEXT:
        raise UsageError("the approvals are too large for one host release")
    return text


def publish(
    conn: Any,
    file: Path,
    *,
    signing_cert_id: str,
    signing_key_id: str,
    name: str | None = None,
    approvals: tuple[Path, ...] = (),
    progress: bool = True,
) -> Release:
    """Sign ``file`` (a host update) and upload it to Glance as a host release, with the
    release key's ``approvals`` of the PCR values it measures."""
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    approvals_text = read_approvals(approvals)
    step("reading the signing key and certificate from Barbican")
    key = load_key(conn, signing_key_id)
    cert = signing_certificate(conn, signing_cert_id)
    if spki(cert.public_key()) != spki(key.public_key()):
        raise VerificationError(
            "the signing key does not belong to the signing certificate",
            hint="check --signing-key-id and --signing-cert-id",
        )
    size = file.stat().st_size
    signer = StreamSigner(key, HASH_METHOD)
    digest = hashlib.sha512()
    # one pass: the bytes checked are the bytes signed
    with transfer(f"checking and signing {file.name}", size, progress) as bar:

        def on_data(chunk: bytes) -> None:
            signer.update(chunk)
            digest.update(chunk)
            bar(len(chunk))

        update = hostupdate.read(file, on_data)
    sha512 = digest.hexdigest()
    name = name or f"{update.name}-{update.host_version}"
    newest = max(releases(conn), key=lambda r: r.host_version, default=None)
    if newest is not None and update.host_version <= newest.host_version:
        raise ImageError(
            f"host version {update.host_version} is not greater than the newest host release "
            f"in Glance ({newest.host_version}, image {newest.image_id})",
            hint="build the release from a later commit (the version defaults to its time) or "
            "with a greater --host-version",
        )
    properties = {
        KIND_PROPERTY: KIND,
        VERSION_PROPERTY: str(update.host_version),
        ROOT_HASH_PROPERTY: update.verity.root_hash,
        "img_signature": signer.signature(),
        "img_signature_hash_method": HASH_METHOD,
        "img_signature_key_type": signer.key_type,
        "img_signature_certificate_uuid": signing_cert_id,
        "edgepin_signing_cert_sha256": fingerprint(cert),
        "edgepin_version": update.edgepin_version,
        **({APPROVALS_PROPERTY: approvals_text} if approvals_text else {}),
    }
    with translate("glance", "create image"):
        r = conn.image.post(
            "/images",
            json={
                "name": name,
                "disk_format": "raw",
                "container_format": "bare",
                "visibility": "shared",
                **properties,
            },
        )
        r.raise_for_status()
    image_id = str(r.json()["id"])
    try:
        image = upload(conn, image_id, file, name, sha512, progress)
    except BaseException:
        try:
            delete_image(conn, image_id)
        except EdgepinError:
            pass
        raise
    step(f"published host release {name} (host version {update.host_version}) as {image_id}")
    release = _release(image)
    assert release is not None  # its kind and version were set above
    return release


def approve(conn: Any, release: str, files: tuple[Path, ...]) -> Release:
    """Add the release key's approvals in ``files`` to a published host release (the
    factory measures a release's boot chain once it is built, possibly after publishing
    it). The bytes and their signature are unchanged; nodes read the approvals when they
    fetch the release."""
    if not files:
        raise UsageError("give at least one --approval FILE")
    rel, image = find_release(conn, release)
    kept = json.loads(image.get(APPROVALS_PROPERTY) or "[]")
    if not isinstance(kept, list):
        kept = []
    text = read_approvals(files, tuple(kept))
    with translate("glance", f"approvals of {rel.image_id}"):
        r = conn.image.patch(
            f"/images/{rel.image_id}",
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
            json=[{"op": "add", "path": f"/{APPROVALS_PROPERTY}", "value": text}],
        )
        r.raise_for_status()
    found = _release(r.json())
    assert found is not None  # the same image, of the host kind
    step(f"host release {rel.image_id} has {found.approvals} approvals")
    return found


def find_release(conn: Any, release: str) -> tuple[Release, dict[str, Any]]:
    """A host release by its Glance image id or its host version, checked: of the host
    kind, active, with a sha512."""
    if release.isdigit() and len(release) <= 19:
        found = [r for r in releases(conn) if r.host_version == int(release)]
        if not found:
            raise NotFoundError(
                f"no host release with host version {release} in Glance",
                hint="`edgepin host list` shows them",
            )
        release = found[-1].image_id
    from provisioner.operator.assign import get_image

    image = get_image(conn, release)
    rel = _release(image)
    if rel is None:
        raise ImageError(
            f"image {release} is not a host release",
            hint="publish host updates with `edgepin host publish`; guest images go to "
            "`edgepin assign`",
        )
    if image.get("status") != "active":
        raise ImageError(f"host release {release} is {image.get('status')}, not active")
    if image.get("os_hash_algo") != "sha512" or not image.get("os_hash_value"):
        raise ImageError(f"host release {release} has no sha512")
    return rel, image


@dataclass
class HostAssigned:
    """What became of one node: the generation signed and the release it replaced, or
    the error."""

    node_id: str
    generation: int = 0
    previous: dict[str, Any] | None = None
    error: EdgepinError | None = None


def assign_host(
    conn: Any,
    edge_domain: str,
    node_ids: list[str],
    release: str,
    signer: Any,
    restart: hostassign.Restart,
    done: Callable[[HostAssigned], None] | None = None,
) -> tuple[Release, list[HostAssigned]]:
    """Assign the host release ``release`` (image id or host version) to each node. A node
    that fails keeps its error; the others go on."""
    from provisioner.operator import assign, nodes, parallel

    rel, _image = find_release(conn, release)
    key, cert = signer.load(conn)
    domain_id = nodes.edge_domain_id(conn, edge_domain)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    results = [HostAssigned(n) for n in node_ids]

    def one(result: HostAssigned) -> None:
        try:
            node = nodes.get_node(conn, domain_id, result.node_id)
            prev = hostassign.previous(
                node.project.get(hostassign.ATTR), cert, node.project_id, node.node_id
            )
            result.previous = prev.as_dict() if prev else None
            result.generation = prev.generation + 1 if prev else 1
            record = hostassign.sign(
                key,
                cert,
                node.project_id,
                node.node_id,
                hostassign.HostAssignment(
                    rel.image_id, rel.sha512, rel.host_version, result.generation, now, restart
                ),
            )
            assign.share(conn, rel.image_id, node.project_id)
            nodes.update_project(conn, node.project_id, {hostassign.ATTR: record})
            if prev is not None and prev.image_id != rel.image_id:
                assign.unshare(conn, prev.image_id, node.project_id)
        except EdgepinError as e:
            result.error = e
        if done:
            done(result)

    parallel.bounded_map(one, results)
    return rel, results
