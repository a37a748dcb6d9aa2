"""``edgepin bundle``: what one node needs to run its guest with no network, in one folder.

The bundle carries the node's **current** assignment, the one ``edgepin assign`` signed
and recorded in Keystone, so that the control plane and the node agree once the node
reaches it again (it then reports the guest it runs). Steps, and nothing is left behind
when one fails:

1. read the node's signed assignment (refused: none, unsigned, signed for another node);
2. check the image in Glance as the node will (its properties, its sha512 against the
   signed one) and the passphrase secret as ``assign`` does (the one ``publish`` bound to
   the image);
3. the TPM to wrap for: the node's EK and PCR policy recorded at enrollment
   (``provisioner/operator/tpmrecord.py``), or given on the command line and compared
   with the enrollment;
4. download the image into a temporary folder beside the bundle, checking its sha512
   against the signed assignment's;
5. read the passphrase from Barbican and wrap it at once for the node's EK under its PCR
   policy (:func:`provisioner.tpm.wrap_for_ek`): it exists in clear only in this process;
6. write the manifest (``provisioner/airgap.py``), fsync, and rename the folder into place
   as ``edgepin-<node>``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import airgap, assignment, barbican, tpm
from provisioner.cloud import translate
from provisioner.errors import (
    EdgepinError,
    ImageError,
    NotFoundError,
    ServiceUnavailableError,
    TrustError,
    UsageError,
    VerificationError,
)
from provisioner.node import fetch, state
from provisioner.operator import assign, enroll, imagesecrets, nodes, tpmrecord
from provisioner.operator.tpmrecord import TpmTarget
from provisioner.progress import step, transfer

CHUNK = 1024 * 1024


@dataclass
class BundleRequest:
    node_id: str
    out: Path
    ek_pub: Path | None = None
    ek_cert: Path | None = None
    ek_ca: Path | None = None
    pcrs: tuple[int, ...] = ()
    pcr_values: Path | None = None
    pcr_values_zero: bool = False
    edge_domain: str = "edge"
    progress: bool = True


@dataclass
class Bundled:
    node_id: str
    path: Path
    image_id: str
    generation: int
    size: int
    sha512: str
    pcrs: tuple[int, ...]
    ek_sha256: str
    sources: str  # where the EK and the PCR policy came from


def resolve_target(
    recorded: TpmTarget | None,
    enrolled_for: str | None,
    given_ek: bytes | None,
    given_values: dict[int, bytes] | None,
) -> tuple[TpmTarget, str]:
    """The TPM to wrap the key for, and where its parts came from.

    The EK given on the command line must be the one the node was enrolled for: the key
    recorded at enrollment, or, for a node enrolled before that record existed, the
    fingerprint ``edgepin_enrolled_for``. A PCR policy given replaces the recorded one
    (a factory that measured the node again)."""
    if given_ek is not None:
        ek = tpmrecord.canonical_ek(given_ek, "the EK given")
        ek_from = "the EK given"
        if recorded is not None and recorded.ek_public_pem != ek:
            raise UsageError(
                "the EK given is not the one the node was enrolled for",
                hint="give the EK certificate of this node's TPM, or leave --ek-cert and "
                "--ek-pub out to use the one recorded at enrollment",
            )
        if (
            recorded is None
            and enrolled_for is not None
            and enrolled_for not in {enroll.ek_fingerprint(given_ek), enroll.ek_fingerprint(ek)}
        ):
            raise UsageError(
                "the EK given is not the one the node was enrolled for "
                f"(edgepin_enrolled_for {enrolled_for})",
                hint="give the EK certificate or public key that `edgepin enroll` was given",
            )
    elif recorded is not None:
        ek, ek_from = recorded.ek_public_pem, "the EK recorded at enrollment"
    else:
        raise UsageError(
            "the node's EK is not on record (it was enrolled by an edgepin that did not record it)",
            hint="give --ek-cert (with --ek-ca) or --ek-pub, and --pcrs with --pcr-values",
        )
    if given_values is not None:
        values, pcr_from = given_values, "the PCR values given"
    elif recorded is not None:
        values, pcr_from = recorded.pcr_values, "the PCR policy recorded at enrollment"
    else:
        raise UsageError(
            "the node's PCR policy is not on record",
            hint="give --pcrs (the host image's EDGEPIN_PCRS) and --pcr-values FILE|zero",
        )
    return TpmTarget(ek, dict(values)), f"{ek_from}, {pcr_from}"


def _given(req: BundleRequest) -> tuple[bytes | None, dict[int, bytes] | None]:
    ek = None
    if req.ek_pub or req.ek_cert:
        ek, _ = enroll.read_ek(req.ek_pub, req.ek_cert, req.ek_ca)
    elif req.ek_ca:
        raise UsageError("--ek-ca checks --ek-cert: give both")
    values = None
    if req.pcrs:
        values = enroll.expected_pcr_values(req.pcrs, req.pcr_values, req.pcr_values_zero)
    elif req.pcr_values or req.pcr_values_zero:
        raise UsageError("--pcr-values goes with --pcrs")
    return ek, values


def make_bundle(conn: Any, req: BundleRequest) -> Bundled:
    given_ek, given_values = _given(req)  # arguments first: nothing asked before they are right
    if req.out.exists() and not req.out.is_dir():
        raise UsageError(f"--out {req.out} is not a folder")
    domain_id = nodes.edge_domain_id(conn, req.edge_domain)
    node = nodes.get_node(conn, domain_id, req.node_id)
    raw = node.project.get(nodes.ASSIGNMENT_ATTR)
    if not raw:
        raise NotFoundError(
            f"node {req.node_id} has no assignment",
            hint=f"assign it an image first: `edgepin assign {req.node_id} IMAGE_ID`",
        )
    try:
        signed, _cert = assignment.read_signed(raw, node.project_id, req.node_id)
    except (ImageError, VerificationError) as e:
        raise ImageError(
            f"the assignment record of {req.node_id} cannot go into a bundle: {e.message}",
            hint=f"assign the image again with `edgepin assign {req.node_id} IMAGE_ID`",
        ) from None
    target, sources = resolve_target(
        tpmrecord.parse(node.project.get(tpmrecord.TPM_ATTR)),
        node.project.get("edgepin_enrolled_for"),
        given_ek,
        given_values,
    )
    image = assign.get_image(conn, signed.image_id)
    assign.check_image(image)
    fetch.check_assigned(image, signed)
    fetch.check_properties(image)  # what the node checks, before anything is downloaded
    carried = airgap.image_from_glance(image)
    secrets = imagesecrets.image_secrets(conn, image)

    final = req.out / airgap.folder_name(req.node_id)
    work = req.out / f".{final.name}.tmp-{os.getpid()}"
    req.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o755)
    try:
        step(f"downloading image {signed.image_id} ({carried.size} bytes)")
        got = download(conn, carried, work / airgap.IMAGE_FILE, req.progress)
        if got != signed.image_sha512:
            raise VerificationError(
                f"the bytes Glance sent for image {signed.image_id} are not the ones the "
                "signed assignment names (sha512 differs): refused",
                image_id=signed.image_id,
                expected=signed.image_sha512,
                computed=got,
            )
        step(f"wrapping the image's key for the node's TPM ({sources})")
        blob = wrap(conn, secrets.key_id, target)
        record = json.loads(raw) if isinstance(raw, str) else raw
        manifest = airgap.Manifest(
            node=req.node_id,
            created_at=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            assignment=record,
            image=carried,
            key=airgap.WrappedKey(blob, target.pcrs, target.ek_sha256),
        )
        data = airgap.encode(manifest)
        if airgap.parse(data) != manifest:  # what is written is what the node reads
            raise EdgepinError("the bundle's manifest does not read back as written")
        state.atomic_write(work / airgap.MANIFEST, data, mode=0o644)
        state.fsync_dir(work)
        _put_in_place(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Bundled(
        req.node_id,
        final,
        signed.image_id,
        signed.generation,
        carried.size,
        got,
        target.pcrs,
        target.ek_sha256,
        sources,
    )


def download(conn: Any, image: airgap.BundleImage, dest: Path, progress: bool) -> str:
    """The image's bytes from Glance into ``dest``; their sha512."""
    import requests

    image_id = image.image_id
    digest = hashlib.sha512()
    done = 0
    with translate("glance", f"download of {image_id}"):
        r = conn.image.get(f"/images/{image_id}/file", stream=True, raise_exc=False)
    try:
        if r.status_code == 404:
            raise NotFoundError(f"glance: image {image_id} has no data")
        if r.status_code != 200:
            raise ServiceUnavailableError(
                f"glance: download of {image_id} answered {r.status_code}"
            )
        with (
            dest.open("xb") as f,
            transfer(f"image {image_id[:8]}", image.size, progress) as bar,
            translate("glance", f"download of {image_id}"),
        ):
            for chunk in r.iter_content(chunk_size=CHUNK):
                if done + len(chunk) > image.size:
                    raise VerificationError(
                        f"glance sends more bytes for image {image_id} than its size {image.size}"
                    )
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                bar(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except requests.RequestException as e:
        raise ServiceUnavailableError(
            f"glance: download of {image_id} cut at {done} of {image.size} bytes "
            f"({type(e).__name__}); run the command again"
        ) from None
    finally:
        r.close()
    if done != image.size:
        raise ServiceUnavailableError(
            f"glance: download of {image_id} ended at {done} of {image.size} bytes; "
            "run the command again"
        )
    return digest.hexdigest()


def wrap(conn: Any, key_id: str, target: TpmTarget) -> bytes:
    """The image's passphrase, read from Barbican and wrapped at once for ``target``."""
    passphrase = barbican.payload(conn, key_id, text=True)
    try:
        return tpm.wrap_for_ek(target.ek_public_pem, passphrase, target.pcr_values)
    except tpm.TpmError as e:
        raise TrustError(f"cannot wrap the image's key for the node's EK: {e}") from None
    finally:
        del passphrase


def _put_in_place(work: Path, final: Path) -> None:
    """Rename the finished folder into place (an older bundle of the node is replaced)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(work, final)
    state.fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
