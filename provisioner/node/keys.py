"""Image keys: fetched from Barbican once, then kept only sealed to the TPM.

The passphrase is never written in the clear: it goes from the Barbican response into the
TPM seal, and at every guest start from the TPM unseal into an ephemeral, private libvirt
secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from provisioner import qemuimg, tpm
from provisioner.errors import (
    DigestMismatch,
    ImageError,
    NotFoundError,
    TrustError,
    VerificationError,
)
from provisioner.node import policy, state
from provisioner.node.client import NodeClient
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)


def sealed_path(cfg: NodeConfig, image_id: str) -> Path:
    return keys_dir(cfg) / f"{image_id}.sealed"


def keys_dir(cfg: NodeConfig) -> Path:
    return cfg.state_dir / "keys"


def sealed_ids(cfg: NodeConfig) -> set[str]:
    """The image ids that have a sealed key blob on the disk."""
    return {p.stem for p in keys_dir(cfg).glob("*.sealed")}


def blob_sha256(cfg: NodeConfig, image_id: str) -> str | None:
    try:
        return hashlib.sha256(sealed_path(cfg, image_id).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def ensure_sealed(
    cfg: NodeConfig, client: NodeClient, image: dict[str, Any], known: str | None
) -> str:
    """Make sure the image's key is sealed on the node; the sealed blob's SHA-256.

    ``known`` is the digest the ledger recorded when the key was sealed: a blob on disk
    that does not have it (swapped, or sealed by someone else) is replaced by a fresh
    seal of the key from Barbican.
    """
    current = blob_sha256(cfg, image["id"])
    if current is not None and current == known:
        return current
    passphrase = client.secret(image["os_encrypt_key_id"], text=True)
    if not passphrase:
        raise NotFoundError("barbican returned an empty key")
    try:
        return _seal(cfg, image["id"], passphrase)
    finally:
        del passphrase


def seal_carried(
    cfg: NodeConfig, image_id: str, wrapped: bytes, known: str | None, image: Path
) -> str:
    """Make sure the key an air-gapped bundle carries is sealed on the node; the sealed
    blob's SHA-256 (``known``: as in :func:`ensure_sealed`).

    ``wrapped`` is a duplication blob for this TPM's EK under the node's PCR policy: the
    TPM imports and unseals it (only this TPM, only in the measured state), the
    passphrase must open the verified local copy ``image`` (anyone who has the EK's public
    key can wrap a key for it: a wrong one is refused here, before any guest is touched),
    and it is sealed again under the node's own storage key, as a key from Barbican is.
    """
    current = blob_sha256(cfg, image_id)
    if current is not None and current == known:
        return current
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            # wrapped by `edgepin bundle` for the PCR values recorded at enrollment
            passphrase = t.unseal(wrapped, cfg.pcrs, (tpm.BlobKind.DUPLICATE,))
    except tpm.TpmPolicyError as e:
        # the node credential unsealed before (reconcile.Run.go_import): the node is in
        # its enrolled state, so it is the bundle that names other PCRs or values
        LOG.debug("keys: the TPM refused the bundle's key: %s", e)
        raise TrustError(
            f"TPM refused to unwrap the bundle's key of image {image_id}: it is bound to "
            "other PCRs or values than this node measures: refused",
            hint=_pcr_hint(cfg),
            image_id=image_id,
        ) from None
    except tpm.TpmBlobError as e:
        LOG.debug("keys: the TPM did not import the bundle's key: %s", e)
        raise TrustError(
            f"the bundle's key of image {image_id} was not wrapped for this node's TPM: refused",
            hint="make the bundle again for this node's EK (the one it was enrolled with)",
            image_id=image_id,
        ) from None
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot unwrap the bundle's key: {e}", image_id=image_id) from None
    try:
        try:
            qemuimg.check_passphrase(image, passphrase)
        except ImageError:
            raise VerificationError(
                f"the bundle's key does not open image {image_id}: refused",
                hint="make the bundle again with `edgepin bundle`",
                image_id=image_id,
            ) from None
        return _seal(cfg, image_id, passphrase)
    finally:
        del passphrase


def _pcr_hint(cfg: NodeConfig) -> str:
    """The node has no login: its console says which values a bundle must be bound to."""
    selection = ",".join(map(str, cfg.pcrs))
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            values = {str(p): v.hex() for p, v in sorted(t.read_pcrs(cfg.pcrs).items())}
    except Exception:  # a hint, not a check: without the values it still says what to do
        return f"make the bundle again for this node's PCRs {selection} and their values"
    return (
        f"make the bundle again with `edgepin bundle ... --pcrs {selection} --pcr-values "
        f"FILE`, FILE holding this node's PCR values: {json.dumps(values, sort_keys=True)}"
    )


def _seal(cfg: NodeConfig, image_id: str, passphrase: bytes) -> str:
    """Seal an image's passphrase to the TPM, keep the blob; its SHA-256."""
    try:
        pol = policy.node_policy(cfg)
        with tpm.Tpm.open(cfg.tcti) as t:
            blob = t.seal(passphrase, pol)
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot seal the image key: {e}") from None
    data = base64.b64encode(blob)
    state.atomic_write(sealed_path(cfg, image_id), data)
    LOG.info("keys: key of image %s sealed to %s", image_id, policy.describe(pol))
    return hashlib.sha256(data).hexdigest()


def unseal(cfg: NodeConfig, image_id: str, expected_sha256: str | None) -> bytes:
    """The image's passphrase, from the blob the ledger recorded and from nothing else."""
    try:
        data = sealed_path(cfg, image_id).read_bytes()
    except FileNotFoundError:
        raise DigestMismatch("the sealed key", image_id, expected_sha256, None) from None
    got = hashlib.sha256(data).hexdigest()
    if expected_sha256 is None or got != expected_sha256:
        raise DigestMismatch("the sealed key", image_id, expected_sha256, got)
    try:
        blob = base64.b64decode(data, validate=True)
    except ValueError:  # cannot happen for a blob with the recorded digest
        raise VerificationError(f"the sealed key of image {image_id} is not base64") from None
    try:
        pol = policy.node_policy(cfg)
        with tpm.Tpm.open(cfg.tcti) as t:
            return t.unseal(blob, pol)
    except tpm.TpmPolicyError as e:
        raise TrustError(
            f"TPM refused to unseal the image key: the measured boot state differs ({e})"
        ) from None
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot unseal the image key: {e}") from None


def forget(cfg: NodeConfig, image_id: str) -> None:
    sealed_path(cfg, image_id).unlink(missing_ok=True)
