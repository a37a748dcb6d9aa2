"""Image keys: fetched from Barbican once, then kept only sealed to the TPM.

The passphrase is never written in the clear: it goes from the Barbican response into the
TPM seal, and at every guest start from the TPM unseal into an ephemeral, private libvirt
secret.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

from provisioner import tpm
from provisioner.cloud import translate
from provisioner.errors import AuthError, NotFoundError, ServiceUnavailableError, TrustError
from provisioner.node import state
from provisioner.node.config import NodeConfig

LOG = logging.getLogger(__name__)


def sealed_path(cfg: NodeConfig, image_id: str) -> Path:
    return cfg.state_dir / "keys" / f"{image_id}.sealed"


def barbican_payload(sess: Any, interface: str, secret_id: str, text: bool) -> bytes:
    """GET a secret's payload; a 403 or 404 is an error, never an empty key."""
    ep = {"service_type": "key-manager", "interface": interface}
    accept = "text/plain" if text else "application/octet-stream"
    with translate("barbican", f"secret {secret_id}"):
        r = sess.get(
            f"/v1/secrets/{secret_id}/payload",
            endpoint_filter=ep,
            headers={"Accept": accept},
            raise_exc=False,
        )
    if r.status_code == 404:
        raise NotFoundError(f"barbican: secret {secret_id} does not exist")
    if r.status_code in (401, 403):
        raise AuthError(f"barbican: this node may not read secret {secret_id}")
    if r.status_code != 200:
        raise ServiceUnavailableError(f"barbican: status {r.status_code} for {secret_id}")
    return bytes(r.content)


def ensure_sealed(cfg: NodeConfig, sess: Any, interface: str, image: dict[str, Any]) -> bool:
    """Make sure the image's key is sealed on the node; True when it was fetched now."""
    path = sealed_path(cfg, image["id"])
    if path.exists():
        return False
    passphrase = barbican_payload(sess, interface, image["os_encrypt_key_id"], text=True)
    if not passphrase:
        raise NotFoundError("barbican returned an empty key")
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            blob = t.seal(passphrase, cfg.pcrs)
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot seal the image key: {e}") from None
    del passphrase
    state.atomic_write(path, base64.b64encode(blob))
    LOG.info("keys: key of image %s sealed to PCRs %s", image["id"], list(cfg.pcrs))
    return True


def unseal(cfg: NodeConfig, image_id: str) -> bytes:
    path = sealed_path(cfg, image_id)
    try:
        blob = base64.b64decode(path.read_bytes())
    except FileNotFoundError:
        raise NotFoundError(f"no sealed key for image {image_id} on this node") from None
    try:
        with tpm.Tpm.open(cfg.tcti) as t:
            return t.unseal(blob)
    except tpm.TpmPolicyError as e:
        raise TrustError(
            f"TPM refused to unseal the image key: the measured boot state differs ({e})"
        ) from None
    except tpm.TpmError as e:
        raise TrustError(f"TPM cannot unseal the image key: {e}") from None


def forget(cfg: NodeConfig, image_id: str) -> None:
    sealed_path(cfg, image_id).unlink(missing_ok=True)
