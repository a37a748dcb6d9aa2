"""Pure logic of the state vault: what it decides from the TPM's answer and the folders,
and the fscrypt structures (the real filesystem: tests/integration/test_vault.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.errors import StateError
from provisioner.node import fscrypt, vault
from provisioner.node.vault import Action, Folder

pytestmark = pytest.mark.unit

ALL = {name: Folder.MISSING for name in vault.VAULT_DIRS}


def test_first_boot_makes_the_key_and_encrypts_every_folder() -> None:
    folders = {**ALL, "var/lib/cloud": Folder.PLAIN, "var/lib/edgepin": Folder.EMPTY}
    p = vault.plan(key_held=False, enrolled=False, folders=folders)
    assert p.make_key
    assert set(p.actions.values()) == {Action.ENCRYPT}
    assert set(p.actions) == set(vault.VAULT_DIRS)


def test_a_later_boot_keeps_what_is_encrypted_and_makes_what_is_missing() -> None:
    folders = {**{n: Folder.OURS for n in vault.VAULT_DIRS}, "var/log/journal": Folder.MISSING}
    p = vault.plan(key_held=True, enrolled=True, folders=folders)
    assert not p.make_key
    assert p.actions["var/log/journal"] is Action.ENCRYPT
    assert p.actions["var/lib/edgepin"] is Action.KEEP


@pytest.mark.parametrize(
    ("key_held", "enrolled", "folder", "message"),
    [
        (False, False, Folder.OTHER, "this TPM does not hold"),
        (False, True, Folder.OTHER, "this TPM does not hold"),
        (False, True, Folder.EMPTY, "holds no vault key"),
        (True, True, Folder.OTHER, "another key"),
        (True, False, Folder.OTHER, "another key"),
        (True, True, Folder.PLAIN, "changed offline"),
    ],
)
def test_refusals(key_held: bool, enrolled: bool, folder: Folder, message: str) -> None:
    with pytest.raises(vault.VaultError, match=message):
        vault.plan(key_held, enrolled, {**ALL, "var/lib/edgepin": folder})


@given(
    key_held=st.booleans(),
    enrolled=st.booleans(),
    folders=st.fixed_dictionaries({n: st.sampled_from(Folder) for n in vault.VAULT_DIRS}),
)
@settings(max_examples=300, deadline=None)
def test_plan_is_total_and_never_hands_over_a_foreign_or_planted_folder(
    key_held: bool, enrolled: bool, folders: dict[str, Folder]
) -> None:
    if not key_held:
        folders = {n: Folder.OTHER if f is Folder.OURS else f for n, f in folders.items()}
    try:
        p = vault.plan(key_held, enrolled, folders)
    except vault.VaultError:
        return
    assert p.make_key is (not key_held)
    assert not enrolled or key_held  # an enrolled node never gets a new key
    for name, action in p.actions.items():
        assert folders[name] is not Folder.OTHER
        assert not (enrolled and folders[name] is Folder.PLAIN)
        assert (action is Action.KEEP) is (folders[name] is Folder.OURS)


def test_policy_bytes_round_trip() -> None:
    identifier = bytes(range(16))
    answer = struct.pack("<Q", 24) + fscrypt.policy_bytes(identifier)
    assert fscrypt.parse_policy(answer) == identifier
    # AES-256-XTS contents, AES-256-CTS names, 32-byte padding, v2
    assert fscrypt.policy_bytes(identifier)[:4] == bytes([2, 1, 4, 3])
    with pytest.raises(StateError):
        fscrypt.policy_bytes(b"short")


@given(st.binary(max_size=64))
@settings(max_examples=500)
def test_parse_policy_takes_any_kernel_answer(buf: bytes) -> None:
    got = fscrypt.parse_policy(buf)
    assert got is None or (len(got) == 16 and buf[8:12] == bytes([2, 1, 4, 3]))


def test_the_ioctl_numbers_are_linuxs() -> None:
    # from linux/fscrypt.h on x86-64: _IOR('f', 19, 12), _IOWR('f', 22, 9), _IOWR('f', 23, 80)
    assert fscrypt.FS_IOC_SET_ENCRYPTION_POLICY == 0x800C6613
    assert fscrypt.FS_IOC_GET_ENCRYPTION_POLICY_EX == 0xC0096616
    assert fscrypt.FS_IOC_ADD_ENCRYPTION_KEY == 0xC0506617
