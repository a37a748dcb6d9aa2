"""What someone sniffing the TPM's bus reads: every byte between tpm2-tss and a real
swtpm goes through a recording forwarder (tests/testbed/tpmsniffer.py) while the node
seals, unseals, writes and reads its secrets. The secrets must not be in the traffic, in
any form, while the operations still give them back.

The secrets are random, kept in memory, and never printed: a failure names the place in
the traffic where one was found, not the bytes."""

from __future__ import annotations

import base64
import hmac
import json
import secrets
from collections.abc import Iterator

import pytest

from provisioner import tpm
from tests.testbed.swtpm import Swtpm
from tests.testbed.tpmsniffer import DECRYPT, ENCRYPT, TpmSniffer

pytestmark = pytest.mark.integration

PCRS = [7]


@pytest.fixture
def sniffer(swtpm: Swtpm) -> Iterator[TpmSniffer]:
    s = TpmSniffer(swtpm.port, swtpm.ctrl_port).start()
    yield s
    s.stop()


def _forms(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        secret[: len(secret) // 2],  # a part of it, wherever the rest went
        secret[len(secret) // 2 :],
    ]


def assert_not_on_the_bus(sniffer: TpmSniffer, secret: bytes) -> None:
    assert sniffer.total() > 0, "nothing went through the sniffer"
    seen = [place for form in _forms(secret) for place in sniffer.find(form)]
    assert not seen, f"the secret crossed the TPM bus in clear at {seen}"


def assert_encrypted(sniffer: TpmSniffer, command: str, bit: int) -> None:
    """The command went through the sniffer, every time with a session asking the TPM
    to encrypt its secret parameter (the command's or the response's)."""
    sent = [c for c in sniffer.commands() if c.name == command]
    assert sent, f"no {command} command went through the sniffer"
    assert all(c.asks(bit) for c in sent), f"{command} without parameter encryption: {sent}"


def same(got: bytes | None, want: bytes) -> bool:
    return got is not None and hmac.compare_digest(got, want)


def test_a_sealed_secret_crosses_the_bus_only_encrypted(sniffer: TpmSniffer) -> None:
    secret = secrets.token_bytes(64)
    with tpm.Tpm.open(sniffer.tcti) as t:
        blob = t.seal(secret, PCRS)
        unsealed = t.unseal(blob, PCRS)
    ok = same(unsealed, secret)
    assert ok, "unseal gave back other bytes than were sealed"
    assert_not_on_the_bus(sniffer, secret)
    assert_encrypted(sniffer, "Create", DECRYPT)
    assert_encrypted(sniffer, "Unseal", ENCRYPT)
    # the sniffer does read what is not secret: the sealed object's public area, in
    # Create's response and Load's command
    public = base64.b64decode(json.loads(blob)["public"])
    assert len(sniffer.find(public)) >= 2


def test_the_vault_key_crosses_the_bus_only_encrypted(swtpm: Swtpm, sniffer: TpmSniffer) -> None:
    key = secrets.token_bytes(tpm.VAULT_KEY_SIZE)
    with tpm.Tpm.open(sniffer.tcti) as t:
        t.vault_key_create(PCRS, key)
        first = t.vault_key_read(PCRS)
    swtpm.power_cycle()  # the next boot reads it again
    with tpm.Tpm.open(sniffer.tcti) as t:
        second = t.vault_key_read(PCRS)
    ok = same(first, key) and same(second, key)
    assert ok, "the vault key read back is not the one written"
    assert_not_on_the_bus(sniffer, key)
    assert_encrypted(sniffer, "NV_Write", DECRYPT)
    assert_encrypted(sniffer, "NV_Read", ENCRYPT)
    assert len([c for c in sniffer.commands() if c.name == "NV_Read"]) == 2
    # what is not secret is in clear: the anchor, read with the index's own authorization
    with tpm.Tpm.open(sniffer.tcti) as t:
        t.anchor_define(PCRS)
        anchor = secrets.token_bytes(tpm.ANCHOR_NV_SIZE)
        t.anchor_write(PCRS, anchor)
        assert t.anchor_read(PCRS) == anchor
    assert sniffer.find(anchor), "the sniffer did not see the anchor, which is not encrypted"


def test_the_bootstrap_credential_crosses_the_bus_only_encrypted(
    swtpm: Swtpm, sniffer: TpmSniffer
) -> None:
    credential = secrets.token_bytes(96)
    wrapped = tpm.wrap_for_ek(swtpm.ek_public_pem(), credential, {7: bytes(32)})
    with tpm.Tpm.open(sniffer.tcti) as t:
        unsealed = t.unseal(wrapped, PCRS, (tpm.BlobKind.DUPLICATE,))
    ok = same(unsealed, credential)
    assert ok, "the imported credential is not the one the factory wrapped"
    assert_not_on_the_bus(sniffer, credential)
    assert_encrypted(sniffer, "Unseal", ENCRYPT)
    # the duplicate itself crosses as it is: only the TPM's EK can open it
    duplicate = base64.b64decode(json.loads(wrapped)["duplicate"])
    assert sniffer.find(duplicate)


def test_the_owner_hierarchys_secret_never_crosses_the_bus_in_clear(sniffer: TpmSniffer) -> None:
    """Given to the TPM encrypted, then used by HMAC to raise the host floor: the secret is
    a key of the session there, never a parameter."""
    owner = secrets.token_bytes(tpm.OWNER_AUTH_SIZE)
    with tpm.Tpm.open(sniffer.tcti) as t:
        t.storage_persist()
        t.floor_define()
        t.owner_auth_set(owner)
        t.floor_raise(3, owner)
        raised = t.floor_read() == 3 and t.owner_auth_is_set()
    assert raised, "the floor did not rise with the owner's secret"
    assert_not_on_the_bus(sniffer, owner)
    assert_encrypted(sniffer, "HierarchyChangeAuth", DECRYPT)
    set_bits = [c for c in sniffer.commands() if c.name == "NV_SetBits"]
    assert len(set_bits) == 2, set_bits  # defining the floor, then raising it
