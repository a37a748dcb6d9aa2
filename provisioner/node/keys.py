"""Image keys: fetched from Barbican once, then kept only sealed to the TPM.

The passphrase is never written in the clear: it goes from the Barbican response into the
TPM seal, and at every guest start from the TPM unseal into an ephemeral, private libvirt
secret.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path
from typing import Any

from provisioner import tpm
from provisioner.errors import DigestMismatch, NotFoundError, TrustError, VerificationError
from provisioner.node import state
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
        with tpm.Tpm.open(cfg.tcti) as t:
            blob = t.seal(passphrase, cfg.pcrs)
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot seal the image key: {e}") from None
    del passphrase
    data = base64.b64encode(blob)
    state.atomic_write(sealed_path(cfg, image["id"]), data)
    LOG.info("keys: key of image %s sealed to PCRs %s", image["id"], list(cfg.pcrs))
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
        with tpm.Tpm.open(cfg.tcti) as t:
            return t.unseal(blob, cfg.pcrs)
    except tpm.TpmPolicyError as e:
        raise TrustError(
            f"TPM refused to unseal the image key: the measured boot state differs ({e})"
        ) from None
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot unseal the image key: {e}") from None


def forget(cfg: NodeConfig, image_id: str) -> None:
    sealed_path(cfg, image_id).unlink(missing_ok=True)
